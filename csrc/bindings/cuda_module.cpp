// pybind11 glue for the CUDA kernels: module `_pykernels_cuda`. The same entry points, argument names
// and order as `_pykernels_cpu` (cpu_module.cpp), plus a keyword-only `stream`: the cudaStream_t handle
// to launch on (pykernels passes cupy.cuda.get_current_stream().ptr).
//
// Translation only. Arrays arrive as CuPy arrays (any object with __cuda_array_interface__): this file
// reads the interface (data pointer, read-only flag, shape, typestr, strides, version, stream) and
// re-checks everything the CPU bindings check -- dtype, shape, C-contiguity, writability, outputs not
// overlapping inputs -- with the same messages, then that every buffer is in the memory of the current
// device, then releases the GIL and enqueues the kernels. Nothing here waits for the GPU (max-pool
// backward reads one flag back, in csrc/cuda). When an array was produced on another stream (interface
// version 3), the launch stream first waits for it with an event, as the interface asks of consumers.
// ShapeError (std::invalid_argument) arrives in Python as ValueError, py::type_error as TypeError,
// CudaError (std::runtime_error) as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/shapes.hpp"
#include "cuda/kernels.hpp"

namespace py = pybind11;
using pykernels::Conv2dShape;
using pykernels::Pool2dShape;
using pykernels::ShapeError;
using pykernels::Window2d;
using pykernels::cuda::CudaError;

#ifndef PYKERNELS_CUDA_ARCHITECTURES
#define PYKERNELS_CUDA_ARCHITECTURES "unknown"
#endif

namespace {

using Pair = std::array<int64_t, 2>;
using Quad = std::array<int64_t, 4>;  // (top, bottom, left, right)

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// ---- __cuda_array_interface__ ----------------------------------------------------------------------

enum class DType { f16, f32, f64, i64, other };

struct DeviceArray {
  const char* name = "";
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  DType dtype = DType::other;
  std::string dtype_name;  // NumPy's name: float32, int64, ...
  int64_t itemsize = 0, numel = 0;
  bool readonly = false, c_contiguous = true;
  std::optional<uintptr_t> stream;  // the producer's stream (interface version 3), if it named one

  int64_t ndim() const { return int64_t(shape.size()); }
  int64_t nbytes() const { return numel * itemsize; }
};

// NumPy's name for a typestr such as "<f4" (float32), "|b1" (bool), "<c8" (complex64).
std::string typestr_name(const std::string& typestr) {
  if (typestr.size() < 3) return typestr;
  const char kind = typestr[1];
  int bits = 0;
  try {
    bits = std::stoi(typestr.substr(2)) * 8;
  } catch (const std::exception&) {
    return typestr;
  }
  switch (kind) {
    case 'f': return "float" + std::to_string(bits);
    case 'i': return "int" + std::to_string(bits);
    case 'u': return "uint" + std::to_string(bits);
    case 'c': return "complex" + std::to_string(bits);
    case 'b': return "bool";
    default: return typestr;
  }
}

std::string type_name(py::handle obj) {
  py::handle type = py::type::handle_of(obj);
  return py::str(type.attr("__module__")).cast<std::string>() + "." +
         py::str(type.attr("__qualname__")).cast<std::string>();
}

// Reads and checks the interface of one array; TypeError when `obj` is not a device array.
DeviceArray parse(py::handle obj, const char* name) {
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    if (py::hasattr(obj, "__array_interface__"))
      throw py::type_error(std::string(name) + " is a " + type_name(obj) +
                           " in host memory; the CUDA kernels need CuPy arrays on the current device (pass "
                           "arrays of one kind)");
    throw py::type_error(std::string(name) + " must be a CuPy array (an object with __cuda_array_interface__), got " +
                         type_name(obj));
  }
  py::object cai_obj = obj.attr("__cuda_array_interface__");
  if (!py::isinstance<py::dict>(cai_obj))
    throw py::type_error(std::string(name) + ".__cuda_array_interface__ must be a dict");
  py::dict cai = cai_obj.cast<py::dict>();
  for (const char* key : {"shape", "typestr", "data", "version"})
    if (!cai.contains(key))
      throw py::type_error(std::string(name) + ".__cuda_array_interface__ has no '" + key + "'");
  DeviceArray a;
  a.name = name;
  const int64_t version = cai["version"].cast<int64_t>();
  if (version < 0) throw py::type_error(std::string(name) + ": bad __cuda_array_interface__ version");
  if (cai.contains("mask") && !cai["mask"].is_none())
    throw py::type_error(std::string(name) + " is a masked array; pass a plain CuPy array");

  for (py::handle d : cai["shape"].cast<py::tuple>()) {
    const int64_t v = d.cast<int64_t>();
    if (v < 0) throw ShapeError(std::string(name) + " has a negative dimension");
    a.shape.push_back(v);
  }
  a.numel = 1;
  for (int64_t d : a.shape) {
    if (d != 0 && a.numel > pykernels::kMaxElements / d)
      throw ShapeError(std::string(name) + " shape " + shape_str(a.shape) + " has too many elements (more than 2^56)");
    a.numel *= d;
  }

  const std::string typestr = cai["typestr"].cast<std::string>();
  a.dtype_name = typestr_name(typestr);
  if (typestr.size() >= 3 && typestr[0] == '>')
    throw py::type_error(std::string(name) + " is big-endian (" + typestr + "); pass a native-byte-order array");
  if (typestr.size() >= 3 && typestr[0] != '>') {
    a.itemsize = typestr.size() > 2 ? std::atoi(typestr.c_str() + 2) : 0;
    const std::string code = typestr.substr(1);
    if (code == "f2") a.dtype = DType::f16;
    if (code == "f4") a.dtype = DType::f32;
    if (code == "f8") a.dtype = DType::f64;
    if (code == "i8") a.dtype = DType::i64;
  }

  const py::tuple data = cai["data"].cast<py::tuple>();
  if (data.size() != 2)
    throw py::type_error(std::string(name) + ".__cuda_array_interface__['data'] must be (ptr, readonly)");
  a.ptr = data[0].cast<uintptr_t>();
  a.readonly = data[1].cast<bool>();

  if (cai.contains("strides") && !cai["strides"].is_none() && a.numel > 0) {
    const py::tuple strides = cai["strides"].cast<py::tuple>();
    if (strides.size() != a.shape.size())
      throw py::type_error(std::string(name) + ".__cuda_array_interface__ strides do not match its shape");
    int64_t expected = a.itemsize;
    for (size_t i = a.shape.size(); i-- > 0;) {
      if (a.shape[i] != 1 && strides[i].cast<int64_t>() != expected) a.c_contiguous = false;
      expected *= a.shape[i];
    }
  }
  if (version >= 3 && cai.contains("stream") && !cai["stream"].is_none()) a.stream = cai["stream"].cast<uintptr_t>();
  return a;
}

std::optional<DeviceArray> parse_optional(py::handle obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return parse(obj, name);
}

template <typename T>
DType dtype_of_t();
template <>
DType dtype_of_t<__half>() { return DType::f16; }
template <>
DType dtype_of_t<float>() { return DType::f32; }
template <>
DType dtype_of_t<double>() { return DType::f64; }
template <>
DType dtype_of_t<int64_t>() { return DType::i64; }

const char* dtype_label(DType d) {
  switch (d) {
    case DType::f16: return "float16";
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    default: return "?";
  }
}

// Checks dtype T, ndim, C-contiguity and (where given) the exact shape -- the CPU bindings' checks.
template <typename T>
void check_array(const DeviceArray& a, int64_t ndim, const std::vector<int64_t>& shape = {}) {
  if (a.dtype != dtype_of_t<T>())
    throw py::type_error(std::string(a.name) + " must have dtype " + dtype_label(dtype_of_t<T>()) + ", got " +
                         a.dtype_name);
  if (a.ndim() != ndim)
    throw ShapeError(std::string(a.name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a.shape));
  if (!a.c_contiguous) throw ShapeError(std::string(a.name) + " must be C-contiguous");
  // A GPU faults on a misaligned element access, and the fault poisons the CUDA context for every later call.
  if (a.numel > 0 && a.ptr % sizeof(T) != 0)
    throw ShapeError("the data of " + std::string(a.name) + " (address " + std::to_string(a.ptr) +
                     ") is not aligned to its " + std::to_string(sizeof(T)) + "-byte elements; pass a copy");
  if (!shape.empty() && a.shape != shape)
    throw ShapeError(std::string(a.name) + " must have shape " + shape_str(shape) + ", got " + shape_str(a.shape));
}

template <typename T>
const T* in_ptr(const DeviceArray& a) {
  return reinterpret_cast<const T*>(a.ptr);
}

// An output must be writeable and must not overlap any input, except exactly (same buffer) when
// `same_allowed` (elementwise ops may run in place).
template <typename T>
T* out_ptr(const DeviceArray& out, std::initializer_list<const DeviceArray*> inputs, bool same_allowed = false) {
  if (out.readonly) throw ShapeError(std::string(out.name) + " must be writeable");
  const uintptr_t o0 = out.ptr, o1 = out.ptr + uintptr_t(out.nbytes());
  for (const DeviceArray* in : inputs) {
    if (!in || in->nbytes() == 0 || out.nbytes() == 0) continue;
    const uintptr_t i0 = in->ptr, i1 = in->ptr + uintptr_t(in->nbytes());
    if (same_allowed && i0 == o0 && i1 == o1) continue;
    if (i0 < o1 && o0 < i1)
      throw ShapeError(std::string(out.name) + " overlaps the memory of " + in->name + "; pass a separate array");
  }
  return reinterpret_cast<T*>(out.ptr);
}

// ---- device and stream -------------------------------------------------------------------------------

std::string cuda_message(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

int current_device() {
  int device = -1;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw CudaError("CUDA is not usable here (" + cuda_message(err) + ")");
  }
  return device;
}

// Every non-empty buffer must be device (or managed) memory of the current device: ValueError naming
// the argument otherwise. Then, for buffers a producer exported with another stream (interface v3),
// the launch stream waits for that stream (an event; the host does not wait).
void prepare_arrays(std::initializer_list<const DeviceArray*> arrays, cudaStream_t stream) {
  const int device = current_device();
  for (const DeviceArray* a : arrays) {
    if (!a || a->nbytes() == 0) continue;
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(a->ptr));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      throw py::value_error(std::string(a->name) + " does not point to CUDA memory (" + cuda_message(err) + ")");
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      throw py::value_error(std::string(a->name) +
                            " is not in GPU memory (host or unregistered memory); pass a CuPy array on the "
                            "current device");
    if (attr.device != device)
      throw py::value_error(std::string(a->name) + " is on GPU " + std::to_string(attr.device) +
                            " but the current device is GPU " + std::to_string(device) +
                            "; run under `with cupy.cuda.Device(" + std::to_string(attr.device) +
                            "):` or move the array to GPU " + std::to_string(device));
  }
  // The interface names the legacy default stream 1 and the per-thread one 2; handle 0 (the NULL
  // stream) means the legacy default stream for this module.
  auto canonical = [](uintptr_t s) { return s == 0 ? uintptr_t(1) : s; };
  const uintptr_t ours = canonical(reinterpret_cast<uintptr_t>(stream));
  std::vector<uintptr_t> waited;
  for (const DeviceArray* a : arrays) {
    if (!a || !a->stream || a->nbytes() == 0) continue;
    const uintptr_t theirs = canonical(*a->stream);
    if (theirs == ours || std::find(waited.begin(), waited.end(), theirs) != waited.end()) continue;
    waited.push_back(theirs);
    cudaEvent_t event = nullptr;
    cudaError_t err = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventRecord(event, reinterpret_cast<cudaStream_t>(theirs));
    if (err == cudaSuccess) err = cudaStreamWaitEvent(stream, event, 0);
    if (event) (void)cudaEventDestroy(event);  // released once the wait has been satisfied
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      throw CudaError(std::string("cannot order the launch stream after the stream of ") + a->name + " (" +
                      cuda_message(err) + ")");
    }
  }
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// ---- shapes (as in cpu_module.cpp) -------------------------------------------------------------------

Conv2dShape conv_shape(const DeviceArray& x, const DeviceArray& w, Pair stride, Quad pad, Pair dilation,
                       int64_t groups) {
  if (x.ndim() != 4)
    throw ShapeError(std::string(x.name) + " must be 4-D (N, C, H, W), got shape " + shape_str(x.shape));
  if (w.ndim() != 4) throw ShapeError("weight must be 4-D (K, C/groups, R, S), got shape " + shape_str(w.shape));
  Conv2dShape s;
  s.N = x.shape[0];
  s.C = x.shape[1];
  s.H = x.shape[2];
  s.W = x.shape[3];
  s.K = w.shape[0];
  s.R = w.shape[2];
  s.S = w.shape[3];
  s.groups = groups;
  s.win = Window2d::from({s.R, s.S}, stride, pad, dilation);
  s.validate();
  if (w.shape[1] != s.C / groups)
    throw ShapeError("weight " + shape_str(w.shape) + " has C/groups = " + std::to_string(w.shape[1]) + ", but " +
                     x.name + " " + shape_str(x.shape) + " has " + std::to_string(s.C) + " channels in " +
                     std::to_string(groups) + " group(s), " + std::to_string(s.C / groups) + " per group");
  return s;
}

std::vector<int64_t> out_dims(const Conv2dShape& s) { return {s.N, s.K, s.P, s.Q}; }

Pool2dShape pool_shape(const DeviceArray& x, Pair kernel, Pair stride, Quad pad, Pair dilation, bool ceil_mode) {
  if (x.ndim() != 4)
    throw ShapeError(std::string(x.name) + " must be 4-D (N, C, H, W), got shape " + shape_str(x.shape));
  Pool2dShape s;
  s.N = x.shape[0];
  s.C = x.shape[1];
  s.H = x.shape[2];
  s.W = x.shape[3];
  s.win = Window2d::from(kernel, stride, pad, dilation);
  s.ceil_mode = ceil_mode;
  s.validate();
  return s;
}

// ---- conv2d ------------------------------------------------------------------------------------------

template <typename T>
void conv2d_forward_t(const DeviceArray& x, const DeviceArray& w, const std::optional<DeviceArray>& bias,
                      const DeviceArray& y, Pair stride, Quad pad, Pair dilation, int64_t groups, cudaStream_t stream) {
  check_array<T>(x, 4);
  check_array<T>(w, 4);
  Conv2dShape s = conv_shape(x, w, stride, pad, dilation, groups);
  if (bias) check_array<T>(*bias, 1, {s.K});
  check_array<T>(y, 4, out_dims(s));
  T* yp = out_ptr<T>(y, {&x, &w, bias ? &*bias : nullptr});
  const T* bp = bias ? in_ptr<T>(*bias) : nullptr;
  prepare_arrays({&x, &w, bias ? &*bias : nullptr, &y}, stream);
  py::gil_scoped_release release;
  pykernels::cuda::conv2d_forward<T>(s, in_ptr<T>(x), in_ptr<T>(w), bp, yp, stream);
}

template <typename T>
void conv2d_backward_input_t(const DeviceArray& gy, const DeviceArray& w, const DeviceArray& gx, Pair stride, Quad pad,
                             Pair dilation, int64_t groups, cudaStream_t stream) {
  check_array<T>(gy, 4);
  check_array<T>(w, 4);
  check_array<T>(gx, 4);
  Conv2dShape s = conv_shape(gx, w, stride, pad, dilation, groups);
  check_array<T>(gy, 4, out_dims(s));
  T* gxp = out_ptr<T>(gx, {&gy, &w});
  prepare_arrays({&gy, &w, &gx}, stream);
  py::gil_scoped_release release;
  pykernels::cuda::conv2d_backward_input<T>(s, in_ptr<T>(gy), in_ptr<T>(w), gxp, stream);
}

template <typename T>
void conv2d_backward_weight_t(const DeviceArray& gy, const DeviceArray& x, const DeviceArray& gw, Pair stride, Quad pad,
                              Pair dilation, int64_t groups, cudaStream_t stream) {
  check_array<T>(gy, 4);
  check_array<T>(x, 4);
  check_array<T>(gw, 4);
  Conv2dShape s = conv_shape(x, gw, stride, pad, dilation, groups);
  check_array<T>(gy, 4, out_dims(s));
  T* gwp = out_ptr<T>(gw, {&gy, &x});
  prepare_arrays({&gy, &x, &gw}, stream);
  py::gil_scoped_release release;
  pykernels::cuda::conv2d_backward_weight<T>(s, in_ptr<T>(gy), in_ptr<T>(x), gwp, stream);
}

template <typename T>
void conv2d_backward_bias_t(const DeviceArray& gy, const DeviceArray& gb, cudaStream_t stream) {
  check_array<T>(gy, 4);
  Conv2dShape s;  // only N, K, P, Q matter for the bias gradient
  s.N = gy.shape[0];
  s.K = gy.shape[1];
  s.P = gy.shape[2];
  s.Q = gy.shape[3];
  check_array<T>(gb, 1, {s.K});
  T* gbp = out_ptr<T>(gb, {&gy});
  prepare_arrays({&gy, &gb}, stream);
  py::gil_scoped_release release;
  pykernels::cuda::conv2d_backward_bias<T>(s, in_ptr<T>(gy), gbp, stream);
}

// ---- relu --------------------------------------------------------------------------------------------

template <typename T>
void check_same_shape(const DeviceArray& a, const DeviceArray& b) {
  check_array<T>(b, a.ndim());
  if (a.shape != b.shape)
    throw ShapeError(std::string(b.name) + " must have the shape of " + a.name + " " + shape_str(a.shape) + ", got " +
                     shape_str(b.shape));
}

template <typename T>
void relu_forward_t(const DeviceArray& x, const DeviceArray& y, cudaStream_t stream) {
  check_array<T>(x, x.ndim());
  check_same_shape<T>(x, y);
  T* yp = out_ptr<T>(y, {&x}, /*same_allowed=*/true);
  prepare_arrays({&x, &y}, stream);
  py::gil_scoped_release release;
  pykernels::cuda::relu_forward<T>(x.numel, in_ptr<T>(x), yp, stream);
}

template <typename T>
void relu_backward_t(const DeviceArray& gy, const DeviceArray& y, const DeviceArray& gx, cudaStream_t stream) {
  check_array<T>(gy, gy.ndim());
  check_same_shape<T>(gy, y);
  check_same_shape<T>(gy, gx);
  T* gxp = out_ptr<T>(gx, {&gy, &y}, /*same_allowed=*/true);
  prepare_arrays({&gy, &y, &gx}, stream);
  py::gil_scoped_release release;
  pykernels::cuda::relu_backward<T>(gy.numel, in_ptr<T>(gy), in_ptr<T>(y), gxp, stream);
}

// ---- max_pool2d --------------------------------------------------------------------------------------

template <typename T>
void max_pool2d_forward_t(const DeviceArray& x, const DeviceArray& y, const std::optional<DeviceArray>& indices,
                          Pair kernel, Pair stride, Quad pad, Pair dilation, bool ceil_mode, cudaStream_t stream) {
  check_array<T>(x, 4);
  Pool2dShape s = pool_shape(x, kernel, stride, pad, dilation, ceil_mode);
  check_array<T>(y, 4, {s.N, s.C, s.P, s.Q});
  T* yp = out_ptr<T>(y, {&x});
  int64_t* ip = nullptr;
  if (indices) {
    check_array<int64_t>(*indices, 4, {s.N, s.C, s.P, s.Q});
    ip = out_ptr<int64_t>(*indices, {&x, &y});
  }
  prepare_arrays({&x, &y, indices ? &*indices : nullptr}, stream);
  py::gil_scoped_release release;
  pykernels::cuda::max_pool2d_forward<T>(s, in_ptr<T>(x), yp, ip, stream);
}

template <typename T>
void max_pool2d_backward_t(const DeviceArray& gy, const DeviceArray& indices, const DeviceArray& gx, Pair kernel,
                           Pair stride, Quad pad, Pair dilation, bool ceil_mode, cudaStream_t stream) {
  check_array<T>(gy, 4);
  check_array<T>(gx, 4);
  Pool2dShape s = pool_shape(gx, kernel, stride, pad, dilation, ceil_mode);
  check_array<T>(gy, 4, {s.N, s.C, s.P, s.Q});
  if (indices.dtype != DType::i64)
    throw py::type_error("indices must have dtype int64, got " + indices.dtype_name);
  check_array<int64_t>(indices, 4, {s.N, s.C, s.P, s.Q});
  T* gxp = out_ptr<T>(gx, {&gy, &indices});
  prepare_arrays({&gy, &indices, &gx}, stream);
  pykernels::cuda::BadIndex bad;
  {
    py::gil_scoped_release release;
    bad = pykernels::cuda::max_pool2d_backward<T>(s, in_ptr<T>(gy), in_ptr<int64_t>(indices), gxp, stream);
  }
  if (bad.position >= 0) {
    const int64_t PQ = s.P * s.Q, plane = bad.position / PQ, o = bad.position % PQ;
    throw ShapeError("indices[" + std::to_string(plane / s.C) + ", " + std::to_string(plane % s.C) + ", " +
                     std::to_string(o / s.Q) + ", " + std::to_string(o % s.Q) + "] = " + std::to_string(bad.value) +
                     " is not a cell of its pooling window; pass the indices max_pool2d returned for this input shape");
  }
}

// Runs fn<__half>, fn<float> or fn<double> by the dtype of the first array.
template <class F>
void dispatch(const DeviceArray& first, F&& fn) {
  switch (first.dtype) {
    case DType::f16: fn(__half{}); break;
    case DType::f32: fn(float{}); break;
    case DType::f64: fn(double{}); break;
    default:
      throw py::type_error(std::string(first.name) + " must be float16, float32 or float64, got dtype " +
                           first.dtype_name);
  }
}

}  // namespace

PYBIND11_MODULE(_pykernels_cuda, m) {
  m.doc() = "pykernels CUDA kernels (internal: use the pykernels package). Arrays are CuPy arrays (any object with "
            "__cuda_array_interface__), C-contiguous float16/float32/float64 NCHW on the current device; outputs "
            "are preallocated by the caller; padding is (top, bottom, left, right); `stream` is the cudaStream_t "
            "handle to launch on (cupy.cuda.get_current_stream().ptr).";

  m.def(
      "conv2d_forward",
      [](py::handle x, py::handle w, py::handle bias, py::handle out, Pair stride, Quad pad, Pair dilation,
         int64_t groups, uintptr_t stream) {
        const DeviceArray xa = parse(x, "x"), wa = parse(w, "weight"), ya = parse(out, "out");
        const std::optional<DeviceArray> ba = parse_optional(bias, "bias");
        dispatch(xa, [&](auto t) {
          conv2d_forward_t<decltype(t)>(xa, wa, ba, ya, stride, pad, dilation, groups, as_stream(stream));
        });
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("groups"), py::kw_only(), py::arg("stream"));
  m.def(
      "conv2d_backward_input",
      [](py::handle gy, py::handle w, py::handle gx, Pair stride, Quad pad, Pair dilation, int64_t groups,
         uintptr_t stream) {
        const DeviceArray gya = parse(gy, "grad_out"), wa = parse(w, "weight"), gxa = parse(gx, "grad_x");
        dispatch(gya, [&](auto t) {
          conv2d_backward_input_t<decltype(t)>(gya, wa, gxa, stride, pad, dilation, groups, as_stream(stream));
        });
      },
      py::arg("grad_out"), py::arg("weight"), py::arg("grad_x"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("groups"), py::kw_only(), py::arg("stream"));
  m.def(
      "conv2d_backward_weight",
      [](py::handle gy, py::handle x, py::handle gw, Pair stride, Quad pad, Pair dilation, int64_t groups,
         uintptr_t stream) {
        const DeviceArray gya = parse(gy, "grad_out"), xa = parse(x, "x"), gwa = parse(gw, "grad_weight");
        dispatch(gya, [&](auto t) {
          conv2d_backward_weight_t<decltype(t)>(gya, xa, gwa, stride, pad, dilation, groups, as_stream(stream));
        });
      },
      py::arg("grad_out"), py::arg("x"), py::arg("grad_weight"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("groups"), py::kw_only(), py::arg("stream"));
  m.def(
      "conv2d_backward_bias",
      [](py::handle gy, py::handle gb, uintptr_t stream) {
        const DeviceArray gya = parse(gy, "grad_out"), gba = parse(gb, "grad_bias");
        dispatch(gya, [&](auto t) { conv2d_backward_bias_t<decltype(t)>(gya, gba, as_stream(stream)); });
      },
      py::arg("grad_out"), py::arg("grad_bias"), py::kw_only(), py::arg("stream"));

  m.def(
      "relu_forward",
      [](py::handle x, py::handle out, uintptr_t stream) {
        const DeviceArray xa = parse(x, "x"), ya = parse(out, "out");
        dispatch(xa, [&](auto t) { relu_forward_t<decltype(t)>(xa, ya, as_stream(stream)); });
      },
      py::arg("x"), py::arg("out"), py::kw_only(), py::arg("stream"));
  m.def(
      "relu_backward",
      [](py::handle gy, py::handle y, py::handle gx, uintptr_t stream) {
        const DeviceArray gya = parse(gy, "grad_out"), ya = parse(y, "y"), gxa = parse(gx, "grad_x");
        dispatch(gya, [&](auto t) { relu_backward_t<decltype(t)>(gya, ya, gxa, as_stream(stream)); });
      },
      py::arg("grad_out"), py::arg("y"), py::arg("grad_x"), py::kw_only(), py::arg("stream"));

  m.def(
      "max_pool2d_forward",
      [](py::handle x, py::handle out, py::handle indices, Pair kernel, Pair stride, Quad pad, Pair dilation,
         bool ceil_mode, uintptr_t stream) {
        const DeviceArray xa = parse(x, "x"), ya = parse(out, "out");
        const std::optional<DeviceArray> ia = parse_optional(indices, "indices");
        dispatch(xa, [&](auto t) {
          max_pool2d_forward_t<decltype(t)>(xa, ya, ia, kernel, stride, pad, dilation, ceil_mode, as_stream(stream));
        });
      },
      py::arg("x"), py::arg("out"), py::arg("indices"), py::arg("kernel_size"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"), py::arg("ceil_mode"), py::kw_only(), py::arg("stream"));
  m.def(
      "max_pool2d_backward",
      [](py::handle gy, py::handle indices, py::handle gx, Pair kernel, Pair stride, Quad pad, Pair dilation,
         bool ceil_mode, uintptr_t stream) {
        const DeviceArray gya = parse(gy, "grad_out"), ia = parse(indices, "indices"), gxa = parse(gx, "grad_x");
        dispatch(gya, [&](auto t) {
          max_pool2d_backward_t<decltype(t)>(gya, ia, gxa, kernel, stride, pad, dilation, ceil_mode, as_stream(stream));
        });
      },
      py::arg("grad_out"), py::arg("indices"), py::arg("grad_x"), py::arg("kernel_size"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"), py::arg("ceil_mode"), py::kw_only(), py::arg("stream"));

  // ---- diagnostics ----
  m.def(
      "device_count",
      []() {
        int count = 0;
        const cudaError_t err = cudaGetDeviceCount(&count);
        if (err != cudaSuccess) {
          (void)cudaGetLastError();
          throw CudaError("no usable CUDA device (" + cuda_message(err) + ")");
        }
        return count;
      },
      "Number of CUDA devices this module's runtime sees; RuntimeError saying why when there is no usable "
      "driver or device.");
  m.def(
      "driver_version",
      []() {
        int v = 0;
        (void)cudaDriverGetVersion(&v);
        return v;
      },
      "The installed driver's CUDA version as 1000*major + 10*minor, 0 when there is no driver.");
  m.attr("runtime_version") = CUDART_VERSION;  // the (static) runtime this module was built with
  m.attr("architectures") = PYKERNELS_CUDA_ARCHITECTURES;
  m.def("set_force_int64_indexing", &pykernels::cuda::set_force_int64_indexing, py::arg("on"),
        "Test hook: run every kernel with 64-bit index arithmetic even where 32 bits would do.");
  m.def("force_int64_indexing", &pykernels::cuda::force_int64_indexing);
}
