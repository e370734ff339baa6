// Every CUDA op against the fp32 reference backend on fresh random inputs. Outputs are poisoned with NaN
// before each call (an element the kernel forgets to write fails the comparison); sizes are not multiples
// of the tiles (64-query / 64-key attention tiles, 4-lane WKV rows, 16-token WKV staging, warps).
// Without a GPU every test skips and says so.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "backend/cuda/cuda_backend.h"
#include "support/test_util.h"

namespace rwkvx {
namespace {

class CudaOps : public testing::Test {
 public:
  void SetUp() override {
    std::string why;
    if (!cuda_device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << "): CUDA op tests skipped";
    gpu = make_cuda_backend();
  }
  std::vector<float> random(int64_t n, float lo = -1, float hi = 1) {
    std::vector<float> v(static_cast<size_t>(n));
    std::uniform_real_distribution<float> u(lo, hi);
    for (float& x : v) x = u(rng);
    return v;
  }
  // The same fp32 values on both backends.
  std::pair<Tensor, Tensor> both(const std::vector<float>& v, std::initializer_list<int64_t> shape) {
    Tensor a = ref->alloc(DType::f32, shape), b = gpu->alloc(DType::f32, shape);
    ref->from_host(v.data(), a);
    gpu->from_host(v.data(), b);
    return {a, b};
  }
  std::pair<Tensor, Tensor> rand(std::initializer_list<int64_t> shape, float lo = -1, float hi = 1) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return both(random(n, lo, hi), shape);
  }
  // A GPU tensor filled with NaN.
  Tensor poisoned(std::initializer_list<int64_t> shape) {
    Tensor t = gpu->alloc(DType::f32, shape);
    std::vector<float> nan(static_cast<size_t>(t.numel()), NAN);
    gpu->from_host(nan.data(), t);
    return t;
  }
  std::vector<float> host(Backend& be, const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    if (!v.empty()) be.to_host(t, v.data());
    return v;
  }
  // rel_max_err of the GPU tensor against the reference one; NaN anywhere fails.
  double err(const Tensor& r, const Tensor& g) {
    std::vector<float> a = host(*gpu, g), b = host(*ref, r);
    for (float x : a)
      if (!std::isfinite(x)) return INFINITY;
    return test::rel_max_err(a, b);
  }

  std::mt19937 rng{20261123};
  std::unique_ptr<Backend> ref = make_reference_backend();
  std::unique_ptr<Backend> gpu;
};

StoredTensor stored(const std::string& name, DType dt, int64_t rows, int64_t cols, std::mt19937& rng,
                    std::vector<uint8_t>& bytes) {
  std::normal_distribution<float> nd(0.f, 0.2f);
  bytes.resize(size_t(rows * cols) * dtype_size(dt));
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float v = nd(rng);
    if (dt == DType::f32) std::memcpy(bytes.data() + 4 * i, &v, 4);
    else {
      const uint16_t h = f32_to_bf16(v);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  StoredTensor t;
  t.name = name;
  t.dtype = dt;
  t.shape = {rows, cols};
  t.data = bytes.data();
  return t;
}

std::vector<float> round_bf16(std::vector<float> v) {
  for (float& x : v) x = bf16_to_f32(f32_to_bf16(x));
  return v;
}

// fp32 weights: a true fp32 GEMM. bf16 weights: by default the activations enter as two bf16 parts (compared
// with the reference on the fp32 activations); with single_bf16_activations as one rounding (compared with
// the reference on the same rounded activations). Up to 8 rows go through the GEMV kernels (fp32 activations).
TEST_F(CudaOps, LinearAndMatmulFp32AndBf16) {
  CudaBackendOptions fast_opt;
  fast_opt.single_bf16_activations = true;
  std::unique_ptr<Backend> fast = make_cuda_backend(fast_opt);
  std::unique_ptr<Backend> exact = std::move(gpu);
  for (int mode = 0; mode < 3; ++mode) {
    const DType dt = mode == 0 ? DType::f32 : DType::bf16;
    gpu = mode == 2 ? std::move(fast) : std::move(exact);
    for (auto [T, K, N] : {std::tuple{1, 64, 48}, {3, 100, 37}, {8, 300, 67}, {9, 64, 33}, {37, 300, 67}, {130, 520, 200}, {5, 37, 9},
                           {257, 768, 1000}}) {
      std::vector<uint8_t> bytes;
      // bf16 weights multiply bf16-rounded activations: the reference gets the same rounded inputs.
      std::vector<float> xv = random(int64_t(T) * K);
      // (≤ 8 rows take the GEMV kernels on unrounded fp32 activations in every mode.)
      std::vector<float> xr = mode == 2 && T > 8 ? round_bf16(xv) : xv;
      const double tol = mode == 1 ? 5e-5 : 1e-5;
      {
        StoredTensor st = stored("blocks.0.att.key.weight", dt, N, K, rng, bytes);
        Tensor wr = ref->upload_weight(st, {N, K}), wg = gpu->upload_weight(st, {N, K});
        EXPECT_EQ(wg.dtype, dt);
        Tensor xa = ref->alloc(DType::f32, {T, K}), xg = gpu->alloc(DType::f32, {T, K});
        ref->from_host(xr.data(), xa);
        gpu->from_host(xv.data(), xg);
        Tensor oa = ref->alloc(DType::f32, {T, N}), og = poisoned({T, N});
        ref->linear(xa, wr, oa);
        gpu->linear(xg, wg, og);
        EXPECT_LE(err(oa, og), tol) << "linear mode " << mode << " " << T << "x" << K << "x" << N;
        ref->linear_add(xa, wr, oa);  // out += x·Wᵀ on top of the first result
        gpu->linear_add(xg, wg, og);
        EXPECT_LE(err(oa, og), tol) << "linear_add mode " << mode << " " << T << "x" << K << "x" << N;
      }
      {
        StoredTensor st = stored("blocks.0.att.w1", dt, K, N, rng, bytes);
        Tensor wr = ref->upload_weight(st, {K, N}), wg = gpu->upload_weight(st, {K, N});
        Tensor xa = ref->alloc(DType::f32, {T, K}), xg = gpu->alloc(DType::f32, {T, K});
        ref->from_host(xr.data(), xa);
        gpu->from_host(xv.data(), xg);
        Tensor oa = ref->alloc(DType::f32, {T, N}), og = poisoned({T, N});
        ref->matmul(xa, wr, oa);
        gpu->matmul(xg, wg, og);
        EXPECT_LE(err(oa, og), tol) << "matmul mode " << mode << " " << T << "x" << K << "x" << N;
      }
    }
    (mode == 2 ? fast : exact) = std::move(gpu);
  }
  gpu = std::move(exact);
}

// bf16 weights multiply split activations as one GEMM against a copy of the weight laid out twice, made on
// first use: the copy must follow the weight when it is overwritten in place, and must not outlive it when
// a new weight lands at the same address (the device pool hands freed blocks straight back).
TEST_F(CudaOps, Bf16SplitGemmFollowsItsWeight) {
  std::vector<uint8_t> b1, b2;
  const int64_t T = 40, K = 96, N = 72;
  StoredTensor s1 = stored("blocks.0.att.key.weight", DType::bf16, N, K, rng, b1);
  StoredTensor s2 = stored("blocks.0.att.value.weight", DType::bf16, N, K, rng, b2);
  auto [xa, xg] = rand({T, K});
  auto check = [&](const Tensor& wr, const Tensor& wg, const char* what) {
    Tensor oa = ref->alloc(DType::f32, {T, N}), og = poisoned({T, N});
    ref->linear(xa, wr, oa);
    gpu->linear(xg, wg, og);
    EXPECT_LE(err(oa, og), 5e-5) << what;
  };
  const void* first_address = nullptr;
  {
    Tensor wr = ref->upload_weight(s1, {N, K}), wg = gpu->upload_weight(s1, {N, K});
    first_address = wg.data;
    check(wr, wg, "first weight");
    Tensor w2r = ref->upload_weight(s2, {N, K}), w2g = gpu->upload_weight(s2, {N, K});
    ref->copy(w2r, wr), gpu->copy(w2g, wg);  // overwritten in place
    check(wr, wg, "weight overwritten in place");
  }
  Tensor wr = ref->upload_weight(s2, {N, K}), wg = gpu->upload_weight(s2, {N, K});
  check(wr, wg, wg.data == first_address ? "new weight at the freed address" : "new weight");
}

// The channel mix's ReLU² feed-forward: with bf16 weights and more than 8 rows the GPU squares while it
// splits the hidden rows for the value product (one pass fewer); otherwise the default op sequence.
TEST_F(CudaOps, ReluSquareFfn) {
  for (DType dt : {DType::bf16, DType::f32})
    for (auto [T, C, F] : {std::tuple{5, 64, 256}, {37, 96, 384}, {130, 100, 300}}) {
      std::vector<uint8_t> bk, bv;
      StoredTensor sk = stored("blocks.0.ffn.key.weight", dt, F, C, rng, bk);
      StoredTensor sv = stored("blocks.0.ffn.value.weight", dt, C, F, rng, bv);
      Tensor kr = ref->upload_weight(sk, {F, C}), kg = gpu->upload_weight(sk, {F, C});
      Tensor vr = ref->upload_weight(sv, {C, F}), vg = gpu->upload_weight(sv, {C, F});
      auto [xa, xg] = rand({T, C});
      auto [oa, og] = rand({T, C});  // the residual the result is added into
      ref->relu_square_ffn(xa, kr, vr, oa);
      gpu->relu_square_ffn(xg, kg, vg, og);
      EXPECT_LE(err(oa, og), dt == DType::bf16 ? 5e-5 : 1e-5) << dtype_name(dt) << " T=" << T << " C=" << C;
    }
}

TEST_F(CudaOps, LinearOnRowViews) {
  // Row views start at arbitrary offsets (the model passes them): alignment below 16 bytes.
  std::vector<uint8_t> bytes;
  StoredTensor st = stored("blocks.0.att.key.weight", DType::f32, 33, 65, rng, bytes);
  Tensor wr = ref->upload_weight(st, {33, 65}), wg = gpu->upload_weight(st, {33, 65});
  auto [xa, xg] = rand({9, 65});
  Tensor oa = ref->alloc(DType::f32, {9, 33}), og = poisoned({9, 33});
  Tensor va = xa.rows_view(3, 5), vg = xg.rows_view(3, 5), ova = oa.rows_view(1, 5), ovg = og.rows_view(1, 5);
  ref->linear(va, wr, ova);
  gpu->linear(vg, wg, ovg);
  EXPECT_LE(err(ova, ovg), 1e-5);
}

TEST_F(CudaOps, ElementwiseAndLayerNorm) {
  for (int64_t C : {1, 33, 768, 1000, 1500}) {  // 1500: LayerNorm's block kernel (rows over 1024)
    const int64_t T = 7;
    {
      auto [a, g] = rand({T, C}, -4, 4);
      ref->tanh_(a), gpu->tanh_(g);
      EXPECT_LE(err(a, g), 1e-6) << "tanh C=" << C;
    }
    {
      auto [a, g] = rand({T, C}, -8, 8);
      ref->sigmoid_(a), gpu->sigmoid_(g);
      EXPECT_LE(err(a, g), 1e-6) << "sigmoid";
    }
    {
      auto [a, g] = rand({T, C}, -3, 3);
      ref->relu_square_(a), gpu->relu_square_(g);
      EXPECT_LE(err(a, g), 1e-6) << "relu_square";
    }
    {
      auto [a, g] = rand({T, C});
      auto [b, h] = rand({T, C});
      ref->add_(a, b), gpu->add_(g, h);
      EXPECT_LE(err(a, g), 1e-7) << "add";
    }
    {
      auto [x, xg] = rand({T, C}, -2, 2);
      auto [d, dg] = rand({T, C});
      auto [mu, mug] = rand({C});
      Tensor o = ref->alloc(DType::f32, {T, C}), og = poisoned({T, C});
      ref->shift_mix(x, d, mu, o), gpu->shift_mix(xg, dg, mug, og);
      EXPECT_LE(err(o, og), 1e-6) << "shift_mix";
    }
    {
      auto [x, xg] = rand({T, C}, -3, 5);
      auto [w, wg] = rand({C});
      auto [b, bg] = rand({C});
      Tensor o = ref->alloc(DType::f32, {T, C}), og = poisoned({T, C});
      ref->layer_norm(x, w, b, 1e-5f, o), gpu->layer_norm(xg, wg, bg, 1e-5f, og);
      EXPECT_LE(err(o, og), 2e-5) << "layer_norm C=" << C;
      ref->layer_norm(x, w, b, 1e-5f, x), gpu->layer_norm(xg, wg, bg, 1e-5f, xg);  // in place
      EXPECT_LE(err(x, xg), 2e-5) << "layer_norm in place";
    }
  }
}

TEST_F(CudaOps, EmbeddingFp32AndBf16) {
  for (DType dt : {DType::f32, DType::bf16}) {
    std::vector<uint8_t> bytes;
    StoredTensor st = stored("emb.weight", dt, 301, 129, rng, bytes);
    Tensor er = ref->upload_weight(st, {301, 129}), eg = gpu->upload_weight(st, {301, 129});
    const std::vector<int32_t> ids = {0, 300, 5, 5, 177, 42, 1};
    Tensor o = ref->alloc(DType::f32, {7, 129}), og = poisoned({7, 129});
    ref->embedding(er, ids.data(), 7, o), gpu->embedding(eg, ids.data(), 7, og);
    EXPECT_EQ(err(o, og), 0.0) << dtype_name(dt);
  }
}

TEST_F(CudaOps, TokenShiftBatchedInPermutedSlots) {
  const int64_t C = 100;
  SeqBatch b{{0, 3, 3, 40, 41}, {2, 0, 3, 1}};  // includes an empty sequence
  auto [x, xg] = rand({41, C});
  auto [s, sg] = rand({4, C});
  Tensor d = ref->alloc(DType::f32, {41, C}), dg = poisoned({41, C});
  ref->token_shift(x, s, b, d), gpu->token_shift(xg, sg, b, dg);
  EXPECT_EQ(err(d, dg), 0.0);
  EXPECT_EQ(err(s, sg), 0.0);
}

// token_shift_mix_n against the reference's token_shift + one shift_mix per mix: ten mixes (two launches
// of up to eight), batched sequences in permuted slots with an empty one, widths with and without 16-byte
// vectors, and rows of a view (the shift of its first row comes from the state, not the row before it).
TEST_F(CudaOps, TokenShiftMixN) {
  for (int64_t C : {100, 33, 768})
    for (int64_t r0 : {int64_t(0), int64_t(1)}) {
      SeqBatch b{{0, 3, 3, 40, 41}, {2, 0, 3, 1}};
      auto [xa, xg] = rand({42, C});
      auto [s, sg] = rand({4, C});
      const Tensor x = xa.rows_view(r0, 41), xv = xg.rows_view(r0, 41);
      std::vector<std::pair<Tensor, Tensor>> mus;
      std::vector<Tensor> want, got;
      std::vector<const Tensor*> gm;
      std::vector<Tensor*> go;
      for (int i = 0; i < 10; ++i) mus.push_back(rand({C})), want.push_back(ref->alloc(DType::f32, {41, C})), got.push_back(poisoned({41, C}));
      for (int i = 0; i < 10; ++i) gm.push_back(&mus[size_t(i)].second), go.push_back(&got[size_t(i)]);
      Tensor d = ref->alloc(DType::f32, {41, C});
      ref->token_shift(x, s, b, d);
      for (size_t i = 0; i < mus.size(); ++i) ref->shift_mix(x, d, mus[i].first, want[i]);
      gpu->token_shift_mix_n(xv, sg, b, gm, go);
      for (size_t i = 0; i < mus.size(); ++i) EXPECT_LE(err(want[i], got[i]), 1e-6) << "mix " << i << " C=" << C << " r0=" << r0;
      EXPECT_EQ(err(s, sg), 0.0) << "shift state C=" << C << " r0=" << r0;
    }
}

// GEMM inputs written pre-split (bf16x2: rows [hi | lo]) by token_shift_mix_n: the halves are exactly the
// rounding of the fp32 mix, and the GEMMs give bit for bit what they give for the fp32 mix (≤ 8 rows and
// fp32 weights take hi + lo back to fp32: within the split's 2^-16).
TEST_F(CudaOps, SplitGemmInputs) {
  std::vector<uint8_t> bw, bm, bf;
  auto diff = [&](const Tensor& a, const Tensor& b) {  // two GPU tensors; NaN anywhere fails
    std::vector<float> x = host(*gpu, a), y = host(*gpu, b);
    for (float v : y)
      if (!std::isfinite(v)) return double(INFINITY);
    return test::rel_max_err(y, x);
  };
  for (int64_t C : {int64_t(768), int64_t(100), int64_t(33)})
    for (int64_t T : {int64_t(41), int64_t(5)})
      for (int64_t r0 : {int64_t(0), int64_t(1)}) {
        const int64_t N = 72;
        SCOPED_TRACE("C=" + std::to_string(C) + " T=" + std::to_string(T) + " r0=" + std::to_string(r0));
        StoredTensor sw = stored("blocks.0.att.key.weight", DType::bf16, N, C, rng, bw);
        StoredTensor sm = stored("blocks.0.att.w1", DType::bf16, C, N, rng, bm);
        StoredTensor sf = stored("blocks.0.att.value.weight", DType::f32, N, C, rng, bf);
        Tensor W = gpu->upload_weight(sw, {N, C}), M = gpu->upload_weight(sm, {C, N}), F = gpu->upload_weight(sf, {N, C});
        const Tensor* bf16_weights[] = {&W, &M};
        const Tensor* with_f32[] = {&W, &F};
        EXPECT_EQ(gpu->gemm_input_dtype(bf16_weights, T), T > 8 ? DType::bf16x2 : DType::f32);
        EXPECT_EQ(gpu->gemm_input_dtype(with_f32, T), DType::f32);

        SeqBatch b{{0, 2, T}, {1, 0}};
        auto [xa, xg] = rand({T + 1, C});
        const Tensor x = xg.rows_view(r0, T);
        std::vector<float> shift0 = random(2 * C);
        auto [mu, mug] = rand({C});
        Tensor s1 = gpu->alloc(DType::f32, {2, C}), s2 = gpu->alloc(DType::f32, {2, C});
        gpu->from_host(shift0.data(), s1), gpu->from_host(shift0.data(), s2);
        Tensor xf = poisoned({T, C}), xs = poisoned({T, C});
        xs.dtype = DType::bf16x2;
        const Tensor* mus[] = {&mug};
        Tensor* of[] = {&xf};
        Tensor* os[] = {&xs};
        gpu->token_shift_mix_n(x, s1, b, mus, of);
        gpu->token_shift_mix_n(x, s2, b, mus, os);

        // The halves, read back as raw bits.
        std::vector<float> f = host(*gpu, xf), raw(size_t(T * C));
        Tensor bits = xs;
        bits.dtype = DType::f32;
        gpu->to_host(bits, raw.data());
        std::vector<uint16_t> h(size_t(2 * T * C));
        std::memcpy(h.data(), raw.data(), h.size() * 2);
        int64_t bad = 0;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t c = 0; c < C; ++c) {
            const float v = f[size_t(t * C + c)];
            const uint16_t hi = f32_to_bf16(v), lo = f32_to_bf16(v - bf16_to_f32(hi));
            bad += h[size_t(t * 2 * C + c)] != hi || h[size_t(t * 2 * C + C + c)] != lo;
          }
        EXPECT_EQ(bad, 0) << "halves that are not the rounding of the fp32 mix";
        EXPECT_EQ(diff(s1, s2), 0.0) << "shift state";

        const double tol = T > 8 ? 0.0 : 1e-5;
        Tensor o1 = poisoned({T, N}), o2 = poisoned({T, N});
        gpu->linear(xf, W, o1), gpu->linear(xs, W, o2);
        EXPECT_LE(diff(o1, o2), tol) << "linear";
        gpu->linear_add(xf, W, o1), gpu->linear_add(xs, W, o2);
        EXPECT_LE(diff(o1, o2), tol) << "linear_add";
        Tensor m1 = poisoned({T, N}), m2 = poisoned({T, N});
        gpu->matmul(xf, M, m1), gpu->matmul(xs, M, m2);
        EXPECT_LE(diff(m1, m2), tol) << "matmul";
        Tensor f1 = poisoned({T, N}), f2 = poisoned({T, N});
        gpu->linear(xf, F, f1), gpu->linear(xs, F, f2);
        EXPECT_LE(diff(f1, f2), 1e-5) << "fp32 weight";
      }
}

TEST_F(CudaOps, Rwkv7ElementwiseOps) {
  for (int N : {64, 32, 48}) {
    const int64_t H = 3, C = H * N, T = 9;
    auto [w, wg] = rand({T, C}, -3, 3);
    auto [a, ag] = rand({T, C}, -3, 3);
    auto [k, kg] = rand({T, C});
    auto [w0, w0g] = rand({C});
    auto [a0, a0g] = rand({C});
    auto [kk, kkg] = rand({C});
    auto [ka, kag] = rand({C});
    Tensor al = ref->alloc(DType::f32, {T, C}), be = ref->alloc(DType::f32, {T, C});
    Tensor alg = poisoned({T, C}), beg = poisoned({T, C});
    ref->rwkv7_wkv_inputs(w, a, k, al, be, w0, a0, kk, ka, N);
    gpu->rwkv7_wkv_inputs(wg, ag, kg, alg, beg, w0g, a0g, kkg, kag, N);
    EXPECT_LE(err(w, wg), 2e-6) << "w N=" << N;
    EXPECT_LE(err(a, ag), 2e-6) << "a";
    EXPECT_LE(err(k, kg), 2e-6) << "k";
    EXPECT_LE(err(al, alg), 2e-6) << "alpha";
    EXPECT_LE(err(be, beg), 2e-6) << "beta";

    auto [v, vg] = rand({T, C});
    auto [vf, vfg] = rand({T, C});
    auto [gate, gateg] = rand({T, C}, -3, 3);
    auto [v0, v0g] = rand({C});
    ref->rwkv7_value_residual(v, vf, gate, v0), gpu->rwkv7_value_residual(vg, vfg, gateg, v0g);
    EXPECT_LE(err(v, vg), 2e-6) << "value_residual";

    auto [y, yg] = rand({T, C}, -2, 2);
    auto [r, rg] = rand({T, C});
    auto [rk, rkg] = rand({H, N});
    auto [g, gg] = rand({T, C});
    auto [lw, lwg] = rand({C});
    auto [lb, lbg] = rand({C});
    ref->rwkv7_output(y, r, k, v, rk, g, lw, lb, 64e-5f, N);
    gpu->rwkv7_output(yg, rg, kg, vg, rkg, gg, lwg, lbg, 64e-5f, N);
    EXPECT_LE(err(y, yg), 1e-5) << "output N=" << N;
  }
}

// wkv7 on the GPU against the reference for one batch: outputs and the new states.
void check_wkv7(CudaOps& t, int N, const SeqBatch& b, const std::string& what) {
  const int64_t H = 2, C = H * N, T = b.n_rows();
  // Inputs shaped like the model's: decays in (0, 1), α = -k̂, β = k̂ ⊙ a with k̂ unit per head.
  std::vector<float> r = t.random(T * C), w = t.random(T * C, 0.3f, 0.999f), k = t.random(T * C), v = t.random(T * C);
  std::vector<float> kk = t.random(T * C), a = t.random(T * C, 0, 1), al(kk.size()), be(kk.size());
  for (int64_t i = 0; i < T; ++i)
    for (int64_t h = 0; h < H; ++h) {
      double n2 = 0;
      for (int64_t j = 0; j < N; ++j) n2 += double(kk[size_t(i * C + h * N + j)]) * kk[size_t(i * C + h * N + j)];
      for (int64_t j = 0; j < N; ++j) {
        const size_t e = size_t(i * C + h * N + j);
        const float u = float(kk[e] / std::sqrt(n2));
        al[e] = -u, be[e] = u * a[e];
      }
    }
  auto [tr, gr] = t.both(r, {T, C});
  auto [tw, gw] = t.both(w, {T, C});
  auto [tk, gk] = t.both(k, {T, C});
  auto [tv, gv] = t.both(v, {T, C});
  auto [ta, ga] = t.both(al, {T, C});
  auto [tb, gb] = t.both(be, {T, C});
  auto [ts, gs] = t.rand({int64_t(b.n_seq()) + 1, H, N, N}, -0.5f, 0.5f);
  Tensor y = t.ref->alloc(DType::f32, {T, C}), yg = t.poisoned({T, C});
  t.ref->wkv7(tr, tw, tk, tv, ta, tb, ts, b, y, N);
  t.gpu->wkv7(gr, gw, gk, gv, ga, gb, gs, b, yg, N);
  EXPECT_LE(t.err(y, yg), 2e-5) << "y N=" << N << " " << what;
  EXPECT_LE(t.err(ts, gs), 2e-5) << "state N=" << N << " " << what;
}

TEST_F(CudaOps, Wkv7BatchedAllHeadSizes) {
  for (int N : {64, 32, 128, 24})
    check_wkv7(*this, N, SeqBatch{{0, 1, 38, 38, 75}, {1, 3, 0, 2}}, "");  // decode row, 37 rows, empty, 37 rows
}

// Long sequences run segment-parallel (transitions, chain, outputs): segment lengths that do and do not divide
// the sequences or the 16-token staging, a sequence shorter than a segment, an empty one and a decode row in
// the same batch, and the automatic choice; the sequential path (segments off) on the same batch.
TEST_F(CudaOps, Wkv7SegmentParallel) {
  const SeqBatch b{{0, 300, 301, 301, 1000, 1037}, {2, 0, 4, 1, 3}};
  for (int seg : {16, 37, 64, -1, 0}) {
    CudaBackendOptions o;
    o.wkv_segment_rows = seg;
    gpu = make_cuda_backend(o);
    for (int N : {64, 32, 128}) check_wkv7(*this, N, b, "segment rows " + std::to_string(seg));
  }
  // One sequence of 20 000 rows, automatic segments (the prefill shape): the chain walks many segments.
  CudaBackendOptions o;
  gpu = make_cuda_backend(o);
  check_wkv7(*this, 64, SeqBatch::single(20000), "20000 rows");
}

// Builds the same KV cache on both backends in `pieces` appends; bf16 caches get bf16-rounded keys/values on
// the reference side (the values the GPU stores).
struct Caches {
  KvCache r, g;
};

class CudaSparse : public CudaOps {
 protected:
  Caches build(int64_t C, int chunk, const std::vector<int64_t>& pieces, DType kv, std::vector<float>* last_q,
               int64_t q_rows) {
    Caches c;
    c.g.dtype = kv;
    for (int64_t n : pieces) {
      std::vector<float> k = random(n * C), v = random(n * C);
      auto [kr, kg] = both(kv == DType::bf16 ? round_bf16(k) : k, {n, C});
      auto [vr, vg] = both(kv == DType::bf16 ? round_bf16(v) : v, {n, C});
      if (kv == DType::bf16) gpu->from_host(k.data(), kg), gpu->from_host(v.data(), vg);
      ref->kv_append(c.r, kr, vr, chunk);
      gpu->kv_append(c.g, kg, vg, chunk);
    }
    *last_q = random(q_rows * C, -2, 2);
    return c;
  }
};

TEST_F(CudaSparse, AppendKeepsKeysAndChunkMeans) {
  for (DType kv : {DType::f32, DType::bf16}) {
    std::vector<float> q;
    Caches c = build(96, 7, {5, 30, 1, 50}, kv, &q, 1);
    EXPECT_EQ(c.g.len, c.r.len);
    EXPECT_EQ(c.g.n_chunks, c.r.n_chunks);
    EXPECT_EQ(c.g.k.dtype, kv);
    EXPECT_LE(err(c.r.chunk_mean.rows_view(0, c.r.n_chunks), c.g.chunk_mean.rows_view(0, c.g.n_chunks)), 1e-6);
    if (kv == DType::f32) {
      EXPECT_EQ(err(c.r.k.rows_view(0, c.r.len), c.g.k.rows_view(0, c.g.len)), 0.0);
      EXPECT_EQ(err(c.r.v.rows_view(0, c.r.len), c.g.v.rows_view(0, c.g.len)), 0.0);
    }
  }
}

struct AttnCase {
  int64_t C, D;
  int chunk, top_k;
  std::vector<int64_t> pieces;  // appends; the last one's rows are the queries
};

// Head dim 64 with ≥ 32 queries takes the bf16 tensor-core prefill path, in the backend's two precisions:
// the default splits every fp32 operand into bf16 hi + lo (~16 significant bits); single_bf16_activations rounds
// each operand once to bf16 (≈ 3 significant digits). The other cases (decode, other head sizes) are fp32.
TEST_F(CudaSparse, AttentionPrefillDecodeAndHeadSizes) {
  const std::vector<AttnCase> cases = {
      {128, 64, 16, 3, {40, 200}},          // prefill path, small chunks: many own chunks per tile
      {192, 64, 100, 3, {333, 300}},        // chunk not a multiple of the tile
      {128, 64, 64, 2, {0, 517}},           // one whole prefill from empty, top-1 past chunk
      {128, 64, 48, 5, {500, 97}},          // top-4 past chunks
      {64, 64, 2048, 3, {0, 2100}},         // one complete chunk of the official size
      {256, 64, 192, 3, {1000, 1500}},      // several 64-query groups per chosen chunk, queries off the tile
      {128, 64, 16, 1, {100, 77}},          // own chunk only
      {128, 64, 16, 3, {200, 1}},           // decode path
      {128, 64, 16, 3, {200, 7}},           // few queries: decode path
      {96, 32, 10, 3, {50, 40}},            // other head size: generic path
      {96, 48, 10, 4, {50, 40}},
      {64, 64, 8, 100, {100, 60}},          // more chunks asked than exist: dense attention
  };
  for (const bool single : {false, true}) {
    CudaBackendOptions opt;
    opt.single_bf16_activations = single;
    gpu = make_cuda_backend(opt);
    double worst_tiles = 0;  // over the tensor-core cases
    for (DType kv : {DType::f32, DType::bf16}) {
      for (const AttnCase& a : cases) {
        std::vector<float> qv;
        std::vector<int64_t> pieces;
        for (int64_t n : a.pieces)
          if (n) pieces.push_back(n);
        const int64_t T = a.pieces.back();
        Caches c = build(a.C, a.chunk, pieces, kv, &qv, T);
        auto [q, qg] = both(qv, {T, a.C});
        SparseAttnParams p{a.chunk, a.top_k, int(a.D)};
        Tensor o = ref->alloc(DType::f32, {T, a.C}), og = poisoned({T, a.C});
        ref->sparse_attention(q, c.r, p, o);
        gpu->sparse_attention(qg, c.g, p, og);
        const double e = err(o, og);
        const bool tiles = a.D == 64 && T >= 32;
        if (tiles) worst_tiles = std::max(worst_tiles, e);
        // Split tiles: three products of 2⁻¹⁶-accurate halves per term; fp32 paths: 2e-5 as before.
        EXPECT_LE(e, !tiles ? 2e-5 : single ? 1e-2 : 5e-5)
            << (single ? "single" : "split") << " bf16 tiles, " << dtype_name(kv) << " C=" << a.C << " D=" << a.D
            << " chunk=" << a.chunk << " top_k=" << a.top_k << " T=" << T;
      }
    }
    std::printf("[sparse] %s bf16 tiles: worst rel_max_err %.3g\n", single ? "single" : "split", worst_tiles);
  }
}

// Every chunk holds the same keys, so all gate scores tie exactly: the lowest chunks must be chosen (spec
// §5.2), which the values (random per row) make visible in the output. Prefill and decode paths.
TEST_F(CudaSparse, GateTiesPickLowerChunks) {
  const int64_t C = 128, L = 200;
  const int chunk = 16;
  std::vector<float> base = random(chunk * C), k(size_t(L * C)), v = random(L * C);
  for (int64_t r = 0; r < L; ++r)
    std::copy_n(base.begin() + (r % chunk) * C, C, k.begin() + r * C);
  for (const int64_t T : {int64_t(40), int64_t(1)}) {
    Caches c;
    auto [kr, kg] = both(k, {L, C});
    auto [vr, vg] = both(v, {L, C});
    ref->kv_append(c.r, kr, vr, chunk);
    gpu->kv_append(c.g, kg, vg, chunk);
    auto [q, qg] = rand({T, C}, -2, 2);
    const SparseAttnParams p{chunk, 3, 64};
    Tensor o = ref->alloc(DType::f32, {T, C}), og = poisoned({T, C});
    // The last T rows are the queries (a cache of L rows attended by its last T positions).
    ref->sparse_attention(q, c.r, p, o);
    gpu->sparse_attention(qg, c.g, p, og);
    EXPECT_LE(err(o, og), 5e-5) << "T=" << T;
  }
}

TEST_F(CudaSparse, EvictionMatchesReference) {
  for (DType kv : {DType::f32, DType::bf16}) {
    std::vector<float> qv;
    Caches c = build(128, 16, {150, 130}, kv, &qv, 20);
    auto [q, qg] = both(qv, {20, 128});
    KvEvictionParams e{200, 50, 150};
    SparseAttnParams p{16, 3, 64};
    ref->kv_evict(c.r, q, e, p);
    gpu->kv_evict(c.g, qg, e, p);
    ASSERT_EQ(c.g.len, c.r.len);
    ASSERT_EQ(c.g.len, 150);
    EXPECT_EQ(c.g.n_chunks, c.r.n_chunks);
    EXPECT_LE(err(c.r.chunk_mean.rows_view(0, c.r.n_chunks), c.g.chunk_mean.rows_view(0, c.g.n_chunks)), 1e-6);
    if (kv == DType::f32) {
      EXPECT_EQ(err(c.r.k.rows_view(0, c.r.len), c.g.k.rows_view(0, c.g.len)), 0.0);
      EXPECT_EQ(err(c.r.v.rows_view(0, c.r.len), c.g.v.rows_view(0, c.g.len)), 0.0);
    }
    // Below the threshold nothing changes.
    KvEvictionParams off{1000, 50, 150};
    const int64_t len = c.g.len;
    gpu->kv_evict(c.g, qg, off, p);
    EXPECT_EQ(c.g.len, len);
  }
}

TEST_F(CudaOps, CopyFillAndTransfers) {
  auto [a, g] = rand({5, 77});
  Tensor h = gpu->alloc(DType::f32, {5, 77});
  EXPECT_EQ(host(*gpu, h), std::vector<float>(385, 0.f));  // alloc is zero-filled
  gpu->copy(g, h);
  EXPECT_EQ(host(*gpu, h), host(*ref, a));
  Tensor row = h.rows_view(2, 1);
  gpu->fill_zero(row);
  std::vector<float> v = host(*gpu, h);
  for (int i = 0; i < 77; ++i) EXPECT_EQ(v[size_t(2 * 77 + i)], 0.f);
  Tensor b = gpu->alloc(DType::bf16, {3, 5});
  EXPECT_EQ(b.nbytes(), 30u);
}

}  // namespace
}  // namespace rwkvx
