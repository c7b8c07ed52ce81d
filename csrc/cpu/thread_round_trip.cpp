// How long two OpenMP threads take to pass a cache line back and forth: the bench records it, because it
// tells whether the threads share a cache. On this project's VM it reads about 80 ns when its two cores
// share an L3 and about 400 ns at times when the host has put them on different ones; in the latter,
// every kernel that hands data from one thread to the other (Winograd's forward phases) runs up to 1.5-2x
// slower, and a table of timings means something else.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>

#include "cpu/parallel.hpp"

namespace pykernels::cpu {

namespace {

double one_measurement() {
  double result = std::numeric_limits<double>::quiet_NaN();
#ifdef _OPENMP
  using Clock = std::chrono::steady_clock;
  constexpr int64_t kMaxRounds = 20000;
  constexpr double kMaxSeconds = 0.05;  // two threads on one core pass only once per time slice
  alignas(64) std::atomic<int64_t> turn{0};
  alignas(64) std::atomic<bool> stop{false};
#pragma omp parallel num_threads(2)
  {
    if (omp_get_num_threads() == 2 && omp_get_thread_num() == 0) {
      const auto start = Clock::now();
      auto out_of_time = [&] { return std::chrono::duration<double>(Clock::now() - start).count() > kMaxSeconds; };
      int64_t rounds = 0;
      bool timed_out = false;
      while (rounds < kMaxRounds && !timed_out) {
        turn.store(2 * rounds + 1, std::memory_order_release);  // thread 1's turn
        for (int64_t spins = 1; turn.load(std::memory_order_acquire) != 2 * rounds + 2; ++spins)
          if (spins % 1024 == 0 && out_of_time()) {  // gives up on this round: thread 1 may never answer it
            timed_out = true;
            break;
          }
        rounds += !timed_out;
      }
      const double ns = std::chrono::duration<double, std::nano>(Clock::now() - start).count();
      stop.store(true);  // thread 1 leaves whether or not it answered
      result = ns / double(std::max<int64_t>(rounds, 1));
    } else if (omp_get_num_threads() == 2) {
      for (int64_t round = 0;; ++round) {
        while (turn.load(std::memory_order_acquire) != 2 * round + 1)
          if (stop.load()) break;
        if (stop.load()) break;
        turn.store(2 * round + 2, std::memory_order_release);
      }
    }
  }
#endif
  return result;
}

}  // namespace

// The least of three measurements: the first parallel region of a process starts the second thread, which
// may first wait for the core that the spinning first thread holds (one measurement read 8 ms).
double openmp_round_trip_ns() {
  double best = one_measurement();
  for (int i = 0; i < 2; ++i) best = std::min(best, one_measurement());  // NaN stays NaN
  return best;
}

}  // namespace pykernels::cpu
