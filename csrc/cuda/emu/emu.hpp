// A single-threaded CPU emulator of the small CUDA subset the kernels in csrc/cuda use, so that the
// very same kernel and launcher source can be compiled by g++ (-x c++ -DPYKERNELS_CUDA_EMU) and run
// here, where there is no GPU (csrc/cuda/emu/run_tests.sh). Not a CUDA replacement: tests only.
//
// What it models: grid/block indices, __shared__ memory (one block at a time, so function-static
// storage is exact), __syncthreads as a real barrier (each CUDA thread is a ucontext fiber; a block
// runs in rounds from one barrier to the next), launch-configuration limits, atomicMin, the stream-
// ordered allocator, memset/memcpy and the sticky "last error". What it adds for testing:
//   - threads of a round run in forward, reverse or shuffled order (set_schedule): a missing
//     __syncthreads then changes the result, which the tests catch by comparing orders bit for bit;
//   - a barrier reached by only part of a block (a thread returned early) throws;
//   - shared memory is filled with 0xFF bytes (NaN) before every block: reading a cell no thread of
//     the block wrote gives NaN in the result;
//   - counters of synchronisations and live allocations (the launchers must not leak or sync).
// Built with -fsanitize=address the fibers are annotated, so out-of-bounds global accesses are caught.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define PYKERNELS_EMU_ASAN 1
#endif

// ---- CUDA keywords ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- __half: IEEE binary16 through the compiler's _Float16 -----------------------------------------
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline __half __double2half(double d) { return __half{static_cast<_Float16>(static_cast<float>(d))}; }

// ---- runtime API subset ----------------------------------------------------------------------------
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorMemoryAllocation = 2;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

namespace pykernels_emu {

enum class Schedule { forward, reverse, shuffled };

struct State {
  cudaError_t last_error = cudaSuccess;
  Schedule schedule = Schedule::forward;
  std::mt19937 rng{12345};
  int64_t syncs = 0;         // cudaStreamSynchronize calls
  int64_t live_allocs = 0;   // cudaMallocAsync minus cudaFreeAsync
  int64_t launches = 0;
  std::set<std::pair<void*, size_t>> shared_regions;
};
inline State& state() {
  static State s;
  return s;
}

inline void set_schedule(Schedule s) { state().schedule = s; }

inline void register_shared(void* p, size_t bytes) { state().shared_regions.insert({p, bytes}); }

// ---- fibers ----------------------------------------------------------------------------------------
enum class FiberState { ready, waiting, done };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  FiberState st = FiberState::ready;
#ifdef PYKERNELS_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Scheduler {
  ucontext_t main_ctx;
  std::vector<Fiber> fibers;
  int current = -1;
  std::function<void()>* body = nullptr;
#ifdef PYKERNELS_EMU_ASAN
  void* main_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
#endif
  static constexpr size_t kStack = 512 * 1024;
};
inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

// Fiber -> scheduler switch (at a barrier or at the end of the thread).
inline void yield_to_scheduler(bool finished) {
  Scheduler& s = sched();
  Fiber& f = s.fibers[size_t(s.current)];
#ifdef PYKERNELS_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, s.main_bottom, s.main_size);
#endif
  swapcontext(&f.ctx, &s.main_ctx);
#ifdef PYKERNELS_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &s.main_bottom, &s.main_size);
#endif
  (void)finished;
}

inline void fiber_entry() {
  Scheduler& s = sched();
#ifdef PYKERNELS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.main_bottom, &s.main_size);
#endif
  (*s.body)();
  s.fibers[size_t(s.current)].st = FiberState::done;
  yield_to_scheduler(true);
}

inline void run_block(unsigned nthreads, const dim3& block, std::function<void()>& body) {
  Scheduler& s = sched();
  State& g = state();
  if (s.fibers.size() < nthreads) s.fibers.resize(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = s.fibers[i];
    if (f.stack.empty()) f.stack.resize(Scheduler::kStack);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    f.st = FiberState::ready;
  }
  s.body = &body;
  std::vector<unsigned> order(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = i;
  for (;;) {
    if (g.schedule == Schedule::reverse) std::reverse(order.begin(), order.end());
    if (g.schedule == Schedule::shuffled) std::shuffle(order.begin(), order.end(), g.rng);
    for (unsigned i : order) {
      Fiber& f = s.fibers[i];
      if (f.st != FiberState::ready) continue;
      s.current = int(i);
      threadIdx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
#ifdef PYKERNELS_EMU_ASAN
      __sanitizer_start_switch_fiber(&s.main_fake, f.stack.data(), f.stack.size());
#endif
      swapcontext(&s.main_ctx, &f.ctx);
#ifdef PYKERNELS_EMU_ASAN
      __sanitizer_finish_switch_fiber(s.main_fake, nullptr, nullptr);
#endif
      if (f.st == FiberState::ready)
        throw std::logic_error("emu: fiber returned to the scheduler without a barrier");
    }
    unsigned done = 0, waiting = 0;
    for (unsigned i = 0; i < nthreads; ++i) {
      if (s.fibers[i].st == FiberState::done) ++done;
      if (s.fibers[i].st == FiberState::waiting) ++waiting;
    }
    if (waiting == 0) break;
    if (done > 0)
      throw std::logic_error("emu: __syncthreads reached by " + std::to_string(waiting) + " threads while " +
                             std::to_string(done) + " had returned (divergent barrier)");
    for (unsigned i = 0; i < nthreads; ++i) s.fibers[i].st = FiberState::ready;
  }
  s.current = -1;
}

// Runs `body` (the kernel call) once per thread of every block, block after block.
template <class F>
void launch(dim3 grid, dim3 block, F&& kernel_call) {
  State& g = state();
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    g.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++g.launches;
  std::function<void()> body = [&] { kernel_call(); };
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (auto& [p, n] : g.shared_regions) std::memset(p, 0xFF, n);
        run_block(unsigned(nthreads), block, body);
      }
}

}  // namespace pykernels_emu

inline void __syncthreads() {
  pykernels_emu::sched().fibers[size_t(pykernels_emu::sched().current)].st = pykernels_emu::FiberState::waiting;
  pykernels_emu::yield_to_scheduler(false);
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  if (value < old) *address = value;
  return old;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = pykernels_emu::state().last_error;
  pykernels_emu::state().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return pykernels_emu::state().last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xAB, bytes);  // fresh device memory holds garbage
  ++pykernels_emu::state().live_allocs;
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  std::free(p);
  --pykernels_emu::state().live_allocs;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  ++pykernels_emu::state().syncs;
  return cudaSuccess;
}

#define PYKERNELS_EMU_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::pykernels_emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); })
