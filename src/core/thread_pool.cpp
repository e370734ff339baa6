#include "core/thread_pool.h"

#include <algorithm>
#include <chrono>

#include <sched.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define RWKVX_PAUSE() _mm_pause()
#else
#define RWKVX_PAUSE() ((void)0)
#endif

namespace rwkvx {

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = n_threads;
  for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  while (true) {
    // Spin while jobs keep coming: pause briefly, then yield (so a loaded machine loses nothing), and
    // after 5 ms without work, sleep.
    constexpr auto kSpin = std::chrono::milliseconds(5);
    const auto spin_start = std::chrono::steady_clock::now();
    for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
      if (spins < 2000) {
        RWKVX_PAUSE();
      } else {
        sched_yield();
        if (spins % 64 == 0 && std::chrono::steady_clock::now() - spin_start > kSpin) break;
      }
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      sleepers_.fetch_add(1);
      cv_.wait(lk, [&] { return generation_.load() != seen; });
      sleepers_.fetch_sub(1);
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_) return;
    (*job_)(index, n_threads_);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  if (n_threads_ == 1) {
    fn(0, 1);
    return;
  }
  bool wake;
  {
    // Sleepers register under the mutex before re-checking the generation, so no wake-up is lost.
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &fn;
    pending_.store(n_threads_ - 1, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    wake = sleepers_.load() > 0;
  }
  if (wake) cv_.notify_all();
  fn(0, n_threads_);
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 2000) RWKVX_PAUSE();
    else sched_yield();
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t units = (n + grain - 1) / grain;
  const int use = int(std::min<int64_t>(n_threads_, units));
  if (use <= 1) {
    fn(0, n);
    return;
  }
  run([&](int t, int) {
    if (t >= use) return;
    const int64_t u0 = units * t / use, u1 = units * (t + 1) / use;
    const int64_t b = u0 * grain, e = std::min(n, u1 * grain);
    if (b < e) fn(b, e);
  });
}

void ThreadPool::parallel_chunks(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t units = (n + chunk - 1) / chunk;
  if (units <= 1 || n_threads_ == 1) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  run([&](int, int) {
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
         u = next.fetch_add(1, std::memory_order_relaxed))
      fn(u * chunk, std::min(n, (u + 1) * chunk));
  });
}

}  // namespace rwkvx
