// Scratch memory kept by each thread between kernel calls (parallel.hpp's reusable_buffer), and how
// pykernels.empty_cache() frees it.
//
// A kernel's transformed filters, Winograd work buffers, im2col columns and padded copies of x are kept
// by the thread that made them (tens of MB for a 512-channel layer; allocating them afresh on every call
// cost as much as the work, in page faults). Every thread's buffers are listed here while they hold
// memory, so release_scratch_buffers() can free them all, OpenMP's worker threads' too. It may only do so
// while no kernel runs: every kernel entry point holds a RunningKernel for its whole call, and the release
// waits until none does, new calls waiting behind it (so a stream of calls from other threads cannot
// hold it off for ever).
#pragma once

#include <cstddef>

namespace pykernels::cpu {

// One thread's buffer (thread_local in reusable_buffer): at least the bytes asked for, 64-byte aligned,
// uninitialised, kept until a larger request, the thread's end or release_scratch_buffers().
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer();
  // Only inside a RunningKernel (or on a thread that release_scratch_buffers cannot race: see above).
  // Throws std::bad_alloc when the memory cannot be had; the buffer is then empty.
  void* get(size_t bytes) {
    if (bytes > bytes_) grow(bytes);
    return data_;
  }

 private:
  friend size_t release_scratch_buffers();
  friend size_t scratch_bytes();
  void grow(size_t bytes);
  void free_locked();  // with the list's mutex held

  void* data_ = nullptr;
  size_t bytes_ = 0;
  ScratchBuffer* prev_ = nullptr;  // the list of buffers that hold memory
  ScratchBuffer* next_ = nullptr;
};

// Held by every kernel call for its whole duration (after the GIL is released).
class RunningKernel {
 public:
  RunningKernel();
  ~RunningKernel();
  RunningKernel(const RunningKernel&) = delete;
  RunningKernel& operator=(const RunningKernel&) = delete;
};

// Waits until no kernel runs, then frees every thread's scratch buffers; returns the bytes released.
size_t release_scratch_buffers();
// Bytes held in scratch buffers now, all threads together.
size_t scratch_bytes();

}  // namespace pykernels::cpu
