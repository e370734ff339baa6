// CudaTrainModelT: the CPU trainer's schedule (train_model.cpp) on the GPU. The layer order, the saved
// activations, the loss scoring and the gradient flow are the same as there, step for step; each op is
// the device op of the same name (train_ops_cuda.h, tested against its CPU reference) and the dense
// products go through cuBLAS (gemm_cuda.h). Only the per-position loss scoring runs on the host (T
// doubles each way).
#include "train/cuda/cuda_train_model.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>
#include <unordered_map>

#include "core/error.h"
#include "train/block_tensors.h"
#include "train/cuda/device_array.h"
#include "train/cuda/gemm_cuda.h"
#include "train/cuda/train_ops_cuda.h"
#include "train/ops/loss.h"

namespace rwkvx::train {

namespace co = rwkvx::train::cuda;
template <class T>
using DA = co::DeviceArray<T>;

namespace {

constexpr double kLnXEpsilon = 64e-5;  // ln_x GroupNorm (rwkv7_time_mix.h kLnXEps)

void require_gpu() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    throw Error(std::string("CUDA training: no usable GPU (") + (e != cudaSuccess ? cudaGetErrorString(e) : "none") +
                ")");
}

}  // namespace

template <class S>
struct CudaTrainModelT<S>::Impl {
  struct BlockSaved {
    DA<S> x_in;  // always kept (recomputation starts from it)
    DA<S> xn1, ln1_mean, ln1_rstd, x_mid, xn2, ln2_mean, ln2_rstd;
    // time mix
    DA<S> delta, xr, xw, xk, xv, xa, xg, r, k, v, hw, wl, ha, al, hg, gate, decay, a, alpha, beta, k_out;
    DA<S> hv, vg, v_mixed, snaps, y, lnx_mean, lnx_rstd, yo;
    // sparse attention
    DA<S> q, sk, sv, o, lse;
    DA<int32_t> selected;
    // channel mix
    DA<S> cdelta, kx, pre, h;
    void release_all_but_input() {
      DA<S> keep = std::move(x_in);
      *this = BlockSaved{};
      x_in = std::move(keep);
    }
  };
  struct Pass {
    int64_t P = 0, Tp = 0;
    std::vector<int32_t> ids, targets;  // host, padded; pad targets are -1
    DA<int32_t> d_ids, d_targets;
    DA<S> e, ln0_mean, ln0_rstd, v_first, x_final, xo, out_mean, out_rstd;
    std::vector<BlockSaved> blocks;
    std::vector<double> loss, lse, row_max;
    DA<double> d_lse;
    std::vector<S>* logits = nullptr;  // [Tp, V] on the host when asked for
  };

  ModelConfig cfg;
  CudaTrainOptions opt;
  cudaStream_t st = nullptr;
  std::unique_ptr<co::Gemm> gemm;
  std::vector<TrainParam> params;
  std::vector<DA<S>> val, grad;
  std::unordered_map<std::string, size_t> by_name;
  bool recompute = false;
  int64_t save_every = 16;
  // The gradient-ready hook and its groups (parameter indices): head, each block in exec order, last.
  GradReadyHook hook;
  std::vector<size_t> head_group, last_group;
  std::vector<std::vector<size_t>> block_group;

  Impl(const TrainModelT<S>& host, const CudaTrainOptions& o) : cfg(host.config()), opt(o) {
    require_gpu();
    int dev = 0;
    RWKVX_TRAIN_CUDA_CHECK(cudaGetDevice(&dev));
    // Keep freed blocks in the stream-ordered pool: activations are freed and reallocated every step.
    cudaMemPool_t pool;
    RWKVX_TRAIN_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
    uint64_t keep_all = UINT64_MAX;
    RWKVX_TRAIN_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all));
    RWKVX_TRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    gemm = std::make_unique<co::Gemm>(st, o.bf16_gemm);
    for (size_t i = 0; i < host.n_params(); ++i) {
      params.push_back(host.param(i));
      by_name.emplace(params.back().name, i);
      val.emplace_back();
      val.back().upload(host.value(i), st);
      grad.emplace_back();
      if (params.back().trainable) grad.back().zeros(params.back().numel, st);
    }
    recompute = host.recompute;
    save_every = host.wkv_save_every;
    make_ready_groups();
    RWKVX_TRAIN_CUDA_CHECK(cudaStreamSynchronize(st));
  }

  // The tensors whose gradients the backward finishes at each point: the names each part's ops use.
  void make_ready_groups() {
    auto recorder = [this](std::vector<size_t>& out) {
      return [this, &out](const std::string& n) -> const S* {
        out.push_back(index(n));
        return nullptr;
      };
    };
    head_tensors(recorder(head_group), cfg.prefix);
    block_group.resize(cfg.exec_order.size());
    for (size_t b = 0; b < cfg.exec_order.size(); ++b) {
      const BlockRef& br = cfg.exec_order[b];
      const std::string name = block_prefix(cfg, br);
      std::vector<size_t>& grp = block_group[b];
      if (br.kind == BlockRef::Kind::rwkv) time_mix_tensors(recorder(grp), name, br.index == 0);
      else sparse_attn_tensors(recorder(grp), name);
      channel_mix_tensors(recorder(grp), name);
      for (const char* n : {"ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"}) grp.push_back(index(name + n));
    }
    for (const char* n : {"blocks.0.ln0.weight", "blocks.0.ln0.bias", "emb.weight"})
      last_group.push_back(index(cfg.prefix + n));
    std::vector<int> seen(params.size(), 0);
    for (const auto* grp : {&head_group, &last_group})
      for (size_t i : *grp) ++seen[i];
    for (const auto& grp : block_group)
      for (size_t i : grp) ++seen[i];
    for (size_t i = 0; i < params.size(); ++i)
      RWKVX_ASSERT(seen[i] <= 1, "CUDA train model: tensor '" + params[i].name + "' in two gradient groups");
  }
  // Hands a group whose gradients are final to the hook (its trainable tensors).
  void grads_ready(const std::vector<size_t>& grp) {
    if (!hook) return;
    std::vector<size_t> ready;
    for (size_t i : grp)
      if (params[i].trainable) ready.push_back(i);
    if (!ready.empty()) hook(ready);
  }
  ~Impl() {
    gemm.reset();
    val.clear();
    grad.clear();
    if (st) {
      cudaStreamSynchronize(st);
      cudaStreamDestroy(st);
    }
  }

  size_t index(const std::string& name) const {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw Error("CUDA train model: no tensor '" + name + "'");
    return it->second;
  }
  const S* w(const std::string& name) const { return val[index(name)].data(); }
  S* g(const std::string& name) {
    const size_t i = index(name);
    return params[i].trainable ? grad[i].data() : nullptr;
  }
  DA<S> uninit(int64_t n) { return DA<S>(n, st); }
  DA<S> zeros(int64_t n) {
    DA<S> a;
    a.zeros(n, st);
    return a;
  }
  void copy(S* dst, const S* src, int64_t n) {
    if (n > 0) RWKVX_TRAIN_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(S), cudaMemcpyDeviceToDevice, st));
  }
  DA<S> clone(const DA<S>& src) {
    DA<S> a = uninit(src.size());
    copy(a.data(), src.data(), src.size());
    return a;
  }

  // ---- time mix (rwkv7_time_mix.h time_mix_forward / time_mix_backward) --------------------------------
  void time_mix_forward(const TimeMixTensors<const S*>& p, const TimeMixShape& sh, const S* x, S* v_first, S* out,
                        BlockSaved& s) {
    const int64_t T = sh.T, C = sh.C, N = sh.N, TC = T * C;
    for (DA<S>* b : {&s.delta, &s.xr, &s.xw, &s.xk, &s.xv, &s.xa, &s.xg, &s.r, &s.k, &s.v, &s.wl, &s.al, &s.gate,
                     &s.decay, &s.a, &s.alpha, &s.beta, &s.k_out, &s.y, &s.yo})
      b->reset(TC, st);
    s.hw.reset(T * sh.dim_w, st), s.ha.reset(T * sh.dim_a, st), s.hg.reset(T * sh.dim_g, st);
    s.lnx_mean.reset(T * (C / N), st), s.lnx_rstd.reset(T * (C / N), st);
    co::token_shift_forward(st, x, s.delta.data(), T, C);
    const std::pair<const S*, DA<S>*> mixes[] = {{p.x_r, &s.xr}, {p.x_w, &s.xw}, {p.x_k, &s.xk},
                                                 {p.x_v, &s.xv}, {p.x_a, &s.xa}, {p.x_g, &s.xg}};
    for (const auto& [mu, dst] : mixes) co::shift_mix_forward(st, x, s.delta.data(), mu, dst->data(), T, C);
    gemm->linear_forward(s.xr.data(), p.receptance, s.r.data(), T, C, C);
    gemm->linear_forward(s.xk.data(), p.key, s.k.data(), T, C, C);
    gemm->linear_forward(s.xv.data(), p.value, s.v.data(), T, C, C);
    gemm->matmul_forward(s.xw.data(), p.w1, s.hw.data(), T, C, sh.dim_w);
    co::tanh_forward(st, s.hw.data(), s.hw.data(), T * sh.dim_w);
    gemm->matmul_forward(s.hw.data(), p.w2, s.wl.data(), T, sh.dim_w, C);
    gemm->matmul_forward(s.xa.data(), p.a1, s.ha.data(), T, C, sh.dim_a);
    gemm->matmul_forward(s.ha.data(), p.a2, s.al.data(), T, sh.dim_a, C);
    gemm->matmul_forward(s.xg.data(), p.g1, s.hg.data(), T, C, sh.dim_g);
    co::sigmoid_forward(st, s.hg.data(), s.hg.data(), T * sh.dim_g);
    gemm->matmul_forward(s.hg.data(), p.g2, s.gate.data(), T, sh.dim_g, C);
    co::wkv_inputs_forward(st, s.wl.data(), s.al.data(), s.k.data(), p.w0, p.a0, p.k_k, p.k_a, s.decay.data(),
                           s.a.data(), s.alpha.data(), s.beta.data(), s.k_out.data(), T, C, N);
    const S* v_used = s.v.data();
    if (sh.first_block) {
      copy(v_first, s.v.data(), TC);
    } else {
      s.hv.reset(T * sh.dim_v, st), s.vg.reset(TC, st), s.v_mixed.reset(TC, st);
      gemm->matmul_forward(s.xv.data(), p.v1, s.hv.data(), T, C, sh.dim_v);
      gemm->matmul_forward(s.hv.data(), p.v2, s.vg.data(), T, sh.dim_v, C);
      co::value_residual_forward(st, s.v.data(), v_first, s.vg.data(), p.v0, s.v_mixed.data(), T, C);
      v_used = s.v_mixed.data();
    }
    s.snaps.reset(co::wkv7_snapshots(T, save_every) * C * N, st);
    co::wkv7_forward(st, s.r.data(), s.decay.data(), s.k_out.data(), v_used, s.alpha.data(), s.beta.data(), s.y.data(),
                     s.snaps.data(), T, C / N, N, save_every);
    co::rwkv7_output_forward(st, s.y.data(), s.r.data(), s.k_out.data(), v_used, p.r_k, s.gate.data(), p.ln_w, p.ln_b,
                             kLnXEpsilon, s.yo.data(), s.lnx_mean.data(), s.lnx_rstd.data(), T, C, N);
    gemm->linear_forward(s.yo.data(), p.output, out, T, C, C);
  }

  void time_mix_backward(const TimeMixTensors<const S*>& p, const TimeMixTensors<S*>& g, const TimeMixShape& sh,
                         const S* v_first, const BlockSaved& s, const S* dout, S* dx, S* dv_first) {
    const int64_t T = sh.T, C = sh.C, N = sh.N, TC = T * C;
    DA<S> dyo = zeros(TC), dy = zeros(TC), dr = zeros(TC), dk_out = zeros(TC), dv_used = zeros(TC), dgate = zeros(TC);
    gemm->linear_backward(dout, s.yo.data(), p.output, dyo.data(), g.output, T, C, C);
    const S* v_used = sh.first_block ? s.v.data() : s.v_mixed.data();
    co::rwkv7_output_backward(st, dyo.data(), s.y.data(), s.r.data(), s.k_out.data(), v_used, p.r_k, s.gate.data(),
                              p.ln_w, p.ln_b, s.lnx_mean.data(), s.lnx_rstd.data(), dy.data(), dr.data(),
                              dk_out.data(), dv_used.data(), g.r_k, dgate.data(), g.ln_w, g.ln_b, T, C, N);
    dyo = {};
    DA<S> ddecay = zeros(TC), dalpha = zeros(TC), dbeta = zeros(TC);
    co::wkv7_backward(st, dy.data(), s.r.data(), s.decay.data(), s.k_out.data(), v_used, s.alpha.data(),
                      s.beta.data(), s.snaps.data(), dr.data(), ddecay.data(), dk_out.data(), dv_used.data(),
                      dalpha.data(), dbeta.data(), T, C / N, N, save_every);
    dy = {};
    DA<S> dxr = zeros(TC), dxw = zeros(TC), dxk = zeros(TC), dxv = zeros(TC), dxa = zeros(TC), dxg = zeros(TC);
    DA<S> dv;
    if (sh.first_block) {
      // v feeds the WKV directly and, through v_first, every later block.
      co::add_inplace(st, dv_used.data(), dv_first, TC);
      dv = std::move(dv_used);
    } else {
      dv = zeros(TC);
      DA<S> dvg = zeros(TC), dhv = zeros(T * sh.dim_v);
      co::value_residual_backward(st, dv_used.data(), s.v.data(), v_first, s.vg.data(), p.v0, dv.data(), dv_first,
                                  dvg.data(), g.v0, T, C);
      gemm->matmul_backward(dvg.data(), s.hv.data(), p.v2, dhv.data(), g.v2, T, sh.dim_v, C);
      gemm->matmul_backward(dhv.data(), s.xv.data(), p.v1, dxv.data(), g.v1, T, C, sh.dim_v);
      dv_used = {};
    }
    DA<S> dwl = zeros(TC), dal = zeros(TC), dk = zeros(TC);
    co::wkv_inputs_backward(st, ddecay.data(), dalpha.data(), dbeta.data(), dk_out.data(), s.wl.data(), s.al.data(),
                            s.k.data(), p.w0, p.a0, p.k_k, p.k_a, dwl.data(), dal.data(), dk.data(), g.w0, g.a0, g.k_k,
                            g.k_a, T, C, N);
    ddecay = {}, dalpha = {}, dbeta = {}, dk_out = {};
    // Low-rank branches: decay (tanh inside), rate (linear), gate (σ inside).
    {
      DA<S> dhw = zeros(T * sh.dim_w), dhw_pre = zeros(T * sh.dim_w);
      gemm->matmul_backward(dwl.data(), s.hw.data(), p.w2, dhw.data(), g.w2, T, sh.dim_w, C);
      co::tanh_backward(st, dhw.data(), s.hw.data(), dhw_pre.data(), T * sh.dim_w);
      gemm->matmul_backward(dhw_pre.data(), s.xw.data(), p.w1, dxw.data(), g.w1, T, C, sh.dim_w);
    }
    {
      DA<S> dha = zeros(T * sh.dim_a);
      gemm->matmul_backward(dal.data(), s.ha.data(), p.a2, dha.data(), g.a2, T, sh.dim_a, C);
      gemm->matmul_backward(dha.data(), s.xa.data(), p.a1, dxa.data(), g.a1, T, C, sh.dim_a);
    }
    {
      DA<S> dhg = zeros(T * sh.dim_g), dhg_pre = zeros(T * sh.dim_g);
      gemm->matmul_backward(dgate.data(), s.hg.data(), p.g2, dhg.data(), g.g2, T, sh.dim_g, C);
      co::sigmoid_backward(st, dhg.data(), s.hg.data(), dhg_pre.data(), T * sh.dim_g);
      gemm->matmul_backward(dhg_pre.data(), s.xg.data(), p.g1, dxg.data(), g.g1, T, C, sh.dim_g);
    }
    gemm->linear_backward(dr.data(), s.xr.data(), p.receptance, dxr.data(), g.receptance, T, C, C);
    gemm->linear_backward(dk.data(), s.xk.data(), p.key, dxk.data(), g.key, T, C, C);
    gemm->linear_backward(dv.data(), s.xv.data(), p.value, dxv.data(), g.value, T, C, C);
    DA<S> ddelta = zeros(TC);
    const std::tuple<const DA<S>*, const S*, S*> mixes[] = {{&dxr, p.x_r, g.x_r}, {&dxw, p.x_w, g.x_w},
                                                            {&dxk, p.x_k, g.x_k}, {&dxv, p.x_v, g.x_v},
                                                            {&dxa, p.x_a, g.x_a}, {&dxg, p.x_g, g.x_g}};
    for (const auto& [d, mu, dmu] : mixes)
      co::shift_mix_backward(st, d->data(), s.delta.data(), mu, dx, ddelta.data(), dmu, T, C);
    co::token_shift_backward(st, ddelta.data(), dx, T, C);
  }

  // ---- sparse attention half (sparse_attention.h sparse_attn_forward / backward) -------------------------
  void sparse_forward(const SparseAttnTensors<const S*>& p, const MobaShape& sh, const S* x, S* out, BlockSaved& s) {
    const int64_t T = sh.T, C = sh.C, H = C / sh.D, K1 = std::max<int64_t>(sh.top_k - 1, 0);
    for (DA<S>* b : {&s.q, &s.sk, &s.sv, &s.o}) b->reset(T * C, st);
    s.lse.reset(T * H, st);
    s.selected.reset(std::max<int64_t>(T * H * K1, 1), st);
    gemm->linear_forward(x, p.query, s.q.data(), T, C, C);
    gemm->linear_forward(x, p.key, s.sk.data(), T, C, C);
    gemm->linear_forward(x, p.value, s.sv.data(), T, C, C);
    co::set_moba_exact_attention(opt.bf16_gemm ? -1 : 1);  // fp32 products: fp32 attention too
    co::moba_forward(st, s.q.data(), s.sk.data(), s.sv.data(), s.o.data(), s.selected.data(), s.lse.data(), T, C,
                     sh.D, sh.chunk, sh.top_k);
    gemm->linear_forward(s.o.data(), p.output, out, T, C, C);
  }
  void sparse_backward(const SparseAttnTensors<const S*>& p, const SparseAttnTensors<S*>& g, const MobaShape& sh,
                       const S* x, const BlockSaved& s, const S* dout, S* dx) {
    const int64_t T = sh.T, C = sh.C;
    DA<S> dO = zeros(T * C), dq = zeros(T * C), dk = zeros(T * C), dv = zeros(T * C);
    gemm->linear_backward(dout, s.o.data(), p.output, dO.data(), g.output, T, C, C);
    co::set_moba_exact_attention(opt.bf16_gemm ? -1 : 1);
    co::moba_backward(st, dO.data(), s.q.data(), s.sk.data(), s.sv.data(), s.selected.data(), s.lse.data(), dq.data(),
                      dk.data(), dv.data(), T, C, sh.D, sh.chunk, sh.top_k);
    gemm->linear_backward(dq.data(), x, p.query, dx, g.query, T, C, C);
    gemm->linear_backward(dk.data(), x, p.key, dx, g.key, T, C, C);
    gemm->linear_backward(dv.data(), x, p.value, dx, g.value, T, C, C);
  }

  // ---- channel mix (channel_mix.h) -----------------------------------------------------------------------
  void channel_forward(const ChannelMixTensors<const S*>& p, const S* x, S* out, BlockSaved& s, int64_t T) {
    const int64_t C = cfg.n_embd, F = cfg.n_ffn;
    s.cdelta.reset(T * C, st), s.kx.reset(T * C, st), s.pre.reset(T * F, st), s.h.reset(T * F, st);
    co::token_shift_forward(st, x, s.cdelta.data(), T, C);
    co::shift_mix_forward(st, x, s.cdelta.data(), p.x_k, s.kx.data(), T, C);
    gemm->linear_forward(s.kx.data(), p.key, s.pre.data(), T, C, F);
    co::relu_square_forward(st, s.pre.data(), s.h.data(), T * F);
    gemm->linear_forward(s.h.data(), p.value, out, T, F, C);
  }
  void channel_backward(const ChannelMixTensors<const S*>& p, const ChannelMixTensors<S*>& g, const BlockSaved& s,
                        const S* dout, S* dx, int64_t T) {
    const int64_t C = cfg.n_embd, F = cfg.n_ffn;
    DA<S> dh = zeros(T * F), dpre = zeros(T * F), dkx = zeros(T * C), ddelta = zeros(T * C);
    gemm->linear_backward(dout, s.h.data(), p.value, dh.data(), g.value, T, F, C);
    co::relu_square_backward(st, dh.data(), s.pre.data(), dpre.data(), T * F);
    dh = {};
    gemm->linear_backward(dpre.data(), s.kx.data(), p.key, dkx.data(), g.key, T, C, F);
    co::shift_mix_backward(st, dkx.data(), s.cdelta.data(), p.x_k, dx, ddelta.data(), g.x_k, T, C);
    co::token_shift_backward(st, ddelta.data(), dx, T, C);
  }

  // ---- blocks ----------------------------------------------------------------------------------------------
  void block_forward(size_t b, DA<S>& x, DA<S>& v_first, BlockSaved& s, int64_t T) {
    const BlockRef& br = cfg.exec_order[b];
    const int64_t C = cfg.n_embd, TC = T * C;
    const std::string name = block_prefix(cfg, br);
    auto get = [&](const std::string& n) -> const S* { return w(n); };
    if (s.x_in.size() != TC) s.x_in = clone(x);  // (a recomputation already holds it)
    s.xn1.reset(TC, st), s.ln1_mean.reset(T, st), s.ln1_rstd.reset(T, st);
    co::group_norm_forward(st, x.data(), w(name + "ln1.weight"), w(name + "ln1.bias"), s.xn1.data(),
                           s.ln1_mean.data(), s.ln1_rstd.data(), T, C, C, kLnEps);
    DA<S> out = uninit(TC);
    if (br.kind == BlockRef::Kind::rwkv) {
      const TimeMixShape sh{T, C, cfg.head_size, cfg.dim_w, cfg.dim_a, cfg.dim_v, cfg.dim_g, br.index == 0};
      time_mix_forward(time_mix_tensors(get, name, br.index == 0), sh, s.xn1.data(), v_first.data(), out.data(), s);
    } else {
      const MobaShape sh{T, C, cfg.sparse.head_dim, cfg.sparse.chunk, cfg.sparse.top_k};
      sparse_forward(sparse_attn_tensors(get, name), sh, s.xn1.data(), out.data(), s);
    }
    co::add_inplace(st, x.data(), out.data(), TC);
    s.x_mid = clone(x);
    s.xn2.reset(TC, st), s.ln2_mean.reset(T, st), s.ln2_rstd.reset(T, st);
    co::group_norm_forward(st, x.data(), w(name + "ln2.weight"), w(name + "ln2.bias"), s.xn2.data(),
                           s.ln2_mean.data(), s.ln2_rstd.data(), T, C, C, kLnEps);
    channel_forward(channel_mix_tensors(get, name), s.xn2.data(), out.data(), s, T);
    co::add_inplace(st, x.data(), out.data(), TC);
  }

  void block_backward(size_t b, BlockSaved& s, const DA<S>& v_first, DA<S>& dx, DA<S>& dv_first, int64_t T) {
    const BlockRef& br = cfg.exec_order[b];
    const int64_t C = cfg.n_embd, TC = T * C;
    const std::string name = block_prefix(cfg, br);
    if (recompute) {
      DA<S> x = clone(s.x_in), vf = clone(v_first);
      block_forward(b, x, vf, s, T);
    }
    auto get = [&](const std::string& n) -> const S* { return w(n); };
    auto gget = [&](const std::string& n) -> S* { return g(n); };
    DA<S> dxn = zeros(TC);
    channel_backward(channel_mix_tensors(get, name), channel_mix_tensors(gget, name), s, dx.data(), dxn.data(), T);
    co::group_norm_backward(st, dxn.data(), s.x_mid.data(), w(name + "ln2.weight"), s.ln2_mean.data(),
                            s.ln2_rstd.data(), dx.data(), g(name + "ln2.weight"), g(name + "ln2.bias"), T, C, C);
    dxn.zero();
    if (br.kind == BlockRef::Kind::rwkv) {
      const bool first = br.index == 0;
      const TimeMixShape sh{T, C, cfg.head_size, cfg.dim_w, cfg.dim_a, cfg.dim_v, cfg.dim_g, first};
      time_mix_backward(time_mix_tensors(get, name, first), time_mix_tensors(gget, name, first), sh, v_first.data(),
                        s, dx.data(), dxn.data(), dv_first.data());
    } else {
      const MobaShape sh{T, C, cfg.sparse.head_dim, cfg.sparse.chunk, cfg.sparse.top_k};
      sparse_backward(sparse_attn_tensors(get, name), sparse_attn_tensors(gget, name), sh, s.xn1.data(), s, dx.data(),
                      dxn.data());
    }
    co::group_norm_backward(st, dxn.data(), s.x_in.data(), w(name + "ln1.weight"), s.ln1_mean.data(),
                            s.ln1_rstd.data(), dx.data(), g(name + "ln1.weight"), g(name + "ln1.bias"), T, C, C);
    s = BlockSaved{};
  }

  // ---- whole passes ----------------------------------------------------------------------------------------
  void forward_pass(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& o, bool keep, Pass& p) {
    RWKVX_ASSERT(T > 0 && o.batch_size > 0, "train: empty sequence or batch");
    const int64_t C = cfg.n_embd, V = cfg.n_vocab;
    p.P = pad_sequence(ids, targets, T, V, o, p.ids, p.targets);
    p.Tp = T + p.P;
    const int64_t Tp = p.Tp, TC = Tp * C;
    p.d_ids.upload(p.ids, st);
    p.d_targets.upload(p.targets, st);

    const size_t n_blocks = cfg.exec_order.size();
    p.blocks.clear();
    p.blocks.resize(n_blocks);
    p.e.reset(TC, st), p.ln0_mean.reset(Tp, st), p.ln0_rstd.reset(Tp, st);
    co::embedding_forward(st, w(cfg.prefix + "emb.weight"), p.d_ids.data(), p.e.data(), Tp, C);
    DA<S> x = uninit(TC);
    co::group_norm_forward(st, p.e.data(), w(cfg.prefix + "blocks.0.ln0.weight"), w(cfg.prefix + "blocks.0.ln0.bias"),
                           x.data(), p.ln0_mean.data(), p.ln0_rstd.data(), Tp, C, C, kLnEps);
    p.v_first = zeros(TC);
    for (size_t b = 0; b < n_blocks; ++b) {
      block_forward(b, x, p.v_first, p.blocks[b], Tp);
      if (!keep) p.blocks[b] = BlockSaved{};
      else if (recompute) p.blocks[b].release_all_but_input();
    }
    // Head: LayerNorm, then [rows, V] logits blocks, each reduced to CE, lse and the row maximum at once.
    p.xo.reset(TC, st), p.out_mean.reset(Tp, st), p.out_rstd.reset(Tp, st);
    co::group_norm_forward(st, x.data(), w(cfg.prefix + "ln_out.weight"), w(cfg.prefix + "ln_out.bias"), p.xo.data(),
                           p.out_mean.data(), p.out_rstd.data(), Tp, C, C, kLnEps);
    DA<double> loss(Tp, st), row_max(Tp, st);
    p.d_lse.reset(Tp, st);
    const int64_t R = std::min(opt.head_rows, Tp);
    DA<S> blk = uninit(R * V);
    if (p.logits) p.logits->assign(size_t(Tp * V), S(0));
    for (int64_t r0 = 0; r0 < Tp; r0 += R) {
      const int64_t n = std::min(R, Tp - r0);
      gemm->linear_forward(p.xo.data() + r0 * C, w(cfg.prefix + "head.weight"), blk.data(), n, C, V);
      co::cross_entropy_rows(st, blk.data(), p.d_targets.data() + r0, n, V, loss.data() + r0, p.d_lse.data() + r0,
                             row_max.data() + r0);
      if (p.logits)
        RWKVX_TRAIN_CUDA_CHECK(cudaMemcpyAsync(p.logits->data() + r0 * V, blk.data(), size_t(n * V) * sizeof(S),
                                               cudaMemcpyDeviceToHost, st));
    }
    p.loss = loss.download(), p.lse = p.d_lse.download(), p.row_max = row_max.download();
    p.x_final = std::move(x);
  }

  void backward_pass(Pass& p, const std::vector<double>& coef, const LossOptions& o, int64_t T) {
    const int64_t C = cfg.n_embd, V = cfg.n_vocab, P = p.P, Tp = p.Tp, TC = Tp * C;
    const double l2_scale = o.l2wrap ? kL2WrapCoef / (double(o.batch_size) * double(T)) : 0.0;
    DA<double> d_coef;
    d_coef.upload(coef, st);
    DA<S> dx = zeros(TC);
    {
      DA<S> dxo = zeros(TC);
      const int64_t R = std::min(opt.head_rows, Tp);
      DA<S> blk = uninit(R * V);
      const S* head = w(cfg.prefix + "head.weight");
      S* ghead = g(cfg.prefix + "head.weight");
      for (int64_t r0 = 0; r0 < Tp; r0 += R) {
        const int64_t n = std::min(R, Tp - r0);
        const S* xo = p.xo.data() + r0 * C;
        gemm->linear_forward(xo, head, blk.data(), n, C, V);
        co::cross_entropy_grad_rows(st, blk.data(), p.d_targets.data() + r0, p.d_lse.data() + r0, d_coef.data() + r0,
                                    l2_scale, std::max<int64_t>(P - r0, 0), n, V);
        gemm->gemm(false, false, n, C, V, blk.data(), V, head, C, dxo.data() + r0 * C, C, true);
        if (ghead) gemm->gemm(true, false, V, C, n, blk.data(), V, xo, C, ghead, C, true);
      }
      co::group_norm_backward(st, dxo.data(), p.x_final.data(), w(cfg.prefix + "ln_out.weight"), p.out_mean.data(),
                              p.out_rstd.data(), dx.data(), g(cfg.prefix + "ln_out.weight"),
                              g(cfg.prefix + "ln_out.bias"), Tp, C, C);
    }
    grads_ready(head_group);
    p.xo = {}, p.x_final = {};
    DA<S> dv_first = zeros(TC);
    for (size_t b = p.blocks.size(); b-- > 0;) {
      block_backward(b, p.blocks[b], p.v_first, dx, dv_first, Tp);
      grads_ready(block_group[b]);
    }
    DA<S> de = zeros(TC);
    co::group_norm_backward(st, dx.data(), p.e.data(), w(cfg.prefix + "blocks.0.ln0.weight"), p.ln0_mean.data(),
                            p.ln0_rstd.data(), de.data(), g(cfg.prefix + "blocks.0.ln0.weight"),
                            g(cfg.prefix + "blocks.0.ln0.bias"), Tp, C, C);
    if (S* demb = g(cfg.prefix + "emb.weight")) {
      const co::EmbeddingGradPlan plan = co::embedding_grad_plan(p.ids.data(), Tp);
      DA<int32_t> order, uniq, starts;
      order.upload(plan.order, st), uniq.upload(plan.uniq, st), starts.upload(plan.starts, st);
      co::embedding_backward(st, de.data(), order.data(), uniq.data(), starts.data(), int64_t(plan.uniq.size()), demb,
                             C);
      RWKVX_TRAIN_CUDA_CHECK(cudaStreamSynchronize(st));  // the plan's host vectors die here
    }
    grads_ready(last_group);
  }

  std::vector<double> position_losses(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& o) {
    Pass p;
    forward_pass(ids, targets, T, o, false, p);
    return std::vector<double>(p.loss.begin() + p.P, p.loss.end());
  }

  // Per-position weights: given, LongCE (short forwards over the windows, no gradient), or 1.
  std::vector<double> weights_of(const Pass& p, const int32_t* ids, const int32_t* targets, const double* weights,
                                 int64_t T, const LossOptions& o) {
    std::vector<double> wts(size_t(T), 1.0);
    if (weights) {
      std::copy(weights, weights + T, wts.begin());
    } else if (o.kind == LossKind::longce) {
      for (const LongCeWindow& win : longce_windows(T, o.longce)) {
        const std::vector<double> shrt = position_losses(ids + win.begin, targets + win.begin, win.end - win.begin, o);
        for (int64_t i = 0; i < win.n; ++i) {
          const int64_t t = win.begin + o.longce.truncated + i;
          wts[size_t(t)] = longce_weight(shrt[size_t(o.longce.truncated + i)], p.loss[size_t(p.P + t)], o.longce.cap);
        }
      }
    }
    return wts;
  }

  LossReport step(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T, const LossOptions& o) {
    RWKVX_ASSERT(targets != nullptr, "train: targets required");
    Pass p;
    forward_pass(ids, targets, T, o, true, p);
    const std::vector<double> wts = weights_of(p, ids, targets, weights, T, o);
    std::vector<double> coef;
    const LossReport rep = score_positions(p.targets, p.loss, p.row_max, p.P, wts.data(), T, o, coef, nullptr);
    backward_pass(p, coef, o, T);
    RWKVX_TRAIN_CUDA_CHECK(cudaStreamSynchronize(st));
    return rep;
  }
};

// ---- CudaTrainModelT -------------------------------------------------------------------------------------

template <class S>
CudaTrainModelT<S>::CudaTrainModelT(const TrainModelT<S>& host, const CudaTrainOptions& options)
    : impl_(std::make_unique<Impl>(host, options)) {
  recompute = host.recompute;
  wkv_save_every = host.wkv_save_every;
}
template <class S>
CudaTrainModelT<S>::~CudaTrainModelT() = default;

template <class S>
const ModelConfig& CudaTrainModelT<S>::config() const {
  return impl_->cfg;
}
template <class S>
size_t CudaTrainModelT<S>::n_params() const {
  return impl_->params.size();
}
template <class S>
const TrainParam& CudaTrainModelT<S>::param(size_t i) const {
  return impl_->params.at(i);
}

template <class S>
LossReport CudaTrainModelT<S>::forward_backward(const int32_t* ids, const int32_t* targets, int64_t T,
                                                const LossOptions& opt) {
  return forward_backward_weighted(ids, targets, nullptr, T, opt);
}
template <class S>
LossReport CudaTrainModelT<S>::forward_backward_weighted(const int32_t* ids, const int32_t* targets,
                                                         const double* weights, int64_t T, const LossOptions& opt) {
  RWKVX_ASSERT(wkv_save_every > 0, "train: wkv_save_every must be positive");
  impl_->recompute = recompute, impl_->save_every = wkv_save_every;
  return impl_->step(ids, targets, weights, T, opt);
}
template <class S>
double CudaTrainModelT<S>::objective(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                                     const LossOptions& opt) {
  impl_->recompute = recompute, impl_->save_every = wkv_save_every;
  typename Impl::Pass p;
  impl_->forward_pass(ids, targets, T, opt, false, p);
  const std::vector<double> wts = impl_->weights_of(p, ids, targets, weights, T, opt);
  std::vector<double> coef;
  double obj = 0;
  score_positions(p.targets, p.loss, p.row_max, p.P, wts.data(), T, opt, coef, &obj);
  return obj;
}
template <class S>
std::vector<double> CudaTrainModelT<S>::position_losses(const int32_t* ids, const int32_t* targets, int64_t T,
                                                        const LossOptions& opt) {
  impl_->save_every = wkv_save_every;
  return impl_->position_losses(ids, targets, T, opt);
}
template <class S>
std::vector<S> CudaTrainModelT<S>::logits(const int32_t* ids, int64_t T) {
  impl_->save_every = wkv_save_every;
  typename Impl::Pass p;
  std::vector<S> out;
  p.logits = &out;
  impl_->forward_pass(ids, nullptr, T, LossOptions{}, false, p);
  return out;
}

template <class S>
void CudaTrainModelT<S>::set_grad_ready_hook(GradReadyHook hook) {
  impl_->hook = std::move(hook);
}
template <class S>
void CudaTrainModelT<S>::zero_grad() {
  for (auto& g : impl_->grad) g.zero();
}
template <class S>
void CudaTrainModelT<S>::set_trainable(size_t i, bool trainable) {
  TrainParam& p = impl_->params.at(i);
  p.trainable = trainable;
  if (trainable && impl_->grad[i].size() != p.numel) impl_->grad[i].zeros(p.numel, impl_->st);
  if (!trainable) impl_->grad[i].release();
}
template <class S>
void CudaTrainModelT<S>::upload_values(const TrainModelT<S>& host) {
  RWKVX_ASSERT(host.n_params() == n_params(), "CUDA train model: parameter count differs");
  for (size_t i = 0; i < n_params(); ++i) impl_->val[i].upload(host.value(i), impl_->st);
  synchronize();
}
template <class S>
void CudaTrainModelT<S>::download_values(TrainModelT<S>& host) const {
  for (size_t i = 0; i < n_params(); ++i) host.value(i) = impl_->val[i].download();
}
template <class S>
void CudaTrainModelT<S>::download_grads(TrainModelT<S>& host) const {
  for (size_t i = 0; i < n_params(); ++i)
    if (impl_->params[i].trainable) host.grad(i) = impl_->grad[i].download();
}
template <class S>
std::vector<S> CudaTrainModelT<S>::value(size_t i) const {
  return impl_->val.at(i).download();
}
template <class S>
std::vector<S> CudaTrainModelT<S>::grad(size_t i) const {
  return impl_->params.at(i).trainable ? impl_->grad[i].download() : std::vector<S>{};
}
template <class S>
void CudaTrainModelT<S>::set_value(size_t i, const std::vector<S>& v) {
  RWKVX_ASSERT(int64_t(v.size()) == impl_->params.at(i).numel, "CUDA train model: set_value size");
  impl_->val[i].upload(v, impl_->st);
  synchronize();
}
template <class S>
S* CudaTrainModelT<S>::device_value(size_t i) {
  return impl_->val.at(i).data();
}
template <class S>
S* CudaTrainModelT<S>::device_grad(size_t i) {
  return impl_->params.at(i).trainable ? impl_->grad[i].data() : nullptr;
}
template <class S>
void* CudaTrainModelT<S>::stream() const {
  return impl_->st;
}
template <class S>
void CudaTrainModelT<S>::synchronize() const {
  RWKVX_TRAIN_CUDA_CHECK(cudaStreamSynchronize(impl_->st));
}
template <class S>
int64_t CudaTrainModelT<S>::peak_device_bytes() const {
  int dev = 0;
  RWKVX_TRAIN_CUDA_CHECK(cudaGetDevice(&dev));
  cudaMemPool_t pool;
  RWKVX_TRAIN_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t high = 0;
  RWKVX_TRAIN_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high));
  return int64_t(high);
}
template <class S>
void CudaTrainModelT<S>::reset_peak_device_bytes() {
  int dev = 0;
  RWKVX_TRAIN_CUDA_CHECK(cudaGetDevice(&dev));
  cudaMemPool_t pool;
  RWKVX_TRAIN_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t zero = 0;
  RWKVX_TRAIN_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
}

template class CudaTrainModelT<float>;
template class CudaTrainModelT<double>;

// ---- CudaAdamW -------------------------------------------------------------------------------------------

struct CudaAdamW::Impl {
  std::vector<bool> active;
  std::vector<ParamGroup> group;
  std::vector<DA<float>> m, v;
  DA<double> sq;  // one Σg² per tensor
};

CudaAdamW::CudaAdamW(CudaTrainModel& model, const AdamWOptions& options)
    : model_(&model), options_(options), impl_(std::make_unique<Impl>()) {
  const size_t n = model.n_params();
  auto st = static_cast<cudaStream_t>(model.stream());
  impl_->active.resize(n), impl_->group.resize(n), impl_->m.resize(n), impl_->v.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const TrainParam& p = model.param(i);
    impl_->active[i] = p.trainable;
    impl_->group[i] = param_group(p.name, p.shape, options.groups);
    if (p.trainable) impl_->m[i].zeros(p.numel, st), impl_->v[i].zeros(p.numel, st);
  }
  impl_->sq.zeros(int64_t(n), st);
  model.synchronize();
}
CudaAdamW::~CudaAdamW() = default;

double CudaAdamW::step(double lr, double wd) {
  const size_t n = model_->n_params();
  auto st = static_cast<cudaStream_t>(model_->stream());
  for (size_t i = 0; i < n; ++i)
    if (impl_->active[i] && !model_->param(i).trainable)
      throw Error("AdamW: tensor '" + model_->param(i).name + "' was frozen after the optimizer was made");
  // Global norm: per-tensor sums of squares on the device, added in tensor order on the host.
  for (size_t i = 0; i < n; ++i)
    if (impl_->active[i])
      co::sum_squares(st, model_->device_grad(i), model_->param(i).numel, impl_->sq.data() + i);
  const std::vector<double> sq = impl_->sq.download();
  double total = 0;
  for (size_t i = 0; i < n; ++i)
    if (impl_->active[i]) total += sq[i];
  const double norm = std::sqrt(total);
  if (options_.grad_clip > 0) {
    const double coef = options_.grad_clip / (norm + 1e-6);
    if (coef < 1.0)
      for (size_t i = 0; i < n; ++i)
        if (impl_->active[i]) co::scale_inplace(st, model_->device_grad(i), model_->param(i).numel, coef);
  }
  ++step_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bc1 = 1.0 - std::pow(b1, double(step_)), bc2_sqrt = std::sqrt(1.0 - std::pow(b2, double(step_)));
  for (size_t i = 0; i < n; ++i) {
    if (!impl_->active[i]) continue;
    const double lr_i = lr * impl_->group[i].lr_scale, wd_i = impl_->group[i].decay ? wd : 0.0;
    co::adamw_update(st, model_->device_value(i), model_->device_grad(i), impl_->m[i].data(), impl_->v[i].data(),
                     model_->param(i).numel, lr_i, wd_i, b1, b2, options_.eps, bc1, bc2_sqrt);
  }
  model_->synchronize();
  return norm;
}

std::vector<float> CudaAdamW::exp_avg(size_t i) const {
  return impl_->m.at(i).download();
}
std::vector<float> CudaAdamW::exp_avg_sq(size_t i) const {
  return impl_->v.at(i).download();
}
void CudaAdamW::set_moments(size_t i, const std::vector<float>& m, const std::vector<float>& v) {
  auto st = static_cast<cudaStream_t>(model_->stream());
  RWKVX_ASSERT(impl_->active.at(i) && int64_t(m.size()) == model_->param(i).numel &&
                   int64_t(v.size()) == model_->param(i).numel,
               "CudaAdamW: moments of a frozen tensor or of the wrong size");
  impl_->m[i].upload(m, st), impl_->v[i].upload(v, st);
  model_->synchronize();
}

}  // namespace rwkvx::train
