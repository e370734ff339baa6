// Sparse attention (spec model.md §5) on the CPU. Every query slot and head gets an fp64-accumulated gate
// over the complete past chunks and a top-(k-1) selection (ties: lower chunk). Then:
//  * decode (few queries): one flash-style pass per (query, head) over the selected chunks + own chunk;
//  * prefill: per (head, block of queries), the queries that chose a chunk are gathered and attend to
//    it 256 keys at a time under an online softmax (Kernels::attend_block: the queries sit in vector
//    lanes; the head's slice of the chunk is first copied contiguous when 32 or more queries share it),
//    and the causal own chunk likewise. Prefill cost per token is then flat in the context length, once
//    every query has its past chunks to choose.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.h"

namespace rwkvx::cpu {
namespace {

constexpr int64_t kRowBlock = 128;       // queries per group in lanes
constexpr int64_t kKeyBlock = 256;       // keys per online-softmax step: a 256 × 128 score tile is 128 KB
constexpr int64_t kGroupedMinRows = 16;  // below this, the per-query path is cheaper
constexpr int64_t kPackMinQueries = 32;  // queries over the same slots that pay for packing them

// Chooses the top-(k-1) past chunks for query head `qh` (sorted by chunk index).
void select_chunks(const Kernels& k, const float* qh, const KvCache& cache, int64_t own, int64_t h, int64_t D,
                   int top_k, std::vector<double>& score, std::vector<int64_t>& chosen) {
  const int64_t C = cache.k.row_size();
  score.resize(size_t(own));
  for (int64_t n = 0; n < own; ++n) score[size_t(n)] = k.dot_f64(qh, cache.chunk_mean.f32() + n * C + h * D, D);
  const int64_t n_sel = std::min<int64_t>(top_k - 1, own);
  chosen.clear();
  for (int64_t i = 0; i < n_sel; ++i) {
    int64_t best = -1;
    for (int64_t n = 0; n < own; ++n) {
      if (std::find(chosen.begin(), chosen.end(), n) != chosen.end()) continue;
      if (best < 0 || score[size_t(n)] > score[size_t(best)]) best = n;
    }
    chosen.push_back(best);
  }
  std::sort(chosen.begin(), chosen.end());
}

// Online-softmax state of a block of queries for one head.
struct OnlineSoftmax {
  std::vector<float> m, l, acc;  // per query: running max, running sum, D accumulators
  void reset(int64_t rows, int64_t D) {
    m.assign(size_t(rows), -INFINITY);
    l.assign(size_t(rows), 0.f);
    acc.assign(size_t(rows * D), 0.f);
  }
};

}  // namespace

void CpuBackend::sparse_attention(const Tensor& q, const KvCache& cache, const SparseAttnParams& p, Tensor& out) {
  const int64_t T = q.rows(), C = q.row_size(), D = p.head_dim, H = C / D, c = cache.chunk;
  const int64_t first = cache.len - T;
  RWKVX_ASSERT(first >= 0 && C % D == 0, "sparse_attention: queries exceed the cache");
  const float scale = 1.0f / std::sqrt(float(D));
  const Kernels& k = *k_;
  RWKVX_ASSERT(cache.dtype == DType::f32 || cache.dtype == DType::bf16, "sparse_attention: KV cache must be f32 or bf16");
  const WFormat kv_fmt = cache.dtype == DType::bf16 ? WFormat::bf16 : WFormat::f32;
  const size_t kv_es = dtype_size(cache.dtype);
  // Element offset `e` into the cache's k or v storage.
  auto kv_ptr = [&](const Tensor& t, int64_t e) { return static_cast<const char*>(t.data) + size_t(e) * kv_es; };

  if (T < kGroupedMinRows) {
    pool().parallel_for(T * H, 1, [&](int64_t j0, int64_t j1) {
      std::vector<double> score;
      std::vector<int64_t> chosen, ranges;
      for (int64_t job = j0; job < j1; ++job) {
        const int64_t t = first + job / H, h = job % H, own = t / c;
        const float* qh = q.f32() + (t - first) * C + h * D;
        select_chunks(k, qh, cache, own, h, D, p.top_k, score, chosen);
        ranges.clear();
        for (int64_t n : chosen) ranges.push_back(n * c), ranges.push_back((n + 1) * c);
        ranges.push_back(own * c), ranges.push_back(t + 1);
        k.attend(qh, kv_ptr(cache.k, h * D), kv_ptr(cache.v, h * D), kv_fmt, C, ranges.data(), int(ranges.size() / 2),
                 D, scale, out.f32() + (t - first) * C + h * D);
      }
    });
    return;
  }

  // Prefill. A job is one head and a block of consecutive queries. Its queries are grouped by the
  // chunks they chose, so each chosen chunk is read once for all of them; the causal own chunks likewise.
  // Scores are computed kKeyBlock keys at a time (two small GEMMs per block under an online softmax), so
  // the working set stays in L2 at any context length.
  // Larger query blocks put more queries on each chosen chunk (bigger GEMMs); split only as far as needed
  // to give every thread two jobs.
  const int64_t min_blocks = (2 * int64_t(pool().size()) + H - 1) / H;
  const int64_t block = std::max<int64_t>(kRowBlock, (T + min_blocks - 1) / min_blocks);
  const int64_t n_blocks = (T + block - 1) / block;
  pool().parallel_chunks(n_blocks * H, 1, [&](int64_t j0, int64_t j1) {
    std::vector<double> score;
    std::vector<int64_t> chosen, rows;
    std::vector<std::vector<int64_t>> by_chunk;
    // A group of ≤ kRowBlock queries in lanes: transposed queries and accumulators, running max and sum,
    // per-query key counts of the current key block, and the scores of that block.
    std::vector<float> qT, accT, gm, gl, lim, sbuf(size_t(kKeyBlock * kRowBlock));
    // Where the attended keys and values are: slot j at kv_k + (j − kv_k0)·kv_ld elements. When enough
    // queries share them, the head's slice is packed contiguously ([slot][D]) first: the cache's rows are
    // C apart, a 4 KiB page each, so every group of queries would walk the TLB and defeat the hardware
    // prefetcher again; packed, the slots are read from DRAM once and then from L2.
    std::vector<char> kpack, vpack;
    const char *kv_k = nullptr, *kv_v = nullptr;
    int64_t kv_ld = C, kv_k0 = 0;
    OnlineSoftmax st;
    for (int64_t job = j0; job < j1; ++job) {
      const int64_t h = job % H, q0 = first + (job / H) * block, q1 = std::min(cache.len, q0 + block);
      const int64_t nq = q1 - q0;
      auto qrow = [&](int64_t t) { return q.f32() + (t - first) * C + h * D; };
      st.reset(nq, D);
      by_chunk.assign(size_t(q1 / c), {});
      for (int64_t t = q0; t < q1; ++t) {
        select_chunks(k, qrow(t), cache, t / c, h, D, p.top_k, score, chosen);
        for (int64_t n : chosen) by_chunk[size_t(n)].push_back(t - q0);
      }

      // Queries `rows` (block-relative, at most kRowBlock, ascending) attend to key slots [k0, k1); with
      // `causal`, query slot t sees only slots ≤ t. Their softmax state moves into lanes and back.
      auto attend_rows = [&](const int64_t* rows_p, int64_t m, int64_t k0, int64_t k1, bool causal) {
        const int64_t mp = (m + k.attn_lanes - 1) / k.attn_lanes * k.attn_lanes;
        qT.assign(size_t(D * mp), 0.f);
        accT.assign(size_t(D * mp), 0.f);
        gm.assign(size_t(mp), -INFINITY);
        gl.assign(size_t(mp), 0.f);
        lim.assign(size_t(mp), 0.f);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = rows_p[i];
          const float* qr = qrow(q0 + r);
          for (int64_t d = 0; d < D; ++d) {
            qT[size_t(d * mp + i)] = qr[d];
            accT[size_t(d * mp + i)] = st.acc[size_t(r * D + d)];
          }
          gm[size_t(i)] = st.m[size_t(r)];
          gl[size_t(i)] = st.l[size_t(r)];
        }
        const int64_t last_slot = q0 + rows_p[m - 1];
        for (int64_t b0 = k0; b0 < k1; b0 += kKeyBlock) {
          if (causal && b0 > last_slot) break;
          // Causal: no key past the group's last query, and a mask only where some query sees part of it.
          const int64_t nk = std::min(kKeyBlock, (causal ? last_slot + 1 : k1) - b0);
          const bool masked = causal && q0 + rows_p[0] - b0 + 1 < nk;
          if (masked)
            for (int64_t i = 0; i < m; ++i) lim[size_t(i)] = float(std::clamp<int64_t>(q0 + rows_p[i] - b0 + 1, 0, nk));
          const size_t off = size_t((b0 - kv_k0) * kv_ld) * kv_es;
          k.attend_block(qT.data(), mp, D, kv_k + off, kv_v + off, kv_fmt, kv_ld, nk,
                         masked ? lim.data() : nullptr, scale, sbuf.data(), gm.data(), gl.data(), accT.data());
        }
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = rows_p[i];
          for (int64_t d = 0; d < D; ++d) st.acc[size_t(r * D + d)] = accT[size_t(d * mp + i)];
          st.m[size_t(r)] = gm[size_t(i)];
          st.l[size_t(r)] = gl[size_t(i)];
        }
      };
      auto attend_all = [&](const std::vector<int64_t>& rs, int64_t k0, int64_t k1, bool causal) {
        kv_k = kv_ptr(cache.k, h * D), kv_v = kv_ptr(cache.v, h * D), kv_ld = C, kv_k0 = 0;
        if (int64_t(rs.size()) >= kPackMinQueries) {
          const size_t row_bytes = size_t(D) * kv_es;
          kpack.resize(size_t(k1 - k0) * row_bytes);
          vpack.resize(size_t(k1 - k0) * row_bytes);
          for (int64_t j = k0; j < k1; ++j) {
            std::memcpy(kpack.data() + size_t(j - k0) * row_bytes, kv_ptr(cache.k, j * C + h * D), row_bytes);
            std::memcpy(vpack.data() + size_t(j - k0) * row_bytes, kv_ptr(cache.v, j * C + h * D), row_bytes);
          }
          kv_k = kpack.data(), kv_v = vpack.data(), kv_ld = D, kv_k0 = k0;
        }
        for (size_t i = 0; i < rs.size(); i += size_t(kRowBlock))
          attend_rows(rs.data() + i, std::min<int64_t>(kRowBlock, int64_t(rs.size() - i)), k0, k1, causal);
      };

      for (size_t n = 0; n < by_chunk.size(); ++n)
        if (!by_chunk[n].empty()) attend_all(by_chunk[n], int64_t(n) * c, int64_t(n + 1) * c, false);
      // Own chunks: the block's queries grouped by chunk, each group over its chunk's slots up to its last query.
      for (int64_t r0 = 0; r0 < nq;) {
        const int64_t own = (q0 + r0) / c;
        int64_t r1 = r0;
        while (r1 < nq && (q0 + r1) / c == own) ++r1;
        rows.clear();
        for (int64_t r = r0; r < r1; ++r) rows.push_back(r);
        attend_all(rows, own * c, q0 + r1, true);
        r0 = r1;
      }
      for (int64_t r = 0; r < nq; ++r) {
        float* o = out.f32() + (q0 + r - first) * C + h * D;
        const float inv = 1.0f / st.l[size_t(r)];
        for (int64_t d = 0; d < D; ++d) o[d] = st.acc[size_t(r * D + d)] * inv;
      }
    }
  });
}

}  // namespace rwkvx::cpu
