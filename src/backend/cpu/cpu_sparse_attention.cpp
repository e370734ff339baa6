// Sparse attention (spec model.md §5) on the CPU: per query slot and head, an fp64-accumulated gate over
// the complete past chunks, top-(k-1) selection (ties: lower chunk), then one flash-style pass over the
// selected chunks and the causal own chunk. Work is split over (query, head) pairs.
#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.h"

namespace rwkvx::cpu {

void CpuBackend::sparse_attention(const Tensor& q, const KvCache& cache, const SparseAttnParams& p, Tensor& out) {
  const int64_t T = q.rows(), C = q.row_size(), D = p.head_dim, H = C / D, c = cache.chunk;
  const int64_t first = cache.len - T;
  RWKVX_ASSERT(first >= 0 && C % D == 0, "sparse_attention: queries exceed the cache");
  const float scale = 1.0f / std::sqrt(float(D));
  auto run = [&](int64_t j0, int64_t j1) {
    std::vector<double> score;
    std::vector<int64_t> chosen, ranges;
    for (int64_t job = j0; job < j1; ++job) {
      const int64_t t = first + job / H, h = job % H, own = t / c;
      const float* qh = q.f32() + (t - first) * C + h * D;
      score.resize(size_t(own));
      for (int64_t n = 0; n < own; ++n) score[size_t(n)] = k_->dot_f64(qh, cache.chunk_mean.f32() + n * C + h * D, D);
      // Top-(k-1) by (score desc, chunk asc): a few linear scans, k is small.
      const int64_t n_sel = std::min<int64_t>(p.top_k - 1, own);
      chosen.clear();
      for (int64_t i = 0; i < n_sel; ++i) {
        int64_t best = -1;
        for (int64_t n = 0; n < own; ++n) {
          if (std::find(chosen.begin(), chosen.end(), n) != chosen.end()) continue;
          if (best < 0 || score[size_t(n)] > score[size_t(best)]) best = n;
        }
        chosen.push_back(best);
      }
      std::sort(chosen.begin(), chosen.end());  // visit keys in memory order
      ranges.clear();
      for (int64_t n : chosen) ranges.push_back(n * c), ranges.push_back((n + 1) * c);
      ranges.push_back(own * c), ranges.push_back(t + 1);
      k_->attend(qh, cache.k.f32() + h * D, cache.v.f32() + h * D, C, ranges.data(), int(ranges.size() / 2), D, scale,
                 out.f32() + (t - first) * C + h * D);
    }
  };
  pool().parallel_for(T * H, 1, run);
}

}  // namespace rwkvx::cpu
