// pybind11 glue for the CPU kernels: module `_pykernels_cpu`. Translation only: check every array it
// is given (type, dtype, shape, contiguity, writability, overlap), fill a shape struct from csrc/common,
// release the GIL and call the kernel. pykernels/ops.py gives friendlier messages first, but this
// module can be called directly, so it never trusts its caller. ShapeError (std::invalid_argument)
// arrives in Python as ValueError, py::type_error as TypeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/shapes.hpp"
#include "cpu/block_cache.hpp"
#include "cpu/conv_ranges.hpp"
#include "cpu/gemm.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scratch_buffers.hpp"

namespace py = pybind11;
using pykernels::Conv2dShape;
using pykernels::Pool2dShape;
using pykernels::ShapeError;
using pykernels::Window2d;

namespace {

using Pair = std::array<int64_t, 2>;
using Quad = std::array<int64_t, 4>;  // (top, bottom, left, right)

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// The element type every array of one call must share, taken from the first array.
enum class DType { f32, f64 };

DType dtype_of(const py::array& a, const char* name) {
  if (py::isinstance<py::array_t<float>>(a)) return DType::f32;
  if (py::isinstance<py::array_t<double>>(a)) return DType::f64;
  throw py::type_error(std::string(name) + " must be float32 or float64, got dtype " +
                       std::string(py::str(a.dtype())));
}

template <typename T>
const char* dtype_name();
template <>
const char* dtype_name<float>() { return "float32"; }
template <>
const char* dtype_name<double>() { return "float64"; }
template <>
const char* dtype_name<int64_t>() { return "int64"; }

// Checks dtype T, C-contiguity, ndim and (where given) the exact shape.
template <typename T>
void check_array(const py::array& a, const char* name, py::ssize_t ndim, const std::vector<int64_t>& shape = {}) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw ShapeError(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw ShapeError(std::string(name) + " must be C-contiguous");
  if (!shape.empty())
    for (py::ssize_t i = 0; i < ndim; ++i)
      if (a.shape(i) != shape[size_t(i)])
        throw ShapeError(std::string(name) + " must have shape " + shape_str(shape) + ", got " + shape_str(a));
}

template <typename T>
const T* in_ptr(const py::array& a) {
  return static_cast<const T*>(a.data());
}

// An output must be writeable and must not overlap any input, except exactly (same buffer) when
// `same_allowed` (elementwise ops may run in place).
template <typename T>
T* out_ptr(py::array& out, const char* name, std::initializer_list<std::pair<const py::array*, const char*>> inputs,
           bool same_allowed = false) {
  if (!out.writeable()) throw ShapeError(std::string(name) + " must be writeable");
  const char* o0 = static_cast<const char*>(out.data());
  const char* o1 = o0 + out.nbytes();
  for (auto [in, in_name] : inputs) {
    if (!in || in->nbytes() == 0 || out.nbytes() == 0) continue;
    const char* i0 = static_cast<const char*>(in->data());
    const char* i1 = i0 + in->nbytes();
    if (same_allowed && i0 == o0 && i1 == o1) continue;
    if (i0 < o1 && o0 < i1)
      throw ShapeError(std::string(name) + " overlaps the memory of " + in_name + "; pass a separate array");
  }
  return static_cast<T*>(out.mutable_data());
}

// Conv2dShape from x's and weight's shapes, validated (P, Q computed).
Conv2dShape conv_shape(const py::array& x, const char* x_name, const py::array& w, Pair stride, Quad pad,
                       Pair dilation, int64_t groups) {
  if (x.ndim() != 4) throw ShapeError(std::string(x_name) + " must be 4-D (N, C, H, W), got shape " + shape_str(x));
  if (w.ndim() != 4)
    throw ShapeError("weight must be 4-D (K, C/groups, R, S), got shape " + shape_str(w));
  Conv2dShape s;
  s.N = x.shape(0);
  s.C = x.shape(1);
  s.H = x.shape(2);
  s.W = x.shape(3);
  s.K = w.shape(0);
  s.R = w.shape(2);
  s.S = w.shape(3);
  s.groups = groups;
  s.win = Window2d::from({s.R, s.S}, stride, pad, dilation);
  s.validate();
  if (w.shape(1) != s.C / groups)  // validate() ensured groups >= 1 divides C
    throw ShapeError("weight " + shape_str(w) + " has C/groups = " + std::to_string(w.shape(1)) + ", but " + x_name +
                     " " + shape_str(x) + " has " + std::to_string(s.C) + " channels in " + std::to_string(groups) +
                     " group(s), " + std::to_string(s.C / groups) + " per group");
  return s;
}

// Conv2dShape from shapes alone (no arrays), validated: for the shape-only entry points.
Conv2dShape conv_shape_of_dims(Quad x, Quad w, Pair stride, Quad pad, Pair dilation, int64_t groups) {
  Conv2dShape s;
  s.N = x[0], s.C = x[1], s.H = x[2], s.W = x[3], s.K = w[0], s.R = w[2], s.S = w[3], s.groups = groups;
  s.win = Window2d::from({s.R, s.S}, stride, pad, dilation);
  s.validate();
  if (w[1] != s.C / groups) throw ShapeError("weight's C/groups does not match x's channels");
  return s;
}

std::vector<int64_t> out_dims(const Conv2dShape& s) { return {s.N, s.K, s.P, s.Q}; }

// A test's question about the path a layer takes: binds `name` (x_shape, weight_shape, stride, padding,
// dilation, groups, itemsize) to query(the validated Conv2dShape, itemsize: bytes per value). `itemsize_arg`
// is py::arg("itemsize"), with or without a default.
template <typename Query, typename ItemsizeArg>
void def_layer_query(py::module_& m, const char* name, Query query, ItemsizeArg itemsize_arg, const char* doc) {
  m.def(
      name,
      [query](Quad x, Quad w, Pair stride, Quad pad, Pair dilation, int64_t groups, int64_t itemsize) {
        return query(conv_shape_of_dims(x, w, stride, pad, dilation, groups), itemsize);
      },
      py::arg("x_shape"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), itemsize_arg, doc);
}

// A kernel call once its arguments are checked: without the GIL, and counted as running, so that
// empty_cache() waits for it before freeing scratch memory (members are destroyed in reverse: the count
// drops before the GIL is taken again).
struct KernelCall {
  py::gil_scoped_release release;
  pykernels::cpu::RunningKernel running;
};

// ---- conv2d ------------------------------------------------------------------------------------------

template <typename T>
void conv2d_forward_t(const py::array& x, const py::array& w, const std::optional<py::array>& bias, py::array& y,
                      Pair stride, Quad pad, Pair dilation, int64_t groups) {
  check_array<T>(x, "x", 4);
  check_array<T>(w, "weight", 4);
  Conv2dShape s = conv_shape(x, "x", w, stride, pad, dilation, groups);
  if (bias) check_array<T>(*bias, "bias", 1, {s.K});
  check_array<T>(y, "out", 4, out_dims(s));
  T* yp = out_ptr<T>(y, "out", {{&x, "x"}, {&w, "weight"}, {bias ? &*bias : nullptr, "bias"}});
  const T* bp = bias ? in_ptr<T>(*bias) : nullptr;
  KernelCall call;
  pykernels::cpu::conv2d_forward<T>(s, in_ptr<T>(x), in_ptr<T>(w), bp, yp);
}

template <typename T>
void conv2d_backward_input_t(const py::array& gy, const py::array& w, py::array& gx, Pair stride, Quad pad,
                             Pair dilation, int64_t groups) {
  check_array<T>(gy, "grad_out", 4);
  check_array<T>(w, "weight", 4);
  check_array<T>(gx, "grad_x", 4);
  Conv2dShape s = conv_shape(gx, "grad_x", w, stride, pad, dilation, groups);
  check_array<T>(gy, "grad_out", 4, out_dims(s));
  T* gxp = out_ptr<T>(gx, "grad_x", {{&gy, "grad_out"}, {&w, "weight"}});
  KernelCall call;
  pykernels::cpu::conv2d_backward_input<T>(s, in_ptr<T>(gy), in_ptr<T>(w), gxp);
}

template <typename T>
void conv2d_backward_weight_t(const py::array& gy, const py::array& x, py::array& gw, Pair stride, Quad pad,
                              Pair dilation, int64_t groups) {
  check_array<T>(gy, "grad_out", 4);
  check_array<T>(x, "x", 4);
  check_array<T>(gw, "grad_weight", 4);
  Conv2dShape s = conv_shape(x, "x", gw, stride, pad, dilation, groups);
  check_array<T>(gy, "grad_out", 4, out_dims(s));
  T* gwp = out_ptr<T>(gw, "grad_weight", {{&gy, "grad_out"}, {&x, "x"}});
  KernelCall call;
  pykernels::cpu::conv2d_backward_weight<T>(s, in_ptr<T>(gy), in_ptr<T>(x), gwp);
}

template <typename T>
void conv2d_backward_bias_t(const py::array& gy, py::array& gb) {
  check_array<T>(gy, "grad_out", 4);
  Conv2dShape s;  // only N, K, P, Q matter for the bias gradient
  s.N = gy.shape(0);
  s.K = gy.shape(1);
  s.P = gy.shape(2);
  s.Q = gy.shape(3);
  check_array<T>(gb, "grad_bias", 1, {s.K});
  T* gbp = out_ptr<T>(gb, "grad_bias", {{&gy, "grad_out"}});
  KernelCall call;
  pykernels::cpu::conv2d_backward_bias<T>(s, in_ptr<T>(gy), gbp);
}

// ---- relu --------------------------------------------------------------------------------------------

template <typename T>
void check_same_shape(const py::array& a, const char* a_name, const py::array& b, const char* b_name) {
  check_array<T>(b, b_name, a.ndim());
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) != b.shape(i))
      throw ShapeError(std::string(b_name) + " must have the shape of " + a_name + " " + shape_str(a) + ", got " +
                       shape_str(b));
}

template <typename T>
void relu_forward_t(const py::array& x, py::array& y) {
  check_array<T>(x, "x", x.ndim());
  check_same_shape<T>(x, "x", y, "out");
  T* yp = out_ptr<T>(y, "out", {{&x, "x"}}, /*same_allowed=*/true);
  const int64_t count = x.size();
  KernelCall call;
  pykernels::cpu::relu_forward<T>(count, in_ptr<T>(x), yp);
}

template <typename T>
void relu_backward_t(const py::array& gy, const py::array& y, py::array& gx) {
  check_array<T>(gy, "grad_out", gy.ndim());
  check_same_shape<T>(gy, "grad_out", y, "y");
  check_same_shape<T>(gy, "grad_out", gx, "grad_x");
  T* gxp = out_ptr<T>(gx, "grad_x", {{&gy, "grad_out"}, {&y, "y"}}, /*same_allowed=*/true);
  const int64_t count = gy.size();
  KernelCall call;
  pykernels::cpu::relu_backward<T>(count, in_ptr<T>(gy), in_ptr<T>(y), gxp);
}

// ---- max_pool2d --------------------------------------------------------------------------------------

Pool2dShape pool_shape(const std::vector<int64_t>& x_dims, const char* x_name, Pair kernel, Pair stride, Quad pad,
                       Pair dilation, bool ceil_mode) {
  if (x_dims.size() != 4)
    throw ShapeError(std::string(x_name) + " must be 4-D (N, C, H, W), got shape " + shape_str(x_dims));
  Pool2dShape s;
  s.N = x_dims[0];
  s.C = x_dims[1];
  s.H = x_dims[2];
  s.W = x_dims[3];
  s.win = Window2d::from(kernel, stride, pad, dilation);
  s.ceil_mode = ceil_mode;
  s.validate();
  return s;
}

std::vector<int64_t> dims_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

template <typename T>
void max_pool2d_forward_t(const py::array& x, py::array& y, std::optional<py::array>& indices, Pair kernel,
                          Pair stride, Quad pad, Pair dilation, bool ceil_mode) {
  check_array<T>(x, "x", 4);
  Pool2dShape s = pool_shape(dims_of(x), "x", kernel, stride, pad, dilation, ceil_mode);
  check_array<T>(y, "out", 4, {s.N, s.C, s.P, s.Q});
  T* yp = out_ptr<T>(y, "out", {{&x, "x"}});
  int64_t* ip = nullptr;
  if (indices) {
    check_array<int64_t>(*indices, "indices", 4, {s.N, s.C, s.P, s.Q});
    ip = out_ptr<int64_t>(*indices, "indices", {{&x, "x"}, {&y, "out"}});
  }
  KernelCall call;
  pykernels::cpu::max_pool2d_forward<T>(s, in_ptr<T>(x), yp, ip);
}

template <typename T>
void max_pool2d_backward_t(const py::array& gy, const py::array& indices, py::array& gx, Pair kernel, Pair stride,
                           Quad pad, Pair dilation, bool ceil_mode) {
  check_array<T>(gy, "grad_out", 4);
  check_array<T>(gx, "grad_x", 4);
  Pool2dShape s = pool_shape(dims_of(gx), "grad_x", kernel, stride, pad, dilation, ceil_mode);
  check_array<T>(gy, "grad_out", 4, {s.N, s.C, s.P, s.Q});
  if (!py::isinstance<py::array_t<int64_t>>(indices))
    throw py::type_error("indices must have dtype int64, got " + std::string(py::str(indices.dtype())));
  check_array<int64_t>(indices, "indices", 4, {s.N, s.C, s.P, s.Q});
  T* gxp = out_ptr<T>(gx, "grad_x", {{&gy, "grad_out"}, {&indices, "indices"}});
  int64_t bad;
  {
    KernelCall call;
    bad = pykernels::cpu::max_pool2d_backward<T>(s, in_ptr<T>(gy), in_ptr<int64_t>(indices), gxp);
  }
  if (bad >= 0) {
    const int64_t PQ = s.P * s.Q, plane = bad / PQ, o = bad % PQ;
    throw ShapeError("indices[" + std::to_string(plane / s.C) + ", " + std::to_string(plane % s.C) + ", " +
                     std::to_string(o / s.Q) + ", " + std::to_string(o % s.Q) + "] = " +
                     std::to_string(in_ptr<int64_t>(indices)[bad]) +
                     " is not a cell of its pooling window; pass the indices max_pool2d returned for this input shape");
  }
}

// Runs fn<float> or fn<double> by the dtype of the first array.
#define PYKERNELS_DISPATCH(first, first_name, fn, ...)                 \
  (dtype_of(first, first_name) == DType::f32 ? fn<float>(__VA_ARGS__) \
                                             : fn<double>(__VA_ARGS__))

}  // namespace

PYBIND11_MODULE(_pykernels_cpu, m) {
  pykernels::cpu::keep_forked_children_serial();
  m.doc() = "pykernels CPU kernels (internal: use the pykernels package). Arrays must be C-contiguous "
            "float32/float64 NCHW; outputs are preallocated by the caller; padding is (top, bottom, left, right).";

  m.def(
      "conv2d_forward",
      [](const py::array& x, const py::array& w, const std::optional<py::array>& bias, py::array& out, Pair stride,
         Quad pad, Pair dilation, int64_t groups) {
        PYKERNELS_DISPATCH(x, "x", conv2d_forward_t, x, w, bias, out, stride, pad, dilation, groups);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("groups"));
  m.def(
      "conv2d_backward_input",
      [](const py::array& gy, const py::array& w, py::array& gx, Pair stride, Quad pad, Pair dilation, int64_t groups) {
        PYKERNELS_DISPATCH(gy, "grad_out", conv2d_backward_input_t, gy, w, gx, stride, pad, dilation, groups);
      },
      py::arg("grad_out"), py::arg("weight"), py::arg("grad_x"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("groups"));
  m.def(
      "conv2d_backward_weight",
      [](const py::array& gy, const py::array& x, py::array& gw, Pair stride, Quad pad, Pair dilation, int64_t groups) {
        PYKERNELS_DISPATCH(gy, "grad_out", conv2d_backward_weight_t, gy, x, gw, stride, pad, dilation, groups);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("grad_weight"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("groups"));
  m.def(
      "conv2d_backward_bias",
      [](const py::array& gy, py::array& gb) { PYKERNELS_DISPATCH(gy, "grad_out", conv2d_backward_bias_t, gy, gb); },
      py::arg("grad_out"), py::arg("grad_bias"));

  m.def(
      "relu_forward", [](const py::array& x, py::array& out) { PYKERNELS_DISPATCH(x, "x", relu_forward_t, x, out); },
      py::arg("x"), py::arg("out"));
  m.def(
      "relu_backward",
      [](const py::array& gy, const py::array& y, py::array& gx) {
        PYKERNELS_DISPATCH(gy, "grad_out", relu_backward_t, gy, y, gx);
      },
      py::arg("grad_out"), py::arg("y"), py::arg("grad_x"));

  m.def(
      "max_pool2d_forward",
      [](const py::array& x, py::array& out, std::optional<py::array> indices, Pair kernel, Pair stride, Quad pad,
         Pair dilation, bool ceil_mode) {
        PYKERNELS_DISPATCH(x, "x", max_pool2d_forward_t, x, out, indices, kernel, stride, pad, dilation, ceil_mode);
      },
      py::arg("x"), py::arg("out"), py::arg("indices"), py::arg("kernel_size"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"), py::arg("ceil_mode"));
  m.def(
      "max_pool2d_backward",
      [](const py::array& gy, const py::array& indices, py::array& gx, Pair kernel, Pair stride, Quad pad,
         Pair dilation, bool ceil_mode) {
        PYKERNELS_DISPATCH(gy, "grad_out", max_pool2d_backward_t, gy, indices, gx, kernel, stride, pad, dilation,
                           ceil_mode);
      },
      py::arg("grad_out"), py::arg("indices"), py::arg("grad_x"), py::arg("kernel_size"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"), py::arg("ceil_mode"));

  // Shape maths as the kernels see it, for tests of the 64-bit index arithmetic without big arrays.
  m.def(
      "conv2d_output_shape",
      [](Quad x, Quad w, Pair stride, Quad pad, Pair dilation, int64_t groups) {
        const Conv2dShape s = conv_shape_of_dims(x, w, stride, pad, dilation, groups);
        return Quad{s.N, s.K, s.P, s.Q};
      },
      py::arg("x_shape"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"));
  m.def(
      "pool2d_output_shape",
      [](std::array<int64_t, 4> x, Pair kernel, Pair stride, Quad pad, Pair dilation, bool ceil_mode) {
        Pool2dShape s = pool_shape({x[0], x[1], x[2], x[3]}, "x", kernel, stride, pad, dilation, ceil_mode);
        return std::array<int64_t, 4>{s.N, s.C, s.P, s.Q};
      },
      py::arg("x_shape"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("ceil_mode"));
  m.def(
      "nchw_offset",
      [](std::array<int64_t, 4> index, std::array<int64_t, 4> shape) {
        pykernels::checked_numel("shape", shape[0], shape[1], shape[2], shape[3]);
        for (int i = 0; i < 4; ++i)
          if (index[i] < 0 || index[i] >= shape[i]) throw ShapeError("index out of range");
        return pykernels::nchw_offset(index[0], index[1], index[2], index[3], shape[1], shape[2], shape[3]);
      },
      py::arg("index"), py::arg("shape"));

  m.def(
      "empty",
      [](const std::vector<int64_t>& shape, const py::dtype& dtype) {
        // Uninitialised memory: numbers only (an object array over it would free garbage pointers).
        if (dtype.kind() != 'f' && dtype.kind() != 'i' && dtype.kind() != 'u')
          throw py::type_error("empty: dtype must be a float or integer type");
        int64_t count = 1;
        for (int64_t d : shape) {
          if (d < 0) throw ShapeError("empty: negative size in the shape");
          if (d != 0 && count > pykernels::kMaxElements / d) throw ShapeError("empty: too many elements");
          count *= d;
        }
        const size_t bytes = std::max<size_t>(1, size_t(count) * size_t(dtype.itemsize()));
        const pykernels::cpu::Block block = pykernels::cpu::take_block(bytes);
        pykernels::cpu::Block* owner;
        try {
          owner = new pykernels::cpu::Block(block);
        } catch (...) {
          pykernels::cpu::give_back_block(block);
          throw;
        }
        // The array's base: freed when the array and every view of it are gone, giving the block back.
        py::capsule base(owner, [](void* p) {
          auto* b = static_cast<pykernels::cpu::Block*>(p);
          pykernels::cpu::give_back_block(*b);
          delete b;
        });
        return py::array(dtype, std::vector<py::ssize_t>(shape.begin(), shape.end()), block.data, base);
      },
      py::arg("shape"), py::arg("dtype"),
      "An uninitialised C-contiguous array on a block kept for reuse once the array and its views are "
      "freed (block_cache.hpp): for large results.");
  m.def(
      "empty_cache",
      []() {
        py::gil_scoped_release release;  // waits for the kernel calls in flight, which hold no GIL
        return pykernels::cpu::release_scratch_buffers() + pykernels::cpu::clear_block_cache();
      },
      "Free every thread's scratch buffers (once no kernel call is in flight) and the unused blocks kept for "
      "large results; returns the bytes released.");
  m.def("cached_bytes", &pykernels::cpu::block_cache_bytes, "Bytes held in unused blocks kept for large results.");
  m.def("scratch_bytes", &pykernels::cpu::scratch_bytes, "Bytes held in scratch buffers, all threads together.");
  m.def("active_isa", &pykernels::cpu::active_isa, "Instruction set of the hot loops: 'avx512', 'avx2' or 'portable'.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (!pykernels::cpu::set_isa(name.c_str()))
          throw ShapeError("isa must be 'portable', or 'avx2' / 'avx512' on a CPU that has them; got '" + name + "'");
      },
      py::arg("name"), "Force the hot loops' instruction set (for tests).");
  // Which path a pass takes on these shapes (for tests), one binding each; itemsize: bytes per value.
  for (const auto& [name, chosen, doc] :
       {std::tuple{"conv2d_uses_winograd", &pykernels::cpu::conv2d_winograd_chosen,
                   "Whether conv2d forward on these shapes takes the Winograd path (for tests)."},
        std::tuple{"conv2d_backward_input_uses_winograd", &pykernels::cpu::conv2d_backward_input_winograd_chosen,
                   "Whether conv2d backward-input on these shapes takes the Winograd path (for tests)."},
        std::tuple{"conv2d_uses_split_winograd", &pykernels::cpu::conv2d_split_winograd_chosen,
                   "Whether conv2d forward on these shapes (4x4 to 6x6 kernels) takes the Winograd path as a 3x3 "
                   "layer of four times the input channels (for tests)."},
        std::tuple{"conv2d_backward_weight_uses_split_winograd",
                   &pykernels::cpu::conv2d_backward_weight_split_winograd_chosen,
                   "The same for conv2d backward-weight (for tests)."},
        std::tuple{"conv2d_backward_weight_uses_winograd_f2",
                   &pykernels::cpu::conv2d_backward_weight_winograd_f2_chosen,
                   "Whether conv2d backward-weight on these shapes takes Winograd F(2x2, 3x3) (for tests)."},
        std::tuple{"conv2d_backward_weight_uses_winograd_rows",
                   &pykernels::cpu::conv2d_backward_weight_winograd_rows_chosen,
                   "Whether conv2d backward-weight on these shapes takes Winograd F(3, 2) along the rows (for tests)."},
        std::tuple{"conv2d_backward_weight_uses_winograd_in_registers",
                   &pykernels::cpu::conv2d_backward_weight_winograd_in_registers_chosen,
                   "Whether conv2d backward-weight on these shapes takes Winograd F(4x4) with its sums in registers "
                   "(at most 8 tiles; for tests)."},
        std::tuple{"conv2d_winograd_is_f2", &pykernels::cpu::winograd_f2_applies,
                   "Whether these shapes, where forward (or backward-input's transposed convolution) takes the "
                   "Winograd path, take F(2x2, 3x3) rather than F(4x4, 3x3) (for tests)."}})
    def_layer_query(m, name, chosen, py::arg("itemsize") = 4, doc);
  m.def(
      "conv2d_backward_weight_uses_winograd",
      [](Quad x, Quad w, Pair stride, Quad pad, Pair dilation, int64_t groups) {
        return pykernels::cpu::conv2d_backward_weight_winograd_chosen(
            conv_shape_of_dims(x, w, stride, pad, dilation, groups));
      },
      py::arg("x_shape"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), "Whether conv2d backward-weight on these shapes takes the Winograd path (for tests).");
  def_layer_query(m, "conv2d_backward_weight_winograd_chunk", &pykernels::cpu::winograd_backward_weight_chunk_tiles,
                  py::arg("itemsize") = 4,
                  "Tiles of 4x4 per chunk of F(4x4)'s chunked backward-weight on these 3x3 stride-1 shapes (for "
                  "tests).");
  m.def(
      "conv2d_reads_subsampled_x",
      [](Quad x, Quad w, Pair stride, Quad pad, Pair dilation, int64_t groups) {
        return pykernels::cpu::conv2d_reads_subsampled_x(conv_shape_of_dims(x, w, stride, pad, dilation, groups));
      },
      py::arg("x_shape"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"),
      "Whether conv2d forward on these shapes (1x1, strided or padded) runs as a pointwise layer over x "
      "subsampled (for tests).");
  def_layer_query(
      m, "conv2d_backward_input_uses_transposed_forward", &pykernels::cpu::conv2d_backward_input_transposed_chosen,
      py::arg("itemsize"),
      "Whether conv2d backward-input on these shapes, with finite weights at itemsize bytes per value, runs "
      "as the transposed convolution through the forward's paths instead of adding im2col columns back "
      "(for tests).");
  def_layer_query(
      m, "conv2d_backward_weight_reads_wide_rows",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return !pykernels::cpu::sums_weight_gradient_directly(s) &&
               !pykernels::cpu::conv2d_backward_weight_winograd_chosen(s) &&
               pykernels::cpu::conv2d_backward_weight_reads_wide_rows(s, itemsize);
      },
      py::arg("itemsize"),
      "Whether conv2d backward-weight on these shapes, at itemsize bytes per value, reads x's rows in place "
      "from copies (conv_rows.cpp's wide rows) while its result is finite (for tests).");
  m.def(
      "conv2d_sums_directly",
      [](Quad x, Quad w, Pair stride, Quad pad, Pair dilation, int64_t groups) {
        const pykernels::Conv2dShape s = conv_shape_of_dims(x, w, stride, pad, dilation, groups);
        return std::pair<bool, bool>(pykernels::cpu::sums_directly(s),
                                     pykernels::cpu::sums_weight_gradient_directly(s));
      },
      py::arg("x_shape"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"),
      "Whether conv2d on these shapes sums directly (direct_conv_impl.inc): (forward and backward-input, "
      "backward-weight) (for tests).");
  def_layer_query(
      m, "conv2d_per_group",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return std::make_tuple(pykernels::cpu::conv2d_forward_per_group_chosen(s, itemsize),
                               pykernels::cpu::conv2d_backward_input_per_group_chosen(s, itemsize),
                               pykernels::cpu::conv2d_backward_weight_per_group_chosen(s, itemsize));
      },
      py::arg("itemsize"),
      "Whether conv2d's (forward, backward-input, backward-weight) on these grouped shapes, at itemsize bytes "
      "per value, run as one layer per group on Winograd (grouped_winograd.cpp) (for tests).");
  def_layer_query(
      m, "conv2d_small_group_winograd",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return std::make_tuple(pykernels::cpu::conv2d_small_group_winograd_chosen(s, itemsize) ||
                                   pykernels::cpu::conv2d_small_groups_directly_chosen(s, itemsize),
                               pykernels::cpu::conv2d_backward_input_small_group_winograd_chosen(s, itemsize) ||
                                   pykernels::cpu::conv2d_backward_input_small_groups_directly_chosen(s, itemsize),
                               pykernels::cpu::conv2d_backward_weight_small_groups_chosen(s, itemsize));
      },
      py::arg("itemsize"),
      "Whether conv2d's (forward, backward-input, backward-weight) on these grouped shapes, at itemsize bytes "
      "per value and on the active build, run with a group's channels in one to four vectors "
      "(small_group_conv.cpp: on F(2x2, 3x3) or summed directly) "
      "(for tests).");
  def_layer_query(
      m, "conv2d_by_phases",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return std::make_tuple(pykernels::cpu::conv2d_forward_by_phases_chosen(s, itemsize),
                               pykernels::cpu::conv2d_backward_input_by_phases_chosen(s, itemsize),
                               pykernels::cpu::conv2d_backward_weight_by_phases_chosen(s));
      },
      py::arg("itemsize"),
      "Whether conv2d's (forward, backward-input, backward-weight) on these dilated shapes, at itemsize bytes "
      "per value, run as the undilated layer over x's dilation phases (dilated_phases.cpp) (for tests).");
  def_layer_query(
      m, "conv2d_depthwise_channels_last",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return std::pair<bool, bool>(pykernels::cpu::conv2d_depthwise_channels_last_chosen(s, itemsize),
                                     pykernels::cpu::conv2d_depthwise_weight_channels_last_chosen(s, itemsize));
      },
      py::arg("itemsize"),
      "Whether conv2d on these depthwise shapes, at itemsize bytes per value, runs with the channels across "
      "the vector lanes (depthwise_conv.cpp): (forward and backward-input, backward-weight) (for tests).");
  def_layer_query(
      m, "conv2d_forward_reads_rows_in_place",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) -> py::object {
        if (pykernels::cpu::conv2d_winograd_chosen(s, itemsize) ||
            !pykernels::cpu::conv2d_forward_by_rows_chosen(s, itemsize))
          return py::none();
        return py::str(pykernels::cpu::conv2d_forward_reads_wide_rows(s, itemsize) ? "wide" : "per_row");
      },
      py::arg("itemsize"),
      "How conv2d forward on these shapes, at itemsize bytes per value, reads x in place from a phase-split "
      "copy (conv_rows.cpp): 'per_row', 'wide', or None where it packs im2col columns instead (for tests).");
  def_layer_query(
      m, "conv2d_forward_channels_last",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return !pykernels::cpu::conv2d_winograd_chosen(s, itemsize) &&
               !pykernels::cpu::conv2d_split_winograd_chosen(s, itemsize) &&
               pykernels::cpu::conv2d_forward_channels_last_chosen(s, itemsize);
      },
      py::arg("itemsize"),
      "Whether conv2d forward on these shapes, at itemsize bytes per value, runs as one GEMM per tap over "
      "channels-last copies of the images (channels_last_conv.cpp) (for tests).");
  def_layer_query(
      m, "conv2d_backward_input_channels_last",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return !pykernels::cpu::conv2d_backward_input_winograd_chosen(s, itemsize) &&
               pykernels::cpu::conv2d_backward_input_channels_last_chosen(s, itemsize);
      },
      py::arg("itemsize"),
      "Whether conv2d backward-input on these shapes, at itemsize bytes per value, runs as one GEMM per tap "
      "added into channels-last rows of grad_x (channels_last_conv.cpp) (for tests).");
  def_layer_query(
      m, "conv2d_backward_weight_channels_last",
      [](const pykernels::Conv2dShape& s, int64_t itemsize) {
        return pykernels::cpu::conv2d_backward_weight_channels_last_chosen(s, itemsize);  // asked first
      },
      py::arg("itemsize"),
      "Whether conv2d backward-weight on these shapes, at itemsize bytes per value, runs as one GEMM per tap "
      "over channels-last copies of x (channels_last_conv.cpp) (for tests).");
  m.def("conv_algorithm", &pykernels::cpu::conv_algorithm,
        "Convolution algorithm: 'auto' (Winograd for 3x3 stride-1 layers) or 'gemm' (implicit GEMM always).");
  m.def(
      "set_conv_algorithm",
      [](const std::string& name) {
        if (!pykernels::cpu::set_conv_algorithm(name.c_str()))
          throw ShapeError("algorithm must be 'auto' or 'gemm'; got '" + name + "'");
      },
      py::arg("name"), "Force the convolution algorithm (for tests).");
  m.def(
      "openmp_round_trip_ns",
      []() {
        py::gil_scoped_release release;
        return pykernels::cpu::openmp_round_trip_ns();
      },
      "Nanoseconds for two OpenMP threads to pass a cache line there and back (NaN with one thread): about "
      "80 where they share a cache here, 400 where they do not.");
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
