// Reference loops for the sparse-attention (MoBA) ops of the contract: KV-cache append with chunk means,
// top-k chunk attention (spec model.md §5) and the optional official eviction policy (§7.4).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "backend/reference/reference_backend.h"

namespace rwkvx::ref {
namespace {

// Cache rows are f32 or bf16 (KvCache::dtype); the reference reads one element at a time, widened.
float kv_at(const Tensor& t, int64_t i) {
  return t.dtype == DType::bf16 ? bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]) : static_cast<const float*>(t.data)[i];
}

// Writes n fp32 values into cache rows starting at element i, rounding to the cache's precision.
void kv_store(Tensor& t, int64_t i, const float* src, int64_t n) {
  if (t.dtype == DType::bf16) {
    auto* d = static_cast<uint16_t*>(t.data) + i;
    for (int64_t j = 0; j < n; ++j) d[j] = f32_to_bf16(src[j]);
  } else {
    std::memcpy(static_cast<float*>(t.data) + i, src, size_t(n) * 4);
  }
}

// Fills the means of chunks [from, len / chunk).
void update_chunk_means(KvCache& c, int64_t from) {
  const int64_t C = c.k.row_size();
  c.n_chunks = c.len / c.chunk;
  for (int64_t n = from; n < c.n_chunks; ++n) {
    for (int64_t ch = 0; ch < C; ++ch) {
      double sum = 0;
      for (int64_t s = n * c.chunk; s < (n + 1) * c.chunk; ++s) sum += kv_at(c.k, s * C + ch);
      c.chunk_mean.f32()[n * C + ch] = float(sum / double(c.chunk));
    }
  }
}

// Room for `rows` rows of C values in k, v and the chunk means (a multiple of the chunk), contents kept.
void grow_cache(Backend& be, KvCache& cache, int64_t rows, int64_t C, int chunk) {
  RWKVX_ASSERT(cache.k.empty() || cache.k.row_size() == C, "kv_append: row size changed");
  const int64_t cap = (rows + chunk - 1) / chunk * chunk;
  const size_t es = dtype_size(cache.dtype);
  // Rows past len are never read: no need to clear them.
  Tensor nk = be.alloc_uninit(cache.dtype, {cap, C}), nv = be.alloc_uninit(cache.dtype, {cap, C});
  Tensor nm = be.alloc_uninit(DType::f32, {cap / chunk, C});
  if (cache.len > 0) {
    std::memcpy(nk.data, cache.k.data, size_t(cache.len * C) * es);
    std::memcpy(nv.data, cache.v.data, size_t(cache.len * C) * es);
    std::memcpy(nm.data, cache.chunk_mean.data, size_t(cache.n_chunks * C) * 4);
  }
  cache.k = nk;
  cache.v = nv;
  cache.chunk_mean = nm;
}

}  // namespace

void ReferenceBackend::kv_append(KvCache& cache, const Tensor& k, const Tensor& v, int chunk) {
  const int64_t T = k.rows(), C = k.row_size();
  RWKVX_ASSERT(chunk > 0 && (cache.len == 0 || cache.chunk == chunk), "kv_append: chunk size changed");
  RWKVX_ASSERT(cache.dtype == DType::f32 || cache.dtype == DType::bf16, "kv_append: KV cache must be f32 or bf16");
  cache.chunk = chunk;
  const int64_t need = cache.len + T;
  const int64_t cap = cache.k.empty() ? 0 : cache.k.rows();
  if (need > cap) grow_cache(*this, cache, std::max<int64_t>(need, 2 * cap), C, chunk);
  kv_store(cache.k, cache.len * C, k.f32(), T * C);
  kv_store(cache.v, cache.len * C, v.f32(), T * C);
  cache.len = need;
  update_chunk_means(cache, cache.n_chunks);
}

void ReferenceBackend::sparse_attention(const Tensor& q, const KvCache& cache, const SparseAttnParams& p,
                                        Tensor& out) {
  const int64_t T = q.rows(), C = q.row_size(), D = p.head_dim, H = C / D, c = cache.chunk;
  const int64_t first = cache.len - T;
  RWKVX_ASSERT(first >= 0 && C % D == 0, "sparse_attention: queries exceed the cache");
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> score, logit;
  std::vector<int64_t> order, keys;
  std::vector<double> acc(static_cast<size_t>(D));
  for (int64_t t = first; t < cache.len; ++t) {
    const int64_t j = t / c;
    RWKVX_ASSERT(j <= cache.n_chunks, "sparse_attention: chunk means missing");
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q.f32() + (t - first) * C + h * D;
      // Gate: score every complete past chunk by q · mean(k) in fp32 inputs, double accumulation.
      score.assign(size_t(j), 0.0);
      for (int64_t n = 0; n < j; ++n) {
        const float* m = cache.chunk_mean.f32() + n * C + h * D;
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(qh[d]) * m[d];
        score[size_t(n)] = s;
      }
      order.resize(size_t(j));
      std::iota(order.begin(), order.end(), 0);
      const int64_t n_sel = std::min<int64_t>(p.top_k - 1, j);
      std::partial_sort(order.begin(), order.begin() + n_sel, order.end(), [&](int64_t a, int64_t b) {
        return score[size_t(a)] != score[size_t(b)] ? score[size_t(a)] > score[size_t(b)] : a < b;
      });
      keys.clear();
      for (int64_t i = 0; i < n_sel; ++i)
        for (int64_t s = order[size_t(i)] * c; s < (order[size_t(i)] + 1) * c; ++s) keys.push_back(s);
      for (int64_t s = j * c; s <= t; ++s) keys.push_back(s);
      // One softmax over the union of the selected chunks and the causal own chunk.
      logit.resize(keys.size());
      double mx = -INFINITY;
      for (size_t i = 0; i < keys.size(); ++i) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(qh[d]) * kv_at(cache.k, keys[i] * C + h * D + d);
        logit[i] = s * scale;
        mx = std::max(mx, logit[i]);
      }
      double denom = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t i = 0; i < keys.size(); ++i) {
        const double e = std::exp(logit[i] - mx);
        denom += e;
        for (int64_t d = 0; d < D; ++d) acc[size_t(d)] += e * kv_at(cache.v, keys[i] * C + h * D + d);
      }
      float* o = out.f32() + (t - first) * C + h * D;
      for (int64_t d = 0; d < D; ++d) o[d] = float(acc[size_t(d)] / denom);
    }
  }
}

void ReferenceBackend::kv_evict(KvCache& cache, const Tensor& q, const KvEvictionParams& e,
                                const SparseAttnParams& p) {
  const int64_t L = cache.len;
  if (e.max_len <= 0 || L <= e.max_len || L <= e.min_len || L <= e.window) return;
  const int64_t C = cache.k.row_size(), D = p.head_dim, H = C / D, T = q.rows();
  const int64_t past = L - e.window, keep = std::min(e.min_len - e.window, past);
  const double scale = 1.0 / std::sqrt(double(D));
  const size_t es = dtype_size(cache.dtype);
  Tensor nk = alloc(cache.dtype, {cache.k.rows(), C}), nv = alloc(cache.dtype, {cache.k.rows(), C});
  std::vector<double> votes(static_cast<size_t>(past)), logit(static_cast<size_t>(past));
  std::vector<int64_t> order(static_cast<size_t>(past));
  for (int64_t h = 0; h < H; ++h) {
    std::fill(votes.begin(), votes.end(), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const float* qh = q.f32() + t * C + h * D;
      double mx = -INFINITY, denom = 0;
      for (int64_t s = 0; s < past; ++s) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(qh[d]) * kv_at(cache.k, s * C + h * D + d);
        logit[size_t(s)] = dot * scale;
        mx = std::max(mx, logit[size_t(s)]);
      }
      for (int64_t s = 0; s < past; ++s) denom += (logit[size_t(s)] = std::exp(logit[size_t(s)] - mx));
      for (int64_t s = 0; s < past; ++s) votes[size_t(s)] += logit[size_t(s)] / denom;
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return votes[size_t(a)] > votes[size_t(b)]; });
    // This head's columns: the kept rows in descending-vote order, then the recent window in order.
    for (int64_t r = 0; r < keep + e.window; ++r) {
      const int64_t src = r < keep ? order[size_t(r)] : past + (r - keep);
      const size_t to = size_t(r * C + h * D) * es, from = size_t(src * C + h * D) * es;
      std::memcpy(static_cast<char*>(nk.data) + to, static_cast<const char*>(cache.k.data) + from, size_t(D) * es);
      std::memcpy(static_cast<char*>(nv.data) + to, static_cast<const char*>(cache.v.data) + from, size_t(D) * es);
    }
  }
  cache.k = nk;
  cache.v = nv;
  cache.len = keep + e.window;
  update_chunk_means(cache, 0);
}

}  // namespace rwkvx::ref
