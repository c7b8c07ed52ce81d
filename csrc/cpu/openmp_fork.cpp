// GNU OpenMP's worker threads do not survive fork(): in a child forked after a parallel region (Python's
// multiprocessing with its 'fork' start method, the default on Linux before 3.14), the forking thread's
// next parallel region waits for its old workers for ever. Its pool is the only broken one (every thread
// that starts parallel regions has its own), so the child runs that thread's regions on one thread:
// pykernels calls in a forked child are serial instead of hanging (measured: a 2x16x32x32 conv2d hung
// for good in the child of a parent that had run one). LLVM's OpenMP restarts its threads after fork.
#include "cpu/parallel.hpp"

#if defined(_OPENMP) && defined(__GNUC__) && !defined(__clang__) && defined(__unix__)
#include <pthread.h>
#define PYKERNELS_GOMP_FORK_GUARD 1
#endif

namespace pykernels::cpu {

void keep_forked_children_serial() {
#ifdef PYKERNELS_GOMP_FORK_GUARD
  static const int registered = pthread_atfork(nullptr, nullptr, [] { omp_set_num_threads(1); });
  (void)registered;
#endif
}

}  // namespace pykernels::cpu
