// The one piece of state the kernels share: a test switch that forces 64-bit index arithmetic, so
// the tests can run the kernels' 64-bit paths on small tensors (kernels.hpp).
#include <atomic>

#include "cuda/kernels.hpp"

namespace pykernels::cuda {

namespace {
std::atomic<bool> g_force_int64{false};
}

void set_force_int64_indexing(bool on) { g_force_int64.store(on); }
bool force_int64_indexing() { return g_force_int64.load(); }

}  // namespace pykernels::cuda
