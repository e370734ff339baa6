// Every fast CPU op against the fp32 reference on fresh random inputs, for each instruction set this
// machine supports (the dispatch is forced per test; unsupported sets are skipped with the reason).
// Sizes include ones that are not multiples of the vector width, the register tile or the cache block.
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "support/test_util.h"

namespace rwkvx {
namespace {

class CpuOps : public testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!cpu_supports(GetParam())) GTEST_SKIP() << "this CPU lacks " << isa_name(GetParam());
    CpuBackendOptions o;
    o.isa = isa_name(GetParam());
    o.n_threads = 2;
    fast = make_cpu_backend(o);
    set_forced_isa("");
  }
  // Random fp32 tensor on both backends.
  std::pair<Tensor, Tensor> rand(std::initializer_list<int64_t> shape, float lo = -1, float hi = 1) {
    Tensor a = ref->alloc(DType::f32, shape), b = fast->alloc(DType::f32, shape);
    std::vector<float> v(static_cast<size_t>(a.numel()));
    std::uniform_real_distribution<float> u(lo, hi);
    for (float& x : v) x = u(rng);
    ref->from_host(v.data(), a);
    fast->from_host(v.data(), b);
    return {a, b};
  }
  std::vector<float> host(Backend& be, const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    be.to_host(t, v.data());
    return v;
  }
  double err(const Tensor& a, const Tensor& b) { return test::rel_max_err(host(*fast, b), host(*ref, a)); }

  std::mt19937 rng{1234};
  std::unique_ptr<Backend> ref = make_reference_backend();
  std::unique_ptr<Backend> fast;
};

// A checkpoint-like tensor in the given dtype; its fp32 values (as the reference sees them) go to `values`.
StoredTensor stored(const std::string& name, DType dt, int64_t rows, int64_t cols, std::mt19937& rng,
                    std::vector<uint8_t>& bytes) {
  std::normal_distribution<float> nd(0.f, 0.2f);
  bytes.resize(size_t(rows * cols) * dtype_size(dt));
  for (int64_t i = 0; i < rows * cols; ++i) {
    float v = nd(rng);
    if (dt == DType::f32) std::memcpy(bytes.data() + 4 * i, &v, 4);
    else {
      uint16_t h = f32_to_bf16(v);
      if (dt == DType::f16) {  // small normal values: round through bf16 then encode exactly as f16
        const float f = bf16_to_f32(h);
        uint32_t u;
        std::memcpy(&u, &f, 4);
        const int e = int((u >> 23) & 0xff) - 127 + 15;
        h = e <= 0 ? uint16_t((u >> 16) & 0x8000) : uint16_t(((u >> 16) & 0x8000) | (e << 10) | ((u >> 13) & 0x3ff));
      }
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

TEST_P(CpuOps, LinearAllFormatsAndShapes) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    for (auto [T, K, N] : {std::tuple{1, 64, 48}, {3, 100, 37}, {4, 768, 129}, {5, 64, 16}, {37, 300, 67},
                           {101, 268, 1090}, {130, 520, 200}}) {
      std::vector<uint8_t> bytes;
      StoredTensor st = stored("blocks.0.att.key.weight", dt, N, K, rng, bytes);
      Tensor wr = ref->upload_weight(st, {N, K}), wf = fast->upload_weight(st, {N, K});
      auto [xr, xf] = rand({T, K});
      Tensor yr = ref->alloc(DType::f32, {T, N}), yf = fast->alloc(DType::f32, {T, N});
      ref->linear(xr, wr, yr);
      fast->linear(xf, wf, yf);
      EXPECT_LE(err(yr, yf), 2e-6) << dtype_name(dt) << " T=" << T << " K=" << K << " N=" << N;
      // linear_add adds into what out holds (the fast backend's GEMMs accumulate; the reference adds).
      auto [rr, rf] = rand({T, N});
      ref->linear_add(xr, wr, rr);
      fast->linear_add(xf, wf, rf);
      EXPECT_LE(err(rr, rf), 2e-6) << "linear_add " << dtype_name(dt) << " T=" << T << " K=" << K << " N=" << N;
    }
  }
}

// Decode rows (M ≤ 4) with K a multiple of 64 on AVX2/AVX-512 run int8 × int8: activations quantized per
// block of 64 at run time. This emulates that on the host, exactly as specified in kernels_impl.h.
std::vector<float> int8_activation_linear(const std::vector<float>& x, int64_t T, int64_t K, const int8_t* wq,
                                          const float* scales, int64_t N) {
  std::vector<float> y(static_cast<size_t>(T * N));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> qa(static_cast<size_t>(K));
    std::vector<float> d(static_cast<size_t>(K / 64));
    for (int64_t b = 0; b < K / 64; ++b) {
      float amax = 0.f;
      for (int64_t i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(x[size_t(t * K + b * 64 + i)]));
      d[size_t(b)] = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t i = 0; i < 64; ++i) qa[size_t(b * 64 + i)] = int(std::lrint(x[size_t(t * K + b * 64 + i)] * inv));
    }
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t b = 0; b < K / 64; ++b) {
        int64_t dot = 0;
        for (int64_t i = b * 64; i < (b + 1) * 64; ++i) dot += int64_t(qa[size_t(i)]) * wq[n * K + i];
        acc += double(d[size_t(b)]) * double(dot);
      }
      y[size_t(t * N + n)] = float(acc * scales[n]);
    }
  }
  return y;
}

TEST_P(CpuOps, LinearInt8MatchesDequantizedReference) {
  CpuBackendOptions o;
  o.isa = isa_name(GetParam());
  o.quantize_int8 = true;
  auto q8 = make_cpu_backend(o);
  set_forced_isa("");
  for (auto [T, K, N] : {std::tuple{1, 64, 48}, {2, 768, 129}, {33, 300, 70}, {3, 128, 37}, {4, 3072, 33}, {1, 300, 9},
                         {12, 256, 40}}) {
    std::vector<uint8_t> bytes;
    StoredTensor st = stored("blocks.0.ffn.key.weight", DType::bf16, N, K, rng, bytes);
    Tensor wq = q8->upload_weight(st, {N, K});
    ASSERT_EQ(wq.dtype, DType::q8);
    // Dequantize on the host and run the reference with those exact weights.
    const auto* qv = static_cast<const int8_t*>(wq.data);
    std::vector<float> deq(size_t(N * K));
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < K; ++c) deq[size_t(r * K + c)] = float(qv[r * K + c]) * wq.scales[r];
    Tensor wr = ref->alloc(DType::f32, {N, K});
    ref->from_host(deq.data(), wr);
    auto [xr, xf] = rand({T, K});
    Tensor yr = ref->alloc(DType::f32, {T, N}), yq = q8->alloc(DType::f32, {T, N});
    ref->linear(xr, wr, yr);
    q8->linear(xf, wq, yq);
    const std::vector<float> got = host(*q8, yq), dequantized = host(*ref, yr);
    const bool int_dot = GetParam() != Isa::scalar && T <= 4 && K % 64 == 0;
    SCOPED_TRACE("T=" + std::to_string(T) + " K=" + std::to_string(K) + (int_dot ? " int8 x int8" : " int8 x fp32"));
    if (int_dot) {
      EXPECT_LE(test::rel_max_err(got, int8_activation_linear(host(*ref, xr), T, K, qv, wq.scales, N)), 2e-6);
      // Quantizing the activations too costs little against fp32 activations (8-bit blocks of 64).
      EXPECT_LE(test::rel_max_err(got, dequantized), 2e-2);
    } else {
      EXPECT_LE(test::rel_max_err(got, dequantized), 2e-6);
    }
    // And the quantization itself is within half a step of the bf16 weights.
    std::vector<float> orig = st.to_f32();
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < K; ++c) ASSERT_LE(std::fabs(deq[size_t(r * K + c)] - orig[size_t(r * K + c)]), 0.5001f * wq.scales[r]);
  }
}

TEST_P(CpuOps, MatmulLowRank) {
  // Few rows stream W; many rows (per thread chunk > 2·MR) take the packed kernel, K > 256 two K blocks.
  for (DType dt : {DType::bf16, DType::f32, DType::f16}) {
    for (auto [T, K, N] : {std::tuple{1, 768, 64}, {1, 30, 70}, {7, 64, 768}, {40, 96, 33}, {3, 32, 130},
                           {100, 300, 70}, {61, 768, 64}}) {
      std::vector<uint8_t> bytes;
      StoredTensor st = stored("blocks.1.att.w1", dt, K, N, rng, bytes);
      Tensor wr = ref->upload_weight(st, {K, N}), wf = fast->upload_weight(st, {K, N});
      auto [xr, xf] = rand({T, K});
      Tensor yr = ref->alloc(DType::f32, {T, N}), yf = fast->alloc(DType::f32, {T, N});
      ref->matmul(xr, wr, yr);
      fast->matmul(xf, wf, yf);
      EXPECT_LE(err(yr, yf), 2e-6) << dtype_name(dt) << " T=" << T << " K=" << K << " N=" << N;
    }
  }
}

TEST_P(CpuOps, ElementwiseAndNorms) {
  for (int64_t T : {1, 3, 70}) {
    const int64_t C = 192;
    auto [xr, xf] = rand({T, C}, -9, 9);
    ref->tanh_(xr), fast->tanh_(xf);
    EXPECT_LE(err(xr, xf), 1e-6);
    auto [sr, sf] = rand({T, C}, -30, 30);
    ref->sigmoid_(sr), fast->sigmoid_(sf);
    EXPECT_LE(err(sr, sf), 1e-6);
    auto [rr, rf] = rand({T, C + 5});  // a row length off the vector width: the scalar tail too
    ref->relu_square_(rr), fast->relu_square_(rf);
    EXPECT_LE(err(rr, rf), 1e-7);
    auto [wr, wf] = rand({C}, 0.5f, 1.5f);
    auto [br, bf] = rand({C});
    Tensor lr = ref->alloc(DType::f32, {T, C}), lf = fast->alloc(DType::f32, {T, C});
    ref->layer_norm(sr, wr, br, 1e-5f, lr);
    fast->layer_norm(sf, wf, bf, 1e-5f, lf);
    EXPECT_LE(err(lr, lf), 2e-6);
  }
}

// The WKV-7 kernel runs value rows in blocks (threads split a head's rows): head sizes whose rows do not
// fill whole blocks, one-token calls (decode) and a prefill split into calls must all match the reference.
TEST_P(CpuOps, Wkv7RowBlocksAndSplitCalls) {
  for (int64_t N : {64, 24, 32, 6}) {
    const int64_t T = 13, C = 2 * N;
    auto [rr, rf] = rand({T, C});
    auto [wr, wf] = rand({T, C}, 0.3f, 1.0f);
    auto [kr, kf] = rand({T, C});
    auto [vr, vf] = rand({T, C});
    auto [ar, af] = rand({T, C}, -0.3f, 0.3f);
    auto [br, bf] = rand({T, C}, -0.3f, 0.3f);
    auto [sr, sf] = rand({1, C / N, N, N}, -0.5f, 0.5f);
    Tensor yr = ref->alloc(DType::f32, {T, C}), yf = fast->alloc(DType::f32, {T, C});
    ref->wkv7(rr, wr, kr, vr, ar, br, sr, SeqBatch::single(T), yr, int(N));
    // The fast backend walks the same tokens as calls of 1, 1, 5 and 6 rows, carrying its state.
    for (auto [t0, n] : {std::pair<int64_t, int64_t>{0, 1}, {1, 1}, {2, 5}, {7, 6}}) {
      Tensor ys = yf.rows_view(t0, n);
      fast->wkv7(rf.rows_view(t0, n), wf.rows_view(t0, n), kf.rows_view(t0, n), vf.rows_view(t0, n),
                 af.rows_view(t0, n), bf.rows_view(t0, n), sf, SeqBatch::single(n), ys, int(N));
    }
    EXPECT_LE(err(yr, yf), 1e-5) << "head size " << N;
    EXPECT_LE(err(sr, sf), 1e-5) << "head size " << N;
  }
}

TEST_P(CpuOps, Rwkv7TimeMixOps) {
  const int64_t T = 29, C = 192, N = 64;
  auto [wr, wf] = rand({T, C}, -3, 3);
  auto [ar, af] = rand({T, C}, -3, 3);
  auto [kr, kf] = rand({T, C});
  auto [w0r, w0f] = rand({C}, -4, 1);
  auto [a0r, a0f] = rand({C});
  auto [kkr, kkf] = rand({C}, 0.5f, 1);
  auto [kar, kaf] = rand({C}, 0, 1);
  Tensor alr = ref->alloc(DType::f32, {T, C}), alf = fast->alloc(DType::f32, {T, C});
  Tensor ber = ref->alloc(DType::f32, {T, C}), bef = fast->alloc(DType::f32, {T, C});
  ref->rwkv7_wkv_inputs(wr, ar, kr, alr, ber, w0r, a0r, kkr, kar, int(N));
  fast->rwkv7_wkv_inputs(wf, af, kf, alf, bef, w0f, a0f, kkf, kaf, int(N));
  for (auto [x, y] : {std::pair{wr, wf}, {ar, af}, {kr, kf}, {alr, alf}, {ber, bef}}) EXPECT_LE(err(x, y), 2e-6);

  // WKV over two sequences in permuted slots, carrying state.
  auto [rr, rf] = rand({T, C});
  auto [vr, vf] = rand({T, C});
  auto [sr, sf] = rand({3, C / N, N, N}, -0.5f, 0.5f);
  SeqBatch b{{0, 11, T}, {2, 0}};
  Tensor yr = ref->alloc(DType::f32, {T, C}), yf = fast->alloc(DType::f32, {T, C});
  ref->wkv7(rr, wr, kr, vr, alr, ber, sr, b, yr, int(N));
  fast->wkv7(rf, wf, kf, vf, alf, bef, sf, b, yf, int(N));
  EXPECT_LE(err(yr, yf), 1e-5);
  EXPECT_LE(err(sr, sf), 1e-5);

  auto [gr, gf] = rand({T, C});
  auto [rkr, rkf] = rand({C / N, N});
  auto [lwr, lwf] = rand({C}, 0.5f, 1.5f);
  auto [lbr, lbf] = rand({C});
  ref->rwkv7_output(yr, rr, kr, vr, rkr, gr, lwr, lbr, 64e-5f, int(N));
  fast->rwkv7_output(yf, rf, kf, vf, rkf, gf, lwf, lbf, 64e-5f, int(N));
  EXPECT_LE(err(yr, yf), 1e-5);

  auto [vfr, vff] = rand({T, C});
  auto [vgr, vgf] = rand({T, C});
  auto [v0r, v0f] = rand({C});
  ref->rwkv7_value_residual(vr, vfr, vgr, v0r);
  fast->rwkv7_value_residual(vf, vff, vgf, v0f);
  EXPECT_LE(err(vr, vf), 2e-6);
}

TEST_P(CpuOps, SparseAttentionMatchesReference) {
  for (DType kv : {DType::f32, DType::bf16}) {
    // The last two have chunks longer than the prefill's 256-key score tiles (production uses 2048), so
    // selected and causal own chunks span several tiles, one of them partial.
    for (auto [C, L, chunk, top_k] : {std::tuple{64, 45, 4, 3}, {192, 150, 16, 3}, {128, 77, 5, 2}, {256, 64, 8, 4},
                                      {128, 300, 24, 3}, {64, 260, 100, 3}, {64, 700, 300, 2}, {128, 1100, 260, 3}}) {
      auto [kr, kf] = rand({L, C});
      auto [vr, vf] = rand({L, C});
      auto [qr, qf] = rand({L, C}, -2, 2);
      KvCache cr, cf;
      cr.dtype = cf.dtype = kv;
      SparseAttnParams p;
      p.chunk = chunk;
      p.top_k = top_k;
      // Prefill of most rows, then single-token steps.
      const int64_t split = L - 3;
      std::vector<float> out_r, out_f;
      for (auto [r0, n] : {std::pair<int64_t, int64_t>{0, split}, {split, 1}, {split + 1, 1}, {split + 2, 1}}) {
        ref->kv_append(cr, kr.rows_view(r0, n), vr.rows_view(r0, n), chunk);
        fast->kv_append(cf, kf.rows_view(r0, n), vf.rows_view(r0, n), chunk);
        Tensor orr = ref->alloc(DType::f32, {n, C}), off = fast->alloc(DType::f32, {n, C});
        ref->sparse_attention(qr.rows_view(r0, n), cr, p, orr);
        fast->sparse_attention(qf.rows_view(r0, n), cf, p, off);
        auto a = host(*ref, orr), b = host(*fast, off);
        out_r.insert(out_r.end(), a.begin(), a.end());
        out_f.insert(out_f.end(), b.begin(), b.end());
      }
      EXPECT_EQ(cf.k.dtype, kv);
      EXPECT_LE(test::rel_max_err(out_f, out_r), 2e-6)
          << "kv=" << dtype_name(kv) << " C=" << C << " L=" << L << " chunk=" << chunk;
    }
  }
}

// A bf16 cache means: keys and values rounded to bf16 once, at append; everything after is fp32. So it
// must equal an f32 cache that was fed the rounded values.
TEST_P(CpuOps, Bf16KvCacheEqualsRoundedF32Cache) {
  const int64_t C = 128, L = 90, chunk = 8;
  auto [k, k_unused] = rand({L, C});
  auto [v, v_unused] = rand({L, C});
  auto [q, q_unused] = rand({L, C}, -2, 2);
  std::vector<float> kh = host(*ref, k), vh = host(*ref, v);
  for (float& x : kh) x = bf16_to_f32(f32_to_bf16(x));
  for (float& x : vh) x = bf16_to_f32(f32_to_bf16(x));
  Tensor k_rounded = fast->alloc(DType::f32, {L, C}), v_rounded = fast->alloc(DType::f32, {L, C});
  fast->from_host(kh.data(), k_rounded);
  fast->from_host(vh.data(), v_rounded);
  Tensor qf = fast->alloc(DType::f32, {L, C});
  fast->from_host(host(*ref, q).data(), qf);
  KvCache half, full;
  half.dtype = DType::bf16;
  SparseAttnParams p;
  p.chunk = chunk;
  Tensor kf = fast->alloc(DType::f32, {L, C}), vf = fast->alloc(DType::f32, {L, C});
  fast->from_host(host(*ref, k).data(), kf);
  fast->from_host(host(*ref, v).data(), vf);
  fast->kv_append(half, kf, vf, chunk);
  fast->kv_append(full, k_rounded, v_rounded, chunk);
  EXPECT_EQ(half.k.nbytes() * 2, full.k.nbytes());
  Tensor oh = fast->alloc(DType::f32, {L, C}), of = fast->alloc(DType::f32, {L, C});
  fast->sparse_attention(qf, half, p, oh);
  fast->sparse_attention(qf, full, p, of);
  EXPECT_LE(test::rel_max_err(host(*fast, oh), host(*fast, of)), 1e-6);
  // Widening the stored keys gives back exactly the rounded values.
  std::vector<float> back(size_t(L * C));
  fast->to_host(half.k.rows_view(0, L), back.data());
  EXPECT_EQ(back, kh);
}

// The AMX tile GEMMs split activations into three bf16 parts whose sum is exact, so against an fp64
// reference they must be as accurate as the AVX-512 FMA kernels (fp32 sums in another order). Two parts
// would leave a 2^-17 relative error per product, several times the fp32 summation error here.
TEST(AmxTiles, AsAccurateAsFmaKernels) {
  if (!cpu_supports(Isa::amx)) GTEST_SKIP() << "this CPU lacks amx";
  auto backend = [](const char* isa, bool int8) {
    CpuBackendOptions o;
    o.isa = isa;
    o.n_threads = 2;
    o.quantize_int8 = int8;
    auto be = make_cpu_backend(o);
    set_forced_isa("");
    return be;
  };
  std::mt19937 rng{77};
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto host = [](Backend& be, const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    be.to_host(t, v.data());
    return v;
  };
  // y[t][n] = Σ_k x[t][k] · w(n, k) in fp64.
  auto reference = [](const std::vector<float>& x, int64_t T, int64_t K, int64_t N, auto w) {
    std::vector<double> y(static_cast<size_t>(T * N));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += double(x[size_t(t * K + k)]) * w(n, k);
        y[size_t(t * N + n)] = acc;
      }
    return y;
  };
  for (bool int8 : {false, true}) {
    auto amx = backend("amx", int8), fma = backend("avx512", int8);
    for (auto [T, K, N] : {std::tuple{5, 768, 64}, {33, 3072, 100}, {512, 768, 768}, {70, 64, 768}}) {
      std::vector<uint8_t> bytes;
      StoredTensor st = stored("blocks.0.ffn.key.weight", DType::bf16, N, K, rng, bytes);
      Tensor wa = amx->upload_weight(st, {N, K}), wf = fma->upload_weight(st, {N, K});
      std::vector<float> x(static_cast<size_t>(T * K));
      for (float& v : x) v = u(rng);
      Tensor xa = amx->alloc(DType::f32, {T, K}), xf = fma->alloc(DType::f32, {T, K});
      amx->from_host(x.data(), xa);
      fma->from_host(x.data(), xf);
      Tensor ya = amx->alloc(DType::f32, {T, N}), yf = fma->alloc(DType::f32, {T, N});
      amx->linear(xa, wa, ya);
      fma->linear(xf, wf, yf);
      const std::vector<float> wv = st.to_f32();
      const auto* q = static_cast<const int8_t*>(wa.data);
      const std::vector<double> want =
          int8 ? reference(x, T, K, N, [&](int64_t n, int64_t k) { return double(q[n * K + k]) * wa.scales[n]; })
               : reference(x, T, K, N, [&](int64_t n, int64_t k) { return double(wv[size_t(n * K + k)]); });
      const double e_amx = test::rel_max_err(host(*amx, ya), want), e_fma = test::rel_max_err(host(*fma, yf), want);
      EXPECT_LE(e_amx, 2 * e_fma + 1e-7) << (int8 ? "int8" : "bf16") << " linear T=" << T << " K=" << K << " N=" << N
                                         << ": amx " << e_amx << ", fma " << e_fma;
      if (int8) continue;
      // Low-rank products: W [K, N] as stored.
      StoredTensor lr = stored("blocks.0.att.w1", DType::bf16, K, N, rng, bytes);
      Tensor la = amx->upload_weight(lr, {K, N}), lf = fma->upload_weight(lr, {K, N});
      amx->matmul(xa, la, ya);
      fma->matmul(xf, lf, yf);
      const std::vector<float> lv = lr.to_f32();
      const std::vector<double> want_lr = reference(x, T, K, N, [&](int64_t n, int64_t k) { return double(lv[size_t(k * N + n)]); });
      const double l_amx = test::rel_max_err(host(*amx, ya), want_lr), l_fma = test::rel_max_err(host(*fma, yf), want_lr);
      EXPECT_LE(l_amx, 2 * l_fma + 1e-7) << "matmul T=" << T << " K=" << K << " N=" << N << ": amx " << l_amx
                                         << ", fma " << l_fma;
    }
  }
}

// The prefill window: 8192 rows unless RWKVX_CPU_ROWS_PER_CALL says otherwise; a bad value is an error
// that names the variable.
TEST(CpuBackendWindow, DefaultAndEnvironmentOverride) {
  struct Restore {
    ~Restore() { unsetenv("RWKVX_CPU_ROWS_PER_CALL"); }
  } restore;
  unsetenv("RWKVX_CPU_ROWS_PER_CALL");
  EXPECT_EQ(make_cpu_backend()->preferred_rows_per_call(), 8192);
  setenv("RWKVX_CPU_ROWS_PER_CALL", "1000", 1);
  EXPECT_EQ(make_cpu_backend()->preferred_rows_per_call(), 1000);
  for (const char* bad : {"0", "-5", "12x", "abc", "99999999"}) {
    setenv("RWKVX_CPU_ROWS_PER_CALL", bad, 1);
    try {
      make_cpu_backend();
      ADD_FAILURE() << "accepted RWKVX_CPU_ROWS_PER_CALL=" << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("RWKVX_CPU_ROWS_PER_CALL"), std::string::npos) << e.what();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, CpuOps, testing::Values(Isa::scalar, Isa::avx2, Isa::avx512, Isa::amx),
                         [](const auto& i) { return std::string(isa_name(i.param)); });

}  // namespace
}  // namespace rwkvx
