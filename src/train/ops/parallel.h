// Threads inside one sequence's training ops. The caller installs a thread pool for its thread
// (OpThreadsScope); the float fast ops (fast.h) split their work into tasks whose boundaries are fixed by
// the shapes alone, never by the number of threads, and every output element is computed by exactly one
// task in a fixed order. So the results are bit-identical for any thread count, which the trainer's
// exact resume (with a different `threads`) relies on.
#pragma once
#include <cstdint>
#include <functional>

#include "core/thread_pool.h"

namespace rwkvx::train {

// The calling thread's pool for op-level threads; null = single-threaded (the default).
ThreadPool* op_pool();

// Installs `pool` (may be null) for the calling thread until destruction; scopes nest.
class OpThreadsScope {
 public:
  explicit OpThreadsScope(ThreadPool* pool);
  ~OpThreadsScope();
  OpThreadsScope(const OpThreadsScope&) = delete;
  OpThreadsScope& operator=(const OpThreadsScope&) = delete;

 private:
  ThreadPool* saved_;
};

// Runs fn(i) for i in [0, n_tasks) on the installed pool (each idle thread takes the next task), or
// inline. `work` is a rough cost of the whole loop in multiply-adds: small loops stay on the
// calling thread, where the hand-off would cost more than it saves. fn must not depend on which thread
// runs it, and tasks must write disjoint outputs.
void parallel_tasks(int64_t n_tasks, double work, const std::function<void(int64_t)>& fn);

// Fixed task boundaries: [0, n) in pieces of `grain` (the last one shorter).
inline int64_t n_pieces(int64_t n, int64_t grain) { return (n + grain - 1) / grain; }

}  // namespace rwkvx::train
