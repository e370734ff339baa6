// The sparse-attention (MoBA) block of RWKV-X, attention half (spec model.md §5): q/k/v projections,
// optional official KV eviction (§7.4, off by default), cache append, top-k chunk attention, output.
#include "model/model.h"

namespace rwkvx {

void sparse_attention_block(Backend& be, const SparseBlockWeights& w, const ModelConfig& cfg, const Tensor& x,
                            std::vector<KvCache>& caches, const SeqBatch& batch, Tensor& out) {
  const int64_t T = x.rows(), C = cfg.n_embd;
  // q, k, v, o: whole outputs of linear / sparse_attention (every row belongs to a sequence of the batch).
  Tensor q = be.alloc_uninit(DType::f32, {T, C}), k = be.alloc_uninit(DType::f32, {T, C});
  Tensor v = be.alloc_uninit(DType::f32, {T, C});
  be.linear(x, w.query, q);
  be.linear(x, w.key, k);
  be.linear(x, w.value, v);
  Tensor o = be.alloc_uninit(DType::f32, {T, C});
  for (int64_t s = 0; s < batch.n_seq(); ++s) {
    const int64_t r0 = batch.row_start[size_t(s)], n = batch.row_start[size_t(s) + 1] - r0;
    if (n == 0) continue;
    KvCache& cache = caches[size_t(batch.slot[size_t(s)])];
    Tensor qs = q.rows_view(r0, n), os = o.rows_view(r0, n);
    if (cfg.eviction.max_len > 0) be.kv_evict(cache, qs, cfg.eviction, cfg.sparse);
    be.kv_append(cache, k.rows_view(r0, n), v.rows_view(r0, n), cfg.sparse.chunk);
    be.sparse_attention(qs, cache, cfg.sparse, os);
  }
  be.linear_add(o, w.output, out);
}

}  // namespace rwkvx
