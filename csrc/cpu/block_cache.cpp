// block_cache.hpp: a mutex-guarded map from capacity to unused blocks, never destroyed (arrays can be
// freed during interpreter shutdown, after static destructors would have run).
#include "cpu/block_cache.hpp"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pykernels::cpu {

namespace {

constexpr size_t kPage = size_t(2) << 20;  // a transparent huge page

size_t cap_from_env() {
  const char* env = std::getenv("PYKERNELS_CPU_CACHE_MB");
  if (!env || !*env) return size_t(1024) << 20;
  char* end = nullptr;
  const unsigned long long mb = std::strtoull(env, &end, 10);
  if (*end != '\0') return size_t(1024) << 20;  // not a number: the default
  return size_t(mb) << 20;
}

struct Cache {
  std::mutex mutex;
  std::multimap<size_t, void*> unused;  // capacity -> block
  size_t unused_bytes = 0;
  const size_t cap = cap_from_env();
};

Cache& cache() {
  static Cache* const instance = new Cache;  // deliberately leaked: see the file comment
  return *instance;
}

void* allocate(size_t capacity) {
  void* p = std::aligned_alloc(kPage, capacity);
#ifdef __linux__
  if (p) madvise(p, capacity, MADV_HUGEPAGE);  // fewer faults and TLB misses; a hint only
#endif
  return p;
}

}  // namespace

Block take_block(size_t bytes) {
  const size_t capacity = (bytes + kPage - 1) / kPage * kPage;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.unused.find(capacity);
    if (it != c.unused.end()) {
      Block block{it->second, capacity};
      c.unused.erase(it);
      c.unused_bytes -= capacity;
      return block;
    }
  }
  void* p = allocate(capacity);
  if (!p) {
    clear_block_cache();
    p = allocate(capacity);
  }
  if (!p) throw std::bad_alloc();
  return Block{p, capacity};
}

void give_back_block(Block block) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.unused_bytes + block.capacity <= c.cap) {
      c.unused.emplace(block.capacity, block.data);
      c.unused_bytes += block.capacity;
      return;
    }
  }
  std::free(block.data);
}

size_t clear_block_cache() {
  Cache& c = cache();
  std::multimap<size_t, void*> unused;
  size_t bytes;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    unused.swap(c.unused);
    bytes = c.unused_bytes;
    c.unused_bytes = 0;
  }
  for (auto& entry : unused) std::free(entry.second);
  return bytes;
}

size_t block_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.unused_bytes;
}

}  // namespace pykernels::cpu
