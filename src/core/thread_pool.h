// A fixed pool of worker threads for data-parallel loops. Idle workers spin for a few milliseconds before
// sleeping: decode issues ~100 small parallel loops per token, and waking a sleeping thread cost ~1.1 ms
// on the 2-core development VM (futex + hypervisor IPI), which made 2 threads 5x slower than 1.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace rwkvx {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads <= 0: one per hardware thread
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }
  // Runs fn(thread_index, n_threads) on every thread (the caller is thread 0) and waits for all.
  void run(const std::function<void(int, int)>& fn);
  // Splits [0, n) into contiguous ranges, one per thread, in multiples of `grain`.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
  // Splits [0, n) into ranges of `chunk` that threads claim one at a time: on a machine whose cores run at
  // uneven speed (a VM's neighbours) no thread waits long for a slower one's fixed share.
  void parallel_chunks(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker(int index);
  int n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
};

}  // namespace rwkvx
