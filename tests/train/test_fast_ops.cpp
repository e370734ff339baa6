// The fp32 fast path of the training ops (src/train/ops/fast.*): every product form, linear / matmul
// forward and backward, and the fused head with CE + L2Wrap against the double loops on fresh random
// inputs whose sizes straddle the GEMM tiles (256 × 512, reduction pieces of 8192); the whole model's
// float gradients against fp64; and bit-identical results for 1, 2 and 3 op threads.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "core/thread_pool.h"
#include "support/test_util.h"
#include "train/ops/embedding.h"
#include "train/ops/fast.h"
#include "train/ops/linear.h"
#include "train/ops/parallel.h"
#include "train/train_model.h"

namespace rwkvx::train {
namespace {

std::vector<float> rand_f(int64_t n, std::mt19937_64& rng, float lo = -1, float hi = 1) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}
std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// max |fast − ref| / max |ref|: the fp32 bar for sums of up to ~10⁴ products of O(1) values is ~1e-6
// relative to the largest entry (rounding grows like √K · 2⁻²⁴); 2e-5 leaves room without hiding a
// wrong index, which gives errors of order 1.
constexpr double kTol = 2e-5;
using test::rel_max_err;

// C (+)= op(A) op(B) in double, straight from the definition.
std::vector<double> gemm_ref(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const std::vector<float>& A,
                             const std::vector<float>& B, const std::vector<float>& C0, bool acc) {
  std::vector<double> C(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = acc ? double(C0[size_t(m * N + n)]) : 0.0;
      for (int64_t k = 0; k < K; ++k)
        s += double(A[size_t(ta ? k * M + m : m * K + k)]) * double(B[size_t(tb ? n * K + k : k * N + n)]);
      C[size_t(m * N + n)] = s;
    }
  return C;
}

struct Shape {
  int64_t M, N, K;
};

TEST(FastOps, GemmAllLayoutsMatchDouble) {
  std::mt19937_64 rng(101);
  // Off-tile sizes: 1 row, a ragged second M tile, a ragged second N tile, and a reduction split into
  // pieces (few output tiles, K ≥ 2 · 8192) with a ragged last piece.
  for (const Shape s : {Shape{1, 7, 5}, Shape{37, 523, 70}, Shape{300, 45, 33}, Shape{5, 3, 20001}}) {
    for (int layout = 0; layout < 4; ++layout) {
      const bool ta = layout & 1, tb = layout & 2;
      for (bool acc : {false, true}) {
        const std::vector<float> A = rand_f(s.M * s.K, rng), B = rand_f(s.K * s.N, rng);
        std::vector<float> C = rand_f(s.M * s.N, rng);
        const std::vector<double> ref = gemm_ref(ta, tb, s.M, s.N, s.K, A, B, C, acc);
        fast::gemm(ta, tb, s.M, s.N, s.K, A.data(), ta ? s.M : s.K, B.data(), tb ? s.K : s.N, C.data(), s.N, acc);
        EXPECT_LE(rel_max_err(C, ref), kTol) << s.M << "x" << s.N << "x" << s.K << " ta " << ta << " tb " << tb
                                         << " acc " << acc;
      }
    }
  }
}

TEST(FastOps, LinearAndMatmulMatchDouble) {
  std::mt19937_64 rng(102);
  const int64_t T = 261, in = 70, out = 530;
  for (bool lin : {true, false}) {
    const std::vector<float> x = rand_f(T * in, rng), W = rand_f(out * in, rng), dy = rand_f(T * out, rng);
    std::vector<float> y(static_cast<size_t>(T * out)), dx = rand_f(T * in, rng), dW = rand_f(out * in, rng);
    std::vector<double> yd(y.size()), dxd = to_d(dx), dWd = to_d(dW);
    const std::vector<double> xd = to_d(x), Wd = to_d(W), dyd = to_d(dy);
    if (lin) {
      linear_forward(x.data(), W.data(), y.data(), T, in, out);
      linear_forward(xd.data(), Wd.data(), yd.data(), T, in, out);
      linear_backward(dy.data(), x.data(), W.data(), dx.data(), dW.data(), T, in, out);
      linear_backward(dyd.data(), xd.data(), Wd.data(), dxd.data(), dWd.data(), T, in, out);
    } else {
      matmul_forward(x.data(), W.data(), y.data(), T, in, out);
      matmul_forward(xd.data(), Wd.data(), yd.data(), T, in, out);
      matmul_backward(dy.data(), x.data(), W.data(), dx.data(), dW.data(), T, in, out);
      matmul_backward(dyd.data(), xd.data(), Wd.data(), dxd.data(), dWd.data(), T, in, out);
    }
    EXPECT_LE(rel_max_err(y, yd), kTol) << (lin ? "linear" : "matmul");
    EXPECT_LE(rel_max_err(dx, dxd), kTol) << (lin ? "linear" : "matmul");
    EXPECT_LE(rel_max_err(dW, dWd), kTol) << (lin ? "linear" : "matmul");
  }
}

// The head in float and in double on the same inputs: T = 300 positions (two row blocks of 256),
// V = 1100 (three N tiles), some ignored targets and zero coefficients, L2Wrap from row 17.
struct HeadCase {
  int64_t T = 300, C = 24, V = 1100;
  std::vector<float> x, ln_w, ln_b, head;
  std::vector<int32_t> targets;
  std::vector<double> coef;
  explicit HeadCase(uint64_t seed) {
    std::mt19937_64 rng(seed);
    x = rand_f(T * C, rng), ln_w = rand_f(C, rng, 0.5f, 1.5f), ln_b = rand_f(C, rng, -0.2f, 0.2f);
    head = rand_f(V * C, rng, -0.5f, 0.5f);
    for (int64_t t = 0; t < T; ++t) {
      targets.push_back(t % 13 == 5 ? -1 : int32_t(rng() % uint64_t(V)));
      coef.push_back(t % 29 == 3 ? 0.0 : 1.0 / double(T));
    }
  }
};

struct HeadOut {
  std::vector<double> loss, lse, row_max;
  std::vector<float> dx, dln_w, dln_b, dhead;
};

HeadOut run_head_float(const HeadCase& c) {
  HeadOut o;
  o.loss.resize(size_t(c.T)), o.lse.resize(size_t(c.T)), o.row_max.resize(size_t(c.T));
  HeadSaved<float> s;
  const HeadTensors<const float*> p{c.ln_w.data(), c.ln_b.data(), c.head.data()};
  head_loss_forward(p, c.x.data(), c.targets.data(), s, o.loss.data(), o.lse.data(), o.row_max.data(),
                    static_cast<float*>(nullptr), c.T, c.C, c.V);
  o.dx.assign(c.x.size(), 0.f), o.dln_w.assign(size_t(c.C), 0.f), o.dln_b.assign(size_t(c.C), 0.f);
  o.dhead.assign(c.head.size(), 0.f);
  const HeadTensors<float*> g{o.dln_w.data(), o.dln_b.data(), o.dhead.data()};
  head_loss_backward(p, g, c.x.data(), s, c.targets.data(), o.lse.data(), c.coef.data(), 0.01, 17, o.dx.data(), c.T,
                     c.C, c.V);
  return o;
}

TEST(FastOps, HeadWithLossMatchesDouble) {
  const HeadCase c(103);
  const HeadOut f = run_head_float(c);
  const std::vector<double> xd = to_d(c.x), wd = to_d(c.ln_w), bd = to_d(c.ln_b), hd = to_d(c.head);
  std::vector<double> loss(size_t(c.T)), lse(size_t(c.T)), row_max(size_t(c.T));
  HeadSaved<double> s;
  const HeadTensors<const double*> p{wd.data(), bd.data(), hd.data()};
  head_loss_forward(p, xd.data(), c.targets.data(), s, loss.data(), lse.data(), row_max.data(),
                    static_cast<double*>(nullptr), c.T, c.C, c.V);
  std::vector<double> dx(xd.size()), dw(size_t(c.C)), db(size_t(c.C)), dh(hd.size());
  head_loss_backward(p, HeadTensors<double*>{dw.data(), db.data(), dh.data()}, xd.data(), s, c.targets.data(),
                     lse.data(), c.coef.data(), 0.01, 17, dx.data(), c.T, c.C, c.V);
  for (int64_t t = 0; t < c.T; ++t) {
    EXPECT_NEAR(f.loss[size_t(t)], loss[size_t(t)], 1e-5) << t;
    EXPECT_NEAR(f.lse[size_t(t)], lse[size_t(t)], 1e-5) << t;
    EXPECT_NEAR(f.row_max[size_t(t)], row_max[size_t(t)], 1e-5) << t;
  }
  EXPECT_LE(rel_max_err(f.dx, dx), kTol);
  EXPECT_LE(rel_max_err(f.dln_w, dw), kTol);
  EXPECT_LE(rel_max_err(f.dln_b, db), kTol);
  EXPECT_LE(rel_max_err(f.dhead, dh), kTol);
}

// Same calls with 1, 2 and 3 op threads: every output bit-identical.
TEST(FastOps, ResultsDoNotDependOnThreadCount) {
  const HeadCase c(104);
  std::mt19937_64 rng(105);
  const Shape s{300, 530, 20001};
  const std::vector<float> A = rand_f(s.M * 40, rng), B = rand_f(40 * s.N, rng);
  const std::vector<float> A2 = rand_f(5 * s.K, rng), B2 = rand_f(s.K * 3, rng);
  HeadOut ref;
  std::vector<float> ref_c, ref_c2;
  for (int n : {1, 2, 3}) {
    ThreadPool pool(n);
    OpThreadsScope scope(&pool);
    const HeadOut o = run_head_float(c);
    std::vector<float> C(static_cast<size_t>(s.M * s.N)), C2(15);
    fast::gemm(true, false, s.M, s.N, 40, A.data(), s.M, B.data(), s.N, C.data(), s.N, false);
    fast::gemm(false, false, 5, 3, s.K, A2.data(), s.K, B2.data(), 3, C2.data(), 3, false);  // split reduction
    if (n == 1) {
      ref = o, ref_c = C, ref_c2 = C2;
      continue;
    }
    EXPECT_EQ(o.loss, ref.loss) << n;
    EXPECT_EQ(o.lse, ref.lse) << n;
    EXPECT_EQ(o.dx, ref.dx) << n;
    EXPECT_EQ(o.dln_w, ref.dln_w) << n;
    EXPECT_EQ(o.dhead, ref.dhead) << n;
    EXPECT_EQ(C, ref_c) << n;
    EXPECT_EQ(C2, ref_c2) << n;
  }
}

// ---- whole model ---------------------------------------------------------------------------------------

// Big enough for several tiles per product: V = 1100, T = 300 (two head row blocks, GEMM M tiles),
// 2 RWKV blocks (4 heads of 16) and 2 sparse blocks (chunk 32, top-3: real selection).
template <class S>
TrainModelT<S> tile_model() {
  RandomModelSpec sp;
  sp.n_vocab = 1100, sp.n_embd = 64, sp.head_size = 16, sp.n_rwkv = 2, sp.n_sparse = 2;
  sp.dim_w = sp.dim_a = sp.dim_v = sp.dim_g = 16;
  sp.seed = 21;
  ModelOptions o;
  o.chunk = 32;
  o.top_k = 3;
  TrainModelT<S> m = TrainModelT<S>::random(sp, o);
  m.config().sparse.head_dim = 16;
  return m;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(int32_t(rng() % uint64_t(V)));
  return v;
}

// Float (fast ops) against double: max |Δ| / max |g64| per tensor ≤ 1e-3, as the existing tiny-model
// check (measured: see the worst_rel_err property).
TEST(FastOps, ModelFloatGradientsMatchDouble) {
  const int64_t T = 300;
  const std::vector<int32_t> ids = random_ids(T + 1, 1100, 22);
  TrainModel mf = tile_model<float>();
  TrainModelT<double> md = tile_model<double>();
  LossOptions opt;
  opt.pad_multiple = 16;
  mf.zero_grad(), md.zero_grad();
  const double lf = mf.forward_backward(ids.data(), ids.data() + 1, T, opt).loss;
  const double ld = md.forward_backward(ids.data(), ids.data() + 1, T, opt).loss;
  EXPECT_NEAR(lf, ld, 1e-5 * std::fabs(ld));
  double worst = 0;
  for (size_t i = 0; i < mf.n_params(); ++i) {
    const double e = rel_max_err(mf.grad(i), md.grad(i));
    EXPECT_LE(e, 1e-3) << mf.param(i).name;
    worst = std::max(worst, e);
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", worst);
  RecordProperty("worst_rel_err", buf);
}

// The whole float gradient is bit-identical with 1, 2 and 3 threads inside the ops.
TEST(FastOps, ModelGradientsDoNotDependOnThreadCount) {
  const int64_t T = 300;
  const std::vector<int32_t> ids = random_ids(T + 1, 1100, 23);
  std::vector<std::vector<float>> ref;
  double ref_loss = 0;
  for (int n : {1, 2, 3}) {
    ThreadPool pool(n);
    OpThreadsScope scope(&pool);
    TrainModel m = tile_model<float>();
    m.zero_grad();
    const double loss = m.forward_backward(ids.data(), ids.data() + 1, T, LossOptions{}).loss;
    if (n == 1) {
      ref_loss = loss;
      for (size_t i = 0; i < m.n_params(); ++i) ref.push_back(m.grad(i));
      continue;
    }
    EXPECT_EQ(loss, ref_loss) << n;
    for (size_t i = 0; i < m.n_params(); ++i) ASSERT_EQ(m.grad(i), ref[i]) << n << " threads: " << m.param(i).name;
  }
}

}  // namespace
}  // namespace rwkvx::train
