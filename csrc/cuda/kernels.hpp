// The CUDA launchers the bindings call (csrc/bindings/cuda_module.cpp, host compiler). Pointers are to
// contiguous NCHW buffers in the memory of the current device whose sizes match the shape struct,
// which the caller has validated (Conv2dShape::validate / Pool2dShape::validate).
//
// Every launcher enqueues its kernels on `stream` and returns without waiting, except
// max_pool2d_backward, which must read its index check back. Launch errors (cudaGetLastError right
// after each launch) are thrown as CudaError. T is float, double or __half (__half accumulates in
// float). Backward passes are bit-for-bit deterministic: no floating-point atomics, fixed orders.
// This header includes no pybind11 and only the CUDA runtime API (it is compiled by g++ too).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/shapes.hpp"

#ifdef PYKERNELS_CUDA_EMU
#include "cuda/emu/emu.hpp"  // CPU emulation for the kernel tests (csrc/cuda/emu)
#else
#include <cuda_fp16.h>          // __half
#include <cuda_runtime_api.h>   // cudaStream_t
#endif

namespace pykernels::cuda {

// A CUDA runtime error (launch failure, out of memory, ...): surfaces in Python as RuntimeError.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// conv2d.cu -- y = x (*) w (+ bias); bias may be null.
template <typename T>
void conv2d_forward(const Conv2dShape& s, const T* x, const T* w, const T* bias, T* y, cudaStream_t stream);
// grad_x = transposed convolution of grad_y with w.
template <typename T>
void conv2d_backward_input(const Conv2dShape& s, const T* grad_y, const T* w, T* grad_x, cudaStream_t stream);
// grad_w = correlation of x with grad_y, reduced over N*P*Q in a fixed order (split-K partials in a
// stream-ordered workspace, summed in order by a second kernel).
template <typename T>
void conv2d_backward_weight(const Conv2dShape& s, const T* grad_y, const T* x, T* grad_w, cudaStream_t stream);
// grad_b[k] = sum of grad_y over n, p, q (fixed-order tree, accumulated in double).
template <typename T>
void conv2d_backward_bias(const Conv2dShape& s, const T* grad_y, T* grad_b, cudaStream_t stream);

// relu.cu -- elementwise over `count` values; y may be x (in place), grad_x may be grad_y or y.
template <typename T>
void relu_forward(int64_t count, const T* x, T* y, cudaStream_t stream);
template <typename T>
void relu_backward(int64_t count, const T* grad_y, const T* y, T* grad_x, cudaStream_t stream);

// max_pool2d.cu -- indices (may be null in forward) are flat offsets into each H*W plane.
template <typename T>
void max_pool2d_forward(const Pool2dShape& s, const T* x, T* y, int64_t* indices, cudaStream_t stream);

// The first entry of `indices` (flat position) that is not a cell of its own window, and its value.
struct BadIndex {
  int64_t position = -1;  // -1: every index is valid
  int64_t value = 0;
};
// Gathers grad_x and checks every index on the way; synchronises `stream` (only) to read the check
// back. When an index is bad, grad_x is unspecified.
template <typename T>
BadIndex max_pool2d_backward(const Pool2dShape& s, const T* grad_y, const int64_t* indices, T* grad_x,
                             cudaStream_t stream);

// Test hook: run every kernel with 64-bit index arithmetic even where 32 bits would do.
void set_force_int64_indexing(bool on);
bool force_int64_indexing();

}  // namespace pykernels::cuda
