#include "train/ops/parallel.h"

#include <algorithm>
#include <atomic>

namespace rwkvx::train {
namespace {
thread_local ThreadPool* tl_pool = nullptr;
// Below this many multiply-adds a loop runs inline: a pool hand-off costs a few microseconds.
constexpr double kMinParallelWork = 1 << 16;
}  // namespace

ThreadPool* op_pool() { return tl_pool; }

OpThreadsScope::OpThreadsScope(ThreadPool* pool) : saved_(tl_pool) { tl_pool = pool; }
OpThreadsScope::~OpThreadsScope() { tl_pool = saved_; }

void parallel_tasks(int64_t n_tasks, double work, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  ThreadPool* pool = tl_pool;
  if (!pool || pool->size() == 1 || n_tasks == 1 || work < kMinParallelWork) {
    for (int64_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  // Dynamic hand-out balances uneven tasks; which thread runs a task never changes its result. The pool
  // is cleared for the workers' duration so nested calls from inside fn run inline.
  std::atomic<int64_t> next{0};
  tl_pool = nullptr;
  pool->run([&](int, int) {
    ThreadPool* const outer = tl_pool;
    tl_pool = nullptr;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) fn(i);
    tl_pool = outer;
  });
  tl_pool = pool;
}

}  // namespace rwkvx::train
