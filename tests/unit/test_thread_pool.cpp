// ThreadPool's loops: every index is handed out exactly once, in ranges of the promised shape.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <vector>

#include "core/thread_pool.h"

namespace rwkvx {
namespace {

struct Seen {
  std::vector<std::atomic<int>> hits;
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  explicit Seen(int64_t n) : hits(size_t(n)) {}
  void take(int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[size_t(i)].fetch_add(1);
    std::lock_guard<std::mutex> lk(mu);
    ranges.emplace_back(b, e);
  }
  bool each_once() const {
    for (const auto& h : hits)
      if (h.load() != 1) return false;
    return true;
  }
};

TEST(ThreadPool, ParallelChunksCoversEachIndexOnceInChunks) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    for (auto [n, chunk] : {std::pair<int64_t, int64_t>{1000, 64}, {7, 3}, {64, 64}, {5, 100}, {1, 1}, {0, 4}}) {
      Seen seen(n);
      pool.parallel_chunks(n, chunk, [&](int64_t b, int64_t e) { seen.take(b, e); });
      EXPECT_TRUE(seen.each_once()) << "threads " << threads << " n " << n << " chunk " << chunk;
      for (auto [b, e] : seen.ranges) {
        if (n > chunk && threads > 1) {  // split: ranges start on chunk boundaries, whole but for the last
          EXPECT_EQ(b % chunk, 0);
          EXPECT_EQ(e - b, std::min(chunk, n - b));
        } else {
          EXPECT_EQ(b, 0);
          EXPECT_EQ(e, n);
        }
      }
    }
  }
}

TEST(ThreadPool, ParallelForCoversEachIndexOnceInGrains) {
  for (int threads : {1, 2, 5}) {
    ThreadPool pool(threads);
    for (auto [n, grain] : {std::pair<int64_t, int64_t>{1000, 64}, {7, 3}, {3, 8}}) {
      Seen seen(n);
      pool.parallel_for(n, grain, [&](int64_t b, int64_t e) { seen.take(b, e); });
      EXPECT_TRUE(seen.each_once()) << "threads " << threads << " n " << n << " grain " << grain;
      EXPECT_LE(seen.ranges.size(), size_t(threads));
      for (auto [b, e] : seen.ranges) EXPECT_EQ(b % grain, 0);
    }
  }
}

}  // namespace
}  // namespace rwkvx
