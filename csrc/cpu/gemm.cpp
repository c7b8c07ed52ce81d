// Run-time choice between the AVX-512, AVX2+FMA and portable GEMM builds, and the parallel driver.
#include "cpu/gemm.hpp"
#include "cpu/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>


namespace pykernels::cpu {

#define PYKERNELS_DECLARE_GEMM(ns)                                                                           \
  namespace ns {                                                                                             \
  template <typename T>                                                                                      \
  void gemm(int64_t, int64_t, int64_t, const T*, MatrixView, const T*, MatrixView, T*, int64_t, bool);       \
  }
PYKERNELS_DECLARE_GEMM(portable)
#ifdef PYKERNELS_X86_ISAS
PYKERNELS_DECLARE_GEMM(avx2)
PYKERNELS_DECLARE_GEMM(avx512)
#endif
#undef PYKERNELS_DECLARE_GEMM

namespace {

enum class Isa { portable, avx2, avx512 };

bool cpu_supports(Isa isa) {
#if defined(PYKERNELS_X86_ISAS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::portable:
      return true;
  }
  return false;
#else
  return isa == Isa::portable;
#endif
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::portable, Isa::avx2, Isa::avx512})
    if (std::strcmp(name, isa == Isa::portable ? "portable" : isa == Isa::avx2 ? "avx2" : "avx512") == 0) {
      *out = isa;
      return true;
    }
  return false;
}

Isa initial_isa() {
  // PYKERNELS_CPU_ISA=portable|avx2 caps the choice (for tests and for bisecting a CPU issue).
  Isa forced;
  const char* env = std::getenv("PYKERNELS_CPU_ISA");
  if (env && parse_isa(env, &forced) && cpu_supports(forced)) return forced;
  for (Isa isa : {Isa::avx512, Isa::avx2})
    if (cpu_supports(isa)) return isa;
  return Isa::portable;
}

std::atomic<Isa>& current_isa() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

}  // namespace

const char* active_isa() {
  switch (current_isa().load()) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "portable";
  }
}

bool set_isa(const char* name) {
  Isa isa;
  if (!parse_isa(name, &isa) || !cpu_supports(isa)) return false;
  current_isa().store(isa);
  return true;
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, const T* B, MatrixView b, T* C,
          int64_t ldc, bool accumulate) {
  switch (current_isa().load()) {
#ifdef PYKERNELS_X86_ISAS
    case Isa::avx512:
      return avx512::gemm<T>(M, N, K, A, a, B, b, C, ldc, accumulate);
    case Isa::avx2:
      return avx2::gemm<T>(M, N, K, A, a, B, b, C, ldc, accumulate);
#endif
    default:
      return portable::gemm<T>(M, N, K, A, a, B, b, C, ldc, accumulate);
  }
}

template <typename T>
void gemm_parallel(int64_t M, int64_t N, int64_t K, const T* A, MatrixView a, const T* B, MatrixView b, T* C,
                   int64_t ldc, bool accumulate) {
  const int threads = available_threads();
  // Columns split in chunks of 64 so each thread's share is a whole number of register tiles; every C
  // element still sums over K in the serial order, so the bits do not depend on the thread count.
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  if (threads <= 1 || chunks <= 1 || M * N * K < (int64_t(1) << 18)) {
    gemm<T>(M, N, K, A, a, B, b, C, ldc, accumulate);
    return;
  }
  ParallelErrors errors;
#pragma omp parallel num_threads(threads)
  errors.run([&] {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t t = 0, nt = 1;
#endif
    const int64_t c0 = chunks * t / nt, c1 = chunks * (t + 1) / nt;
    const int64_t j0 = c0 * kChunk, j1 = std::min(N, c1 * kChunk);
    if (j1 > j0) gemm<T>(M, j1 - j0, K, A, a, B + j0 * b.col_stride, b, C + j0, ldc, accumulate);
  });
  errors.rethrow();
}

template void gemm<float>(int64_t, int64_t, int64_t, const float*, MatrixView, const float*, MatrixView, float*,
                          int64_t, bool);
template void gemm<double>(int64_t, int64_t, int64_t, const double*, MatrixView, const double*, MatrixView,
                           double*, int64_t, bool);
template void gemm_parallel<float>(int64_t, int64_t, int64_t, const float*, MatrixView, const float*, MatrixView,
                                   float*, int64_t, bool);
template void gemm_parallel<double>(int64_t, int64_t, int64_t, const double*, MatrixView, const double*,
                                    MatrixView, double*, int64_t, bool);

}  // namespace pykernels::cpu
