// Device-side helpers shared by the kernels of csrc/cuda (included by .cu files only): accumulator
// types, conversions, launch-error checks, grid sizing and 32/64-bit index selection.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/kernels.hpp"

#ifdef PYKERNELS_CUDA_EMU
#define PK_LAUNCH PYKERNELS_EMU_LAUNCH
#define PK_REGISTER_SHARED(array) ::pykernels_emu::register_shared(&(array), sizeof(array))
#else
#include <cuda_runtime.h>
// `kernel` must be a single token (use a local function pointer for template instantiations).
#define PK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define PK_REGISTER_SHARED(array) ((void)0)
#endif

namespace pykernels::cuda {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks (__launch_bounds__(kThreads))

// Accumulator type: float16 sums in float32; float and double in themselves.
template <typename T>
struct AccOf {
  using type = T;
};
template <>
struct AccOf<__half> {
  using type = float;
};
template <typename T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
// Double partial sums (bias gradient) to any T.
template <typename T>
__device__ __forceinline__ T from_double(double v) {
  return T(v);
}
template <>
__device__ __forceinline__ __half from_double<__half>(double v) {
  return __float2half_rn(float(v));
}

// Throws CudaError when the last launch (or any earlier runtime call) failed.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw CudaError(std::string(what) + ": " + cudaGetErrorString(err));
}
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: it is reported here
    throw CudaError(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

// A stream-ordered workspace (cudaMallocAsync / cudaFreeAsync on the launch stream), freed when it
// goes out of scope -- after the kernels enqueued before that, in stream order. On a device without
// the stream-ordered allocator (cudaErrorNotSupported), plain cudaMalloc / cudaFree (which waits).
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream, const char* what) : stream_(stream) {
    cudaError_t err = cudaMallocAsync(&ptr_, bytes, stream_);
    if (err == cudaErrorNotSupported) {
      (void)cudaGetLastError();
      async_ = false;
      err = cudaMalloc(&ptr_, bytes);
    }
    if (err != cudaSuccess) ptr_ = nullptr;
    check_cuda(err, what);
  }
  ~Workspace() {
    if (ptr_) (void)(async_ ? cudaFreeAsync(ptr_, stream_) : cudaFree(ptr_));
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
  bool async_ = true;
};

// Blocks for a grid-stride loop over `work` items, kThreads per block: never 0, never past the
// grid.x limit (the loops cover the rest).
inline unsigned grid_for(int64_t work, int64_t cap = int64_t(1) << 16) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return unsigned(std::max<int64_t>(1, std::min(blocks, cap)));
}
constexpr int64_t kMaxGridX = 2147483647;

// 32-bit index arithmetic is used when every value a kernel forms stays below this bound: 2^30 leaves
// room for a grid-stride step (at most 2^16 blocks x 256 threads) or a tile past the end.
constexpr int64_t kInt32Limit = int64_t(1) << 30;

// a = hi*(MID*LO) + mid*LO + lo advanced by a fixed step without division: the step's digits are
// precomputed (split_step), so each digit needs at most one carry.
template <typename I>
struct Step3 {
  I hi = 0, mid = 0, lo = 0;
};
template <typename I>
inline Step3<I> split_step(int64_t step, int64_t mid_size, int64_t lo_size) {
  Step3<I> d;
  d.lo = I(step % lo_size);
  d.mid = I((step / lo_size) % mid_size);
  d.hi = I(step / (lo_size * mid_size));
  return d;
}
template <typename I>
__device__ __forceinline__ void advance3(I& hi, I& mid, I& lo, const Step3<I>& d, I mid_size, I lo_size) {
  lo += d.lo;
  if (lo >= lo_size) {
    lo -= lo_size;
    ++mid;
  }
  mid += d.mid;
  if (mid >= mid_size) {
    mid -= mid_size;
    ++hi;
  }
  hi += d.hi;
}

template <typename I>
__device__ __forceinline__ bool in_range(I v, I size) {
  return v >= 0 && v < size;
}

}  // namespace pykernels::cuda
