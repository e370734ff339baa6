// Host side of the CUDA embedding backward (train_ops_cuda.h): the token positions grouped by id, so that
// each distinct id's rows can be summed by one block, in t order, without atomics.
#include <algorithm>
#include <numeric>

#include "train/cuda/train_ops_cuda.h"

namespace rwkvx::train::cuda {

EmbeddingGradPlan embedding_grad_plan(const int32_t* ids, int64_t T) {
  EmbeddingGradPlan plan;
  plan.order.resize(size_t(std::max<int64_t>(T, 0)));
  std::iota(plan.order.begin(), plan.order.end(), 0);
  // Stable: positions of one id stay in t order.
  std::stable_sort(plan.order.begin(), plan.order.end(), [ids](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  for (size_t p = 0; p < plan.order.size(); ++p)
    if (p == 0 || ids[plan.order[p]] != ids[plan.order[p - 1]]) {
      plan.uniq.push_back(ids[plan.order[p]]);
      plan.starts.push_back(int32_t(p));
    }
  plan.starts.push_back(int32_t(plan.order.size()));
  return plan;
}

}  // namespace rwkvx::train::cuda
