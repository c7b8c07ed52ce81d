// OpenMP helpers that compile to serial code when the build has no OpenMP.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pykernels::cpu {

// Below this much work (multiply-adds or elements touched) a parallel region costs more than it saves,
// especially on a busy machine where waking a second thread can take a millisecond.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// Nanoseconds for two OpenMP threads to pass a cache line there and back (thread_round_trip.cpp); NaN
// without OpenMP or a second thread.
double openmp_round_trip_ns();

// Makes a process forked from this one run its parallel regions on one thread (openmp_fork.cpp): with GNU
// OpenMP they hung there. Called once, when the extension loads.
void keep_forked_children_serial();

// Threads a parallel region started here would get (1 when already inside an active region).
inline int available_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// body(i) for i in [0, count): split among the OpenMP threads when `parallel`, else in order on the calling
// thread outside any parallel construct, so that the body may start a parallel region of its own as a
// top-level one. (Nested inside an inactive `parallel if (false)`, libgomp started a fresh thread for that
// region on every call: 30-40 us, twice the whole of a 16 x 6 x 3 x 3 convolution of a 24 x 24 image.)
template <typename Body>
void for_each_index(int64_t count, bool parallel, Body&& body) {
  if (parallel) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) body(i);
  } else {
    for (int64_t i = 0; i < count; ++i) body(i);
  }
}

}  // namespace pykernels::cpu

#include <exception>
#include <mutex>

namespace pykernels::cpu {

// An exception must not leave an OpenMP region (that terminates the process): work inside a region
// runs through run(), and the first exception is rethrown by the caller after the region ends.
class ParallelErrors {
 public:
  template <typename F>
  void run(F&& work) noexcept {
    try {
      work();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr first_;
};

}  // namespace pykernels::cpu

#include <vector>

namespace pykernels::cpu {

// One scratch slice per thread, allocated before the parallel region (so an allocation failure is
// an ordinary exception on the calling thread, not inside OpenMP). Slices start on cache lines, whole
// lines apart with a line between them: threads writing small slices that shared a line ran max-pool's
// forward at half speed. Every slice starts zero-filled (direct_conv_impl.inc relies on it).
template <typename T>
class Workspace {
 public:
  Workspace(int slices, int64_t per_slice)
      : per_slice_((per_slice + 2 * kLine - 1) / kLine * kLine), data_(size_t(slices) * size_t(per_slice_) + kLine) {}
  T* for_this_thread() {
    T* first = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(data_.data()) + 63) / 64 * 64);
#ifdef _OPENMP
    return first + int64_t(omp_get_thread_num()) * per_slice_;
#else
    return first;
#endif
  }

 private:
  static constexpr int64_t kLine = (64 + int64_t(sizeof(T)) - 1) / int64_t(sizeof(T));  // values per 64 bytes
  int64_t per_slice_;
  std::vector<T> data_;
};

}  // namespace pykernels::cpu

#include <limits>
#include <new>

#include "cpu/scratch_buffers.hpp"

namespace pykernels::cpu {

// Uninitialised scratch kept by the calling thread between calls, one buffer per Slot: every element
// is written before it is read, and a buffer of tens of megabytes (the transformed filters of a
// 512-channel layer, backward-input's im2col columns of resnet_stem) allocated afresh on each call would
// be mapped anew by the kernel, whose page faults cost as much as the work itself. The buffer stays
// until the thread exits or pykernels.empty_cache() frees it (scratch_buffers.hpp: only inside a kernel
// call, which every entry point makes). It starts on a cache line: at new[]'s 16 bytes, every full-vector
// load and store of AVX-512 straddled two lines (Winograd F(2x2) ran a fifth faster once its buffers
// were aligned). Internal linkage: each file that uses it (and each instruction-set build of one) has its
// own buffers.
template <typename T, int Slot>
static T* reusable_buffer(int64_t count) {
  thread_local ScratchBuffer buffer;
  if (count < 0 || static_cast<uint64_t>(count) > std::numeric_limits<size_t>::max() / sizeof(T))
    throw std::bad_alloc();
  return static_cast<T*>(buffer.get(static_cast<size_t>(count) * sizeof(T)));
}

}  // namespace pykernels::cpu
