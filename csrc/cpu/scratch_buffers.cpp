// scratch_buffers.hpp: the buffers that hold memory, in one list, and the count of running kernels, under
// one mutex. Never destroyed: a thread's buffers are freed when it ends, which can be after static
// destructors have run (threads that end during interpreter shutdown).
#include "cpu/scratch_buffers.hpp"

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <new>

#ifdef __unix__
#include <pthread.h>
#endif
#ifdef __GLIBC__
#include <malloc.h>
#endif

namespace pykernels::cpu {

namespace {

struct Registry {
  std::mutex mutex;  // guards everything below, and every listed buffer's fields
  std::condition_variable changed;
  int64_t running = 0;     // kernel calls in flight
  bool releasing = false;  // a release waits for them or is freeing: new calls wait
  ScratchBuffer* head = nullptr;
};

Registry& registry();

// fork() copies the registry as other threads left it: its mutex possibly held, and kernel calls in flight
// on threads the child does not have, for which the child's empty_cache() would wait for ever. The mutex
// is taken around the fork, and the child starts with no call in flight (its buffers stay listed: the
// memory is the child's too).
void lock_for_fork() { registry().mutex.lock(); }
void unlock_after_fork() { registry().mutex.unlock(); }
void reset_in_child() {
  Registry& r = registry();
  r.running = 0;
  r.releasing = false;
  new (&r.changed) std::condition_variable;  // the parent's waiters are not in the child
  r.mutex.unlock();
}

Registry& registry() {
  static Registry* const r = [] {
    auto* created = new Registry;
#ifdef __unix__
    pthread_atfork(lock_for_fork, unlock_after_fork, reset_in_child);
#endif
    return created;
  }();
  return *r;
}

}  // namespace

ScratchBuffer::~ScratchBuffer() {
  std::lock_guard<std::mutex> lock(registry().mutex);
  free_locked();
}

void ScratchBuffer::free_locked() {
  if (!data_) return;
  Registry& r = registry();
  (prev_ ? prev_->next_ : r.head) = next_;
  if (next_) next_->prev_ = prev_;
  prev_ = next_ = nullptr;
  ::operator delete(data_, std::align_val_t(64));
  data_ = nullptr;
  bytes_ = 0;
}

void ScratchBuffer::grow(size_t bytes) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  // The old buffer goes first (peak memory is the new size, not both); should the new one not be had,
  // the buffer stays empty, and a later, smaller request allocates again.
  free_locked();
  data_ = ::operator new(bytes, std::align_val_t(64));  // may throw std::bad_alloc
  bytes_ = bytes;
  next_ = r.head;
  if (next_) next_->prev_ = this;
  r.head = this;
}

RunningKernel::RunningKernel() {
  Registry& r = registry();
  std::unique_lock<std::mutex> lock(r.mutex);
  r.changed.wait(lock, [&] { return !r.releasing; });
  ++r.running;
}

RunningKernel::~RunningKernel() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (--r.running == 0 && r.releasing) r.changed.notify_all();
}

size_t release_scratch_buffers() {
  Registry& r = registry();
  std::unique_lock<std::mutex> lock(r.mutex);
  r.changed.wait(lock, [&] { return !r.releasing; });  // one release at a time
  r.releasing = true;
  r.changed.wait(lock, [&] { return r.running == 0; });
  size_t released = 0;
  while (r.head) {
    released += r.head->bytes_;
    r.head->free_locked();
  }
  r.releasing = false;
  r.changed.notify_all();
  lock.unlock();
#ifdef __GLIBC__
  // Buffers of a few MB come from glibc's heap once its mmap threshold has risen (after the first large
  // free), and free() keeps those pages: 16 MB reported freed left the process's RSS where it was. Trimming
  // hands them back to the system (33 -> 1.4 MB above the baseline in that case).
  if (released > 0) malloc_trim(0);
#endif
  return released;
}

size_t scratch_bytes() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  size_t bytes = 0;
  for (const ScratchBuffer* b = r.head; b; b = b->next_) bytes += b->bytes_;
  return bytes;
}

}  // namespace pykernels::cpu
