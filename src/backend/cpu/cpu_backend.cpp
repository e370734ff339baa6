// Fast CPU backend: weight handling, dense ops and the RWKV-7 ops (sparse attention is in
// cpu_sparse_attention.cpp). Every op here is tested against the reference backend in tests/ops/.
#include "backend/cpu/cpu_backend.h"

#include <cmath>
#include <cstring>

#include "core/parse.h"

namespace rwkvx {

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options) {
  return std::make_unique<cpu::CpuBackend>(options);
}

namespace cpu {
namespace {

Isa pick_isa(const std::string& forced) {
  if (!forced.empty()) set_forced_isa(forced);
  return active_isa();
}

}  // namespace

WeightView weight_view(const Tensor& t) {
  WeightView w;
  switch (t.dtype) {
    case DType::f32: w.fmt = WFormat::f32; break;
    case DType::f16: w.fmt = WFormat::f16; break;
    case DType::bf16: w.fmt = WFormat::bf16; break;
    case DType::q8: w.fmt = WFormat::q8; break;
    case DType::bf16x2: RWKVX_ASSERT(false, "weight_view: bf16x2 is an activation form, not a weight type");
  }
  w.data = t.data;
  w.scales = t.scales;
  w.rows = t.rows();
  w.cols = t.row_size();
  w.ld = w.cols;
  return w;
}

CpuBackend::CpuBackend(const CpuBackendOptions& o)
    : opt_(o),
      rows_per_call_(env_row_count("RWKVX_CPU_ROWS_PER_CALL", 8192)),
      k_(&kernels_for(pick_isa(o.isa))),
      pool_(o.n_threads) {}

std::string CpuBackend::name() const {
  return std::string("cpu-") + isa_name(k_->isa) + " x" + std::to_string(const_cast<ThreadPool&>(pool_).size()) +
         (opt_.quantize_int8 ? " int8" : "");
}

void CpuBackend::for_rows(int64_t T, int64_t work_per_row, const std::function<void(int64_t, int64_t)>& fn) {
  if (T * work_per_row < (1 << 15) || pool_.size() == 1) {
    fn(0, T);
    return;
  }
  pool_.parallel_for(T, 1, fn);
}

Tensor CpuBackend::upload_weight(const StoredTensor& src, std::initializer_list<int64_t> shape) {
  // Vectors and r_k feed elementwise ops: fp32 copies (tiny). Matrices stay as stored.
  const bool matrix = shape.size() == 2 && !src.name.ends_with("att.r_k");
  if (!matrix) return ReferenceBackend::upload_weight(src, shape);
  const int64_t rows = *shape.begin(), cols = *(shape.begin() + 1);
  RWKVX_ASSERT(rows * cols == src.numel(), "upload_weight: " + src.name + " reshaped to a different size");
  const bool linear = src.name.ends_with(".weight") && !src.name.ends_with("emb.weight");
  Tensor t;
  t.device = Device::cpu;
  t.ndim = 2;
  t.shape = {rows, cols, 0, 0};
  if (opt_.quantize_int8 && linear) {
    // Per output channel: scale = max|w| / 127, q = round(w / scale). Values and scales share one buffer.
    const size_t qbytes = size_t(rows * cols + 63) / 64 * 64;
    Tensor buf = alloc(DType::f32, {int64_t((qbytes + size_t(rows) * 4) / 4)});
    auto* q = static_cast<int8_t*>(buf.data);
    auto* scales = reinterpret_cast<float*>(static_cast<char*>(buf.data) + qbytes);
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      convert_to_f32(src.dtype, src.data + size_t(r * cols) * dtype_size(src.dtype), row.data(), row.size());
      float mx = 0.f;
      for (float v : row) mx = std::max(mx, std::fabs(v));
      const float s = mx > 0.f ? mx / 127.f : 1.f;
      scales[r] = s;
      for (int64_t c = 0; c < cols; ++c) q[r * cols + c] = int8_t(std::lrint(row[size_t(c)] / s));
    }
    t.dtype = DType::q8;
    t.data = q;
    t.scales = scales;
    t.storage = buf.storage;
    return t;
  }
  t.dtype = src.dtype;
  if (src.owner) {  // zero-copy: a view of the memory-mapped checkpoint
    t.data = const_cast<uint8_t*>(src.data);
    t.storage = src.owner;
  } else {
    Tensor buf = alloc(DType::f32, {int64_t((src.nbytes() + 3) / 4)});
    std::memcpy(buf.data, src.data, src.nbytes());
    t.data = buf.data;
    t.storage = buf.storage;
  }
  return t;
}

void CpuBackend::embedding(const Tensor& E, const int32_t* ids, int64_t n, Tensor& out) {
  const WeightView w = weight_view(E);
  RWKVX_ASSERT(out.rows() == n && out.row_size() == w.cols, "embedding: bad output shape");
  for (int64_t t = 0; t < n; ++t) {
    RWKVX_ASSERT(ids[t] >= 0 && ids[t] < w.rows, "embedding: id out of range");
    k_->row_to_f32(w, ids[t], out.f32() + t * w.cols);
  }
}

void CpuBackend::layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) {
  const int64_t C = w.numel(), T = x.numel() / C;
  for_rows(T, 4 * C, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) k_->normalize(x.f32() + t * C, C, eps, w.f32(), b.f32(), out.f32() + t * C);
  });
}

void CpuBackend::pack_tiles(const Tensor& x, int64_t T, int64_t K) {
  a_tiles_.resize(size_t(k_->tile_a_size(T, K)));
  pool_.parallel_chunks(k_->tile_a_rows(T), 32, [&](int64_t r0, int64_t r1) {
    k_->tile_pack_a(x.f32(), K, T, K, r0, r1, a_tiles_.data());
  });
}

void CpuBackend::linear_into(const Tensor& x, const Tensor& W, Tensor& out, bool accumulate) {
  const int64_t T = x.rows(), K = x.row_size(), N = W.rows();
  RWKVX_ASSERT(W.row_size() == K && out.rows() == T && out.row_size() == N,
               "linear: x " + x.shape_str() + " W " + W.shape_str() + " out " + out.shape_str());
  const WeightView w = weight_view(W);
  auto run = [&](int64_t n0, int64_t n1) { k_->gemm_nt(x.f32(), K, T, w, n0, n1, out.f32(), N, accumulate); };
  if (T * K * N < (1 << 16)) return run(0, N);
  if (T <= 4 || k_->isa == Isa::scalar) return pool_.parallel_for(N, 64, run);  // decode: stream W once
  // Prefill: pack x once (fp32 panels, or bf16 tiles on AMX; the threads share them), then threads claim
  // column chunks as they come free, so a core slowed by the VM's neighbours holds no one up. About four
  // chunks per thread, at least 64 columns (each chunk streams all of the packed x) and at most 256.
  const int64_t chunk = std::clamp<int64_t>((N / (4 * pool_.size()) + 63) / 64 * 64, 64, 256);
  if (k_->tile_gemm_nt && (w.fmt == WFormat::bf16 || w.fmt == WFormat::q8)) {  // AMX: x in three bf16 parts
    pack_tiles(x, T, K);
    pool_.parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
      k_->tile_gemm_nt(a_tiles_.data(), T, w, n0, n1, out.f32(), N, accumulate);
    });
    return;
  }
  const int64_t mr = k_->a_panel_rows, panels = (T + mr - 1) / mr;
  a_panels_.resize(size_t(k_->packed_a_size(T, K)));
  pool_.parallel_chunks(panels, 8, [&](int64_t p0, int64_t p1) {
    k_->pack_a_panels(x.f32(), K, T, K, p0, p1, a_panels_.data());
  });
  pool_.parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
    k_->gemm_nt_packed(a_panels_.data(), T, w, n0, n1, out.f32(), N, accumulate);
  });
}

void CpuBackend::matmul(const Tensor& x, const Tensor& W, Tensor& out) {
  const int64_t T = x.rows(), K = x.row_size(), N = W.row_size();
  RWKVX_ASSERT(W.rows() == K && out.rows() == T && out.row_size() == N,
               "matmul: x " + x.shape_str() + " W " + W.shape_str() + " out " + out.shape_str());
  const WeightView w = weight_view(W);
  // Low-rank products are small: split over rows of x when there are many, else over columns.
  if (T * K * N < (1 << 17)) return k_->gemm_nn(x.f32(), K, T, w, 0, N, out.f32(), N, false);
  if (k_->tile_gemm_nn && w.fmt == WFormat::bf16 && T > 4) {
    pack_tiles(x, T, K);
    pool_.parallel_chunks(N, 32, [&](int64_t n0, int64_t n1) {
      k_->tile_gemm_nn(a_tiles_.data(), T, w, n0, n1, out.f32(), N, false);
    });
    return;
  }
  if (T >= 2 * pool_.size()) {
    const int64_t rows = std::clamp<int64_t>(T / (2 * pool_.size()), 16, 96);  // W is repacked per chunk
    pool_.parallel_chunks(T, rows, [&](int64_t t0, int64_t t1) {
      k_->gemm_nn(x.f32() + t0 * K, K, t1 - t0, w, 0, N, out.f32() + t0 * N, N, false);
    });
  } else {
    pool_.parallel_for(N, 32, [&](int64_t n0, int64_t n1) { k_->gemm_nn(x.f32(), K, T, w, n0, n1, out.f32(), N, false); });
  }
}

void CpuBackend::tanh_(Tensor& x) {
  const int64_t C = x.row_size();
  for_rows(x.rows(), 16 * C, [&](int64_t t0, int64_t t1) { k_->tanh_(x.f32() + t0 * C, (t1 - t0) * C); });
}

void CpuBackend::sigmoid_(Tensor& x) {
  const int64_t C = x.row_size();
  for_rows(x.rows(), 16 * C, [&](int64_t t0, int64_t t1) { k_->sigmoid_(x.f32() + t0 * C, (t1 - t0) * C); });
}

void CpuBackend::relu_square_(Tensor& x) {
  const int64_t C = x.row_size();
  for_rows(x.rows(), 16 * C, [&](int64_t t0, int64_t t1) { k_->relu_square_(x.f32() + t0 * C, (t1 - t0) * C); });
}

void CpuBackend::add_(Tensor& x, const Tensor& y) {
  RWKVX_ASSERT(x.numel() == y.numel(), "add_: shapes " + x.shape_str() + " vs " + y.shape_str());
  const int64_t C = x.row_size();
  for_rows(x.rows(), C, [&](int64_t t0, int64_t t1) {
    float* p = x.f32() + t0 * C;
    const float* q = y.f32() + t0 * C;
    for (int64_t i = 0; i < (t1 - t0) * C; ++i) p[i] += q[i];
  });
}

void CpuBackend::shift_mix(const Tensor& x, const Tensor& delta, const Tensor& mu, Tensor& out) {
  const int64_t C = mu.numel(), T = x.numel() / C;
  for_rows(T, C, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *xi = x.f32() + t * C, *d = delta.f32() + t * C, *m = mu.f32();
      float* o = out.f32() + t * C;
      for (int64_t c = 0; c < C; ++c) o[c] = xi[c] + d[c] * m[c];
    }
  });
}

void CpuBackend::rwkv7_wkv_inputs(Tensor& w, Tensor& a, Tensor& k, Tensor& alpha, Tensor& beta, const Tensor& w0,
                                  const Tensor& a0, const Tensor& k_k, const Tensor& k_a, int head_size) {
  const int64_t C = w0.numel(), T = k.numel() / C, N = head_size, H = C / N;
  const float neg_inv_sqrt_e = -std::exp(-0.5f);
  for_rows(T, 24 * C, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float *wt = w.f32() + t * C, *at = a.f32() + t * C, *kt = k.f32() + t * C;
      float *al = alpha.f32() + t * C, *be = beta.f32() + t * C;
      for (int64_t c = 0; c < C; ++c) wt[c] += w0.f32()[c], at[c] += a0.f32()[c];
      k_->sigmoid_(wt, C);
      for (int64_t c = 0; c < C; ++c) wt[c] *= neg_inv_sqrt_e;
      k_->exp_(wt, C);
      k_->sigmoid_(at, C);
      for (int64_t h = 0; h < H; ++h) {
        float norm = 0.f;
        for (int64_t j = h * N; j < (h + 1) * N; ++j) {
          const float kk = kt[j] * k_k.f32()[j];
          al[j] = kk;
          norm += kk * kk;
        }
        const float inv = 1.0f / std::max(std::sqrt(norm), 1e-12f);
        for (int64_t j = h * N; j < (h + 1) * N; ++j) {
          const float kk = al[j] * inv;
          al[j] = -kk;
          be[j] = kk * at[j];
        }
      }
      for (int64_t c = 0; c < C; ++c) kt[c] = kt[c] * (1.0f + (at[c] - 1.0f) * k_a.f32()[c]);
    }
  });
}

void CpuBackend::rwkv7_value_residual(Tensor& v, const Tensor& v_first, const Tensor& v_gate, const Tensor& v0) {
  const int64_t C = v0.numel(), T = v.numel() / C;
  for_rows(T, 16 * C, [&](int64_t t0, int64_t t1) {
    std::vector<float> g(static_cast<size_t>(C));
    for (int64_t t = t0; t < t1; ++t) {
      float* vt = v.f32() + t * C;
      const float *vf = v_first.f32() + t * C, *vg = v_gate.f32() + t * C;
      for (int64_t c = 0; c < C; ++c) g[size_t(c)] = v0.f32()[c] + vg[c];
      k_->sigmoid_(g.data(), C);
      for (int64_t c = 0; c < C; ++c) vt[c] += (vf[c] - vt[c]) * g[size_t(c)];
    }
  });
}

void CpuBackend::wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& alpha,
                      const Tensor& beta, Tensor& state, const SeqBatch& batch, Tensor& y, int head_size) {
  const int64_t C = r.row_size(), N = head_size, H = C / N;
  // Independent (sequence, head, block of value rows) triples run in parallel; each walks its tokens in order.
  const int64_t rows = N % k_->wkv_row_block == 0 ? std::max<int64_t>(k_->wkv_row_block, 16) : N;
  const int64_t blocks = N % rows == 0 ? N / rows : 1, per_block = N / blocks;
  const int64_t jobs = batch.n_seq() * H * blocks;
  auto run = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t s = j / (H * blocks), h = j / blocks % H, i0 = j % blocks * per_block;
      const int64_t r0 = batch.row_start[size_t(s)], T = batch.row_start[size_t(s) + 1] - r0;
      if (T == 0) continue;
      float* S = state.f32() + (int64_t(batch.slot[size_t(s)]) * H + h) * N * N;
      const int64_t o = r0 * C + h * N;
      k_->wkv7_rows(r.f32() + o, w.f32() + o, k.f32() + o, v.f32() + o, alpha.f32() + o, beta.f32() + o, C, T, N,
                    i0, i0 + per_block, S, y.f32() + o);
    }
  };
  if (batch.n_rows() * C < 4096) return run(0, jobs);
  pool_.parallel_chunks(jobs, 1, run);
}

void CpuBackend::rwkv7_output(Tensor& y, const Tensor& r, const Tensor& k, const Tensor& v, const Tensor& r_k,
                              const Tensor& g, const Tensor& ln_w, const Tensor& ln_b, float eps, int head_size) {
  const int64_t C = ln_w.numel(), T = y.numel() / C, N = head_size, H = C / N;
  for_rows(T, 8 * C, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t o = t * C + h * N;
        float* yh = y.f32() + o;
        k_->normalize(yh, N, eps, ln_w.f32() + h * N, ln_b.f32() + h * N, yh);
        // Bonus (r ⊙ k ⊙ r_k summed over the head) in four partial sums: no serial add chain.
        const float *rh = r.f32() + o, *kh = k.f32() + o, *rkh = r_k.f32() + h * N;
        float u4[4] = {0.f, 0.f, 0.f, 0.f};
        int64_t j = 0;
        for (; j + 4 <= N; j += 4)
          for (int q = 0; q < 4; ++q) u4[q] += rh[j + q] * kh[j + q] * rkh[j + q];
        for (; j < N; ++j) u4[0] += rh[j] * kh[j] * rkh[j];
        const float u = (u4[0] + u4[1]) + (u4[2] + u4[3]);
        const float *vh = v.f32() + o, *gh = g.f32() + o;
        for (int64_t i = 0; i < N; ++i) yh[i] = (yh[i] + u * vh[i]) * gh[i];
      }
    }
  });
}

}  // namespace cpu
}  // namespace rwkvx
