// Slot-to-slot state copies with deep-copied KV caches (see state_copy.h).
#include "model/state_copy.h"

#include <algorithm>

namespace rwkvx {
namespace {

KvCache copy_cache(Backend& be, const KvCache& src) {
  KvCache dst;
  if (src.len == 0) return dst;
  const int64_t C = src.k.row_size();
  // Capacity rounded up to whole chunks, as kv_append sizes it, so chunk means have their rows.
  const int64_t cap = std::max<int64_t>(src.chunk, (src.len + src.chunk - 1) / src.chunk * src.chunk);
  dst.dtype = src.k.dtype;  // f32 or bf16 storage, kept as is
  dst.k = be.alloc(src.k.dtype, {cap, C});
  dst.v = be.alloc(src.k.dtype, {cap, C});
  dst.chunk_mean = be.alloc(DType::f32, {cap / src.chunk, C});
  Tensor dk = dst.k.rows_view(0, src.len), dv = dst.v.rows_view(0, src.len);
  be.copy(src.k.rows_view(0, src.len), dk);
  be.copy(src.v.rows_view(0, src.len), dv);
  if (src.n_chunks > 0) {
    Tensor dm = dst.chunk_mean.rows_view(0, src.n_chunks);
    be.copy(src.chunk_mean.rows_view(0, src.n_chunks), dm);
  }
  dst.len = src.len;
  dst.n_chunks = src.n_chunks;
  dst.chunk = src.chunk;
  return dst;
}

void copy_row(Backend& be, const Tensor& src, int src_slot, Tensor& dst, int dst_slot) {
  Tensor d = dst.rows_view(dst_slot, 1);
  be.copy(src.rows_view(src_slot, 1), d);
}

}  // namespace

void copy_state_slot(Backend& be, const State& src, int src_slot, State& dst, int dst_slot) {
  RWKVX_ASSERT(src_slot >= 0 && src_slot < src.n_slots && dst_slot >= 0 && dst_slot < dst.n_slots,
               "copy_state_slot: slot out of range");
  RWKVX_ASSERT(src.wkv.size() == dst.wkv.size() && src.ffn_shift.size() == dst.ffn_shift.size() &&
                   src.kv.size() == dst.kv.size(),
               "copy_state_slot: states of different models");
  if (&src == &dst && src_slot == dst_slot) return;
  for (size_t i = 0; i < src.wkv.size(); ++i) {
    copy_row(be, src.att_shift[i], src_slot, dst.att_shift[i], dst_slot);
    copy_row(be, src.wkv[i], src_slot, dst.wkv[i], dst_slot);
  }
  for (size_t i = 0; i < src.ffn_shift.size(); ++i) copy_row(be, src.ffn_shift[i], src_slot, dst.ffn_shift[i], dst_slot);
  for (size_t m = 0; m < src.kv.size(); ++m)
    dst.kv[m][size_t(dst_slot)] = copy_cache(be, src.kv[m][size_t(src_slot)]);
  dst.pos[size_t(dst_slot)] = src.pos[size_t(src_slot)];
}

size_t state_slot_bytes(const State& s, int slot) {
  size_t bytes = 0;
  auto row = [](const Tensor& t) { return t.nbytes() / size_t(std::max<int64_t>(1, t.rows())); };
  for (size_t i = 0; i < s.wkv.size(); ++i) bytes += row(s.att_shift[i]) + row(s.wkv[i]);
  for (const Tensor& t : s.ffn_shift) bytes += row(t);
  for (const auto& caches : s.kv) {
    const KvCache& c = caches[size_t(slot)];
    if (!c.k.empty()) bytes += c.k.nbytes() + c.v.nbytes();
    if (!c.chunk_mean.empty()) bytes += c.chunk_mean.nbytes();
  }
  return bytes;
}

}  // namespace rwkvx
