// block_cache.hpp: a mutex-guarded list of unused blocks, oldest first, never destroyed (arrays can be
// freed during interpreter shutdown, after static destructors would have run).
#include "cpu/block_cache.hpp"

#include <cstdlib>
#include <limits>
#include <list>
#include <mutex>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef __unix__
#include <pthread.h>
#endif

namespace pykernels::cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;  // a transparent huge page
constexpr size_t kGrain = size_t(64) << 10;    // smaller blocks are rounded up to this

size_t cap_from_env() {
  const char* env = std::getenv("PYKERNELS_CPU_CACHE_MB");
  if (!env || !*env) return size_t(1024) << 20;
  // Digits only (strtoull would take "-5" as 2^64 - 5, no cap); not a number: the default (pykernels warns at
  // import); more than size_t holds in bytes: no cap (2^44 had wrapped round to a cap of 0).
  if (*env < '0' || *env > '9') return size_t(1024) << 20;
  char* end = nullptr;
  const unsigned long long mb = std::strtoull(env, &end, 10);
  if (*end != '\0') return size_t(1024) << 20;
  return mb > (std::numeric_limits<size_t>::max() >> 20) ? std::numeric_limits<size_t>::max() : size_t(mb) << 20;
}

struct Cache {
  std::mutex mutex;
  std::list<Block> unused;  // oldest first
  size_t unused_bytes = 0;
  const size_t cap = cap_from_env();
};

Cache& cache();

// Held around fork(), so that a child never starts with it locked by a thread it does not have.
void lock_for_fork() { cache().mutex.lock(); }
void unlock_after_fork() { cache().mutex.unlock(); }

Cache& cache() {
  static Cache* const instance = [] {
    auto* created = new Cache;  // deliberately leaked: see the file comment
#ifdef __unix__
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
#endif
    return created;
  }();
  return *instance;
}

// Blocks of a huge page or more are whole huge pages, so aligned and advised to be backed by them.
size_t capacity_for(size_t bytes) {
  const size_t grain = bytes >= kHugePage ? kHugePage : kGrain;
  return (bytes + grain - 1) / grain * grain;
}

void* allocate(size_t capacity) {
  void* p = std::aligned_alloc(capacity >= kHugePage ? kHugePage : 4096, capacity);
#ifdef __linux__
  if (p && capacity >= kHugePage) madvise(p, capacity, MADV_HUGEPAGE);  // fewer faults, TLB misses; a hint
#endif
  return p;
}

}  // namespace

Block take_block(size_t bytes) {
  const size_t capacity = capacity_for(bytes);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto it = c.unused.rbegin(); it != c.unused.rend(); ++it)  // the newest of that size: warmest
      if (it->capacity == capacity) {
        const Block block = *it;
        c.unused.erase(std::next(it).base());
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
  std::list<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (block.capacity > c.cap) {
      evicted.push_back(block);
    } else {
      c.unused.push_back(block);
      c.unused_bytes += block.capacity;
      while (c.unused_bytes > c.cap) {  // over the cap: the oldest go
        c.unused_bytes -= c.unused.front().capacity;
        evicted.splice(evicted.end(), c.unused, c.unused.begin());
      }
    }
  }
  for (const Block& b : evicted) std::free(b.data);
}

size_t clear_block_cache() {
  Cache& c = cache();
  std::list<Block> unused;
  size_t bytes;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    unused.swap(c.unused);
    bytes = c.unused_bytes;
    c.unused_bytes = 0;
  }
  for (const Block& b : unused) std::free(b.data);
  return bytes;
}

size_t block_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.unused_bytes;
}

}  // namespace pykernels::cpu
