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
constexpr cudaError_t cudaErrorNotSupported = 801;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

// ---- context switch --------------------------------------------------------------------------------
// On x86-64 a fiber switch is six pushes, a stack swap and six pops (glibc's swapcontext also makes a
// signal-mask system call each time, which made the emulator three times slower). Elsewhere, or with
// -DPYKERNELS_EMU_UCONTEXT, ucontext.
#if defined(__x86_64__) && defined(__linux__) && !defined(PYKERNELS_EMU_UCONTEXT)
#define PYKERNELS_EMU_ASM_SWITCH 1
extern "C" void pykernels_emu_switch(void** save_sp, void* load_sp);
// Weak: this header is included by several translation units.
asm(R"(
  .text
  .weak pykernels_emu_switch
  .type pykernels_emu_switch, @function
pykernels_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pykernels_emu_switch, .-pykernels_emu_switch
)");
#endif

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
  std::vector<char> stack;
  FiberState st = FiberState::ready;
#ifdef PYKERNELS_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
#ifdef PYKERNELS_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Scheduler {
#ifdef PYKERNELS_EMU_ASM_SWITCH
  void* main_sp = nullptr;
#else
  ucontext_t main_ctx;
#endif
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

inline void fiber_entry();

#ifdef PYKERNELS_EMU_ASM_SWITCH
// A fresh fiber's stack, laid out as pykernels_emu_switch leaves a suspended one: the saved MXCSR and
// x87 control word, six callee-saved registers, then the "return address" fiber_entry (and a dummy
// return address above it, so that fiber_entry starts with the stack alignment of a called function).
inline void init_fiber(Fiber& f) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack.data()) + f.stack.size()) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                              // fiber_entry's (unused) return address
  *--slot = reinterpret_cast<uint64_t>(&fiber_entry);       // popped by `ret`
  for (int i = 0; i < 6; ++i) *--slot = 0;                  // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--slot = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f.sp = slot;
}
inline void switch_to_fiber(Scheduler& s, Fiber& f) { pykernels_emu_switch(&s.main_sp, f.sp); }
inline void switch_to_main(Scheduler& s, Fiber& f) { pykernels_emu_switch(&f.sp, s.main_sp); }
#else
inline void init_fiber(Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = f.stack.size();
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
}
inline void switch_to_fiber(Scheduler& s, Fiber& f) { swapcontext(&s.main_ctx, &f.ctx); }
inline void switch_to_main(Scheduler& s, Fiber& f) { swapcontext(&f.ctx, &s.main_ctx); }
#endif

// Fiber -> scheduler switch (at a barrier or at the end of the thread).
inline void yield_to_scheduler(bool finished) {
  Scheduler& s = sched();
  Fiber& f = s.fibers[size_t(s.current)];
#ifdef PYKERNELS_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, s.main_bottom, s.main_size);
#endif
  switch_to_main(s, f);
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
  std::abort();  // a finished fiber is never resumed
}

inline void run_block(unsigned nthreads, const dim3& block, std::function<void()>& body) {
  Scheduler& s = sched();
  State& g = state();
  if (s.fibers.size() < nthreads) s.fibers.resize(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = s.fibers[i];
    if (f.stack.empty()) f.stack.resize(Scheduler::kStack);
    init_fiber(f);
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
      switch_to_fiber(s, f);
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
    case cudaErrorNotSupported: return "operation not supported";
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
inline cudaError_t cudaMalloc(void** p, size_t bytes) { return cudaMallocAsync(p, bytes, nullptr); }
inline cudaError_t cudaFree(void* p) { return cudaFreeAsync(p, nullptr); }
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
  ((void)(smem), (void)(stream), ::pykernels_emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); }))
