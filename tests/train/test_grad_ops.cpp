// fp64 finite-difference gradient checks of every training op (src/train/ops/): random inputs, the
// objective Σ r ⊙ outputs with random r, fourth-order central differences with h = 1e-4 on every entry
// (tensors here are tiny). Criterion per entry: |analytic - numeric| / max(|analytic|, |numeric|, 1e-4)
// ≤ 1e-6, i.e. relative for gradients above 1e-4 and 1e-10 absolute below (measured worst: see the
// worst_rel_err property of each test, ~1e-10). A wrong term in a backward gives errors of order 1.
#include <gtest/gtest.h>

#include <cstdio>
#include <random>

#include "support/grad_check.h"
#include "train/ops/channel_mix.h"
#include "train/ops/elementwise.h"
#include "train/ops/embedding.h"
#include "train/ops/linear.h"
#include "train/ops/loss.h"
#include "train/ops/norm.h"
#include "train/ops/rwkv7_time_mix.h"
#include "train/ops/sparse_attention.h"
#include "train/ops/wkv7.h"

namespace rwkvx::train {
namespace {

using test::dot;
using test::fill_uniform;
using test::grad_check;
using test::GradCheckResult;
using Vec = std::vector<double>;

constexpr double kTol = 1e-6;

Vec zeros(size_t n) { return Vec(n, 0.0); }

void expect_ok(const GradCheckResult& r) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", r.worst);
  testing::Test::RecordProperty("worst_rel_err", buf);
  EXPECT_GT(r.checked, 0);
  EXPECT_LE(r.worst, kTol) << r.where;
}

TEST(GradOps, LinearAndMatmul) {
  std::mt19937_64 rng(1);
  const int64_t T = 3, in = 5, out = 4;
  Vec x, W, r;
  fill_uniform(x, T * in, -1, 1, rng), fill_uniform(W, out * in, -1, 1, rng), fill_uniform(r, T * out, -1, 1, rng);
  for (bool lin : {true, false}) {
    auto f = [&] {
      Vec y(T * out);
      if (lin) linear_forward(x.data(), W.data(), y.data(), T, in, out);
      else matmul_forward(x.data(), W.data(), y.data(), T, in, out);
      return dot(r, y);
    };
    Vec dx = zeros(x.size()), dW = zeros(W.size());
    if (lin) linear_backward(r.data(), x.data(), W.data(), dx.data(), dW.data(), T, in, out);
    else matmul_backward(r.data(), x.data(), W.data(), dx.data(), dW.data(), T, in, out);
    GradCheckResult res;
    grad_check("x", x, dx, f, res);
    grad_check("W", W, dW, f, res);
    expect_ok(res);
  }
}

// Negative control: the checker reports a wrong gradient (one entry off by 1%, or a missing term).
TEST(GradOps, CheckerDetectsWrongGradients) {
  std::mt19937_64 rng(17);
  const int64_t T = 3, in = 5, out = 4;
  Vec x, W, r;
  fill_uniform(x, T * in, -1, 1, rng), fill_uniform(W, out * in, -1, 1, rng), fill_uniform(r, T * out, -1, 1, rng);
  auto f = [&] {
    Vec y(T * out);
    linear_forward(x.data(), W.data(), y.data(), T, in, out);
    return dot(r, y);
  };
  Vec dx = zeros(x.size()), dW = zeros(W.size());
  linear_backward(r.data(), x.data(), W.data(), dx.data(), dW.data(), T, in, out);
  dW[7] *= 1.01;
  GradCheckResult res;
  grad_check("W", W, dW, f, res);
  EXPECT_GT(res.worst, 5e-3);
  // Token shift without its dx[t-1] term.
  Vec mu, r2, d(T * in), dmu = zeros(in), dd = zeros(T * in), dx2 = zeros(T * in);
  fill_uniform(mu, in, 0, 1, rng), fill_uniform(r2, T * in, -1, 1, rng);
  auto g = [&] {
    Vec delta(T * in), o(T * in);
    token_shift_forward(x.data(), static_cast<const double*>(nullptr), delta.data(), T, in);
    shift_mix_forward(x.data(), delta.data(), mu.data(), o.data(), T, in);
    return dot(r2, o);
  };
  token_shift_forward(x.data(), static_cast<const double*>(nullptr), d.data(), T, in);
  shift_mix_backward(r2.data(), d.data(), mu.data(), dx2.data(), dd.data(), dmu.data(), T, in);
  for (int64_t i = 0; i < T * in; ++i) dx2[size_t(i)] -= dd[size_t(i)];  // only the -ddelta[t] half
  GradCheckResult res2;
  grad_check("x", x, dx2, g, res2);
  EXPECT_GT(res2.worst, 1e-2);
}

TEST(GradOps, LayerNormAndGroupNorm) {
  std::mt19937_64 rng(2);
  const int64_t T = 3, C = 8;
  for (int64_t G : {C, int64_t(4)}) {
    Vec x, w, b, r;
    fill_uniform(x, T * C, -2, 2, rng), fill_uniform(w, C, 0.5, 1.5, rng), fill_uniform(b, C, -0.5, 0.5, rng);
    fill_uniform(r, T * C, -1, 1, rng);
    const double eps = G == C ? 1e-5 : 64e-5;
    Vec mean(T * C / G), rstd(T * C / G);
    auto f = [&] {
      Vec y(T * C), m(T * C / G), s(T * C / G);
      group_norm_forward(x.data(), w.data(), b.data(), y.data(), m.data(), s.data(), T, C, G, eps);
      return dot(r, y);
    };
    Vec y(T * C);
    group_norm_forward(x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), T, C, G, eps);
    Vec dx = zeros(x.size()), dw = zeros(C), db = zeros(C);
    group_norm_backward(r.data(), x.data(), w.data(), mean.data(), rstd.data(), dx.data(), dw.data(), db.data(), T, C,
                        G);
    GradCheckResult res;
    grad_check("x", x, dx, f, res);
    grad_check("w", w, dw, f, res);
    grad_check("b", b, db, f, res);
    expect_ok(res);
  }
}

TEST(GradOps, Activations) {
  std::mt19937_64 rng(3);
  const int64_t n = 12;
  Vec x, r;
  fill_uniform(x, n, -2, 2, rng), fill_uniform(r, n, -1, 1, rng);
  for (int op = 0; op < 3; ++op) {
    auto fwd = [&](Vec& y) {
      if (op == 0) tanh_forward(x.data(), y.data(), n);
      if (op == 1) sigmoid_forward(x.data(), y.data(), n);
      if (op == 2) relu_square_forward(x.data(), y.data(), n);
    };
    auto f = [&] {
      Vec y(n);
      fwd(y);
      return dot(r, y);
    };
    Vec y(n), dx = zeros(n);
    fwd(y);
    if (op == 0) tanh_backward(r.data(), y.data(), dx.data(), n);
    if (op == 1) sigmoid_backward(r.data(), y.data(), dx.data(), n);
    if (op == 2) relu_square_backward(r.data(), x.data(), dx.data(), n);
    GradCheckResult res;
    grad_check("x", x, dx, f, res);
    expect_ok(res);
  }
}

TEST(GradOps, TokenShiftAndShiftMix) {
  std::mt19937_64 rng(4);
  const int64_t T = 4, C = 5;
  Vec x, mu, r;
  fill_uniform(x, T * C, -1, 1, rng), fill_uniform(mu, C, 0, 1, rng), fill_uniform(r, T * C, -1, 1, rng);
  auto f = [&] {
    Vec d(T * C), out(T * C);
    token_shift_forward(x.data(), static_cast<const double*>(nullptr), d.data(), T, C);
    shift_mix_forward(x.data(), d.data(), mu.data(), out.data(), T, C);
    return dot(r, out);
  };
  Vec d(T * C), dx = zeros(T * C), dd = zeros(T * C), dmu = zeros(C);
  token_shift_forward(x.data(), static_cast<const double*>(nullptr), d.data(), T, C);
  shift_mix_backward(r.data(), d.data(), mu.data(), dx.data(), dd.data(), dmu.data(), T, C);
  token_shift_backward(dd.data(), dx.data(), T, C);
  GradCheckResult res;
  grad_check("x", x, dx, f, res);
  grad_check("mu", mu, dmu, f, res);
  expect_ok(res);
}

TEST(GradOps, Embedding) {
  std::mt19937_64 rng(5);
  const int64_t V = 6, C = 3, T = 5;
  const std::vector<int32_t> ids = {2, 0, 2, 5, 1};
  Vec E, r;
  fill_uniform(E, V * C, -1, 1, rng), fill_uniform(r, T * C, -1, 1, rng);
  auto f = [&] {
    Vec out(T * C);
    embedding_forward(E.data(), ids.data(), out.data(), T, V, C);
    return dot(r, out);
  };
  Vec dE = zeros(E.size());
  embedding_backward(r.data(), ids.data(), dE.data(), T, C);
  GradCheckResult res;
  grad_check("E", E, dE, f, res);
  expect_ok(res);
}

// The head with the fused loss, in blocks of 2 rows over 5 (a partial last block): CE with coefficients
// and an unscored row, L2Wrap on rows ≥ 1 (as after one pad position).
TEST(GradOps, HeadWithLoss) {
  std::mt19937_64 rng(16);
  const int64_t T = 5, C = 6, V = 5;
  const std::vector<int32_t> tg = {1, 4, -100, 0, 2};
  const Vec coef = {0.0, 0.3, 0.0, 0.2, 0.5};
  const double scale = 0.1;
  Vec x, lw, lb, W;
  fill_uniform(x, T * C, -2, 2, rng), fill_uniform(lw, C, 0.5, 1.5, rng), fill_uniform(lb, C, -0.5, 0.5, rng);
  fill_uniform(W, V * C, -1, 1, rng);
  auto p = [&] { return HeadTensors<const double*>{lw.data(), lb.data(), W.data()}; };
  auto f = [&] {
    HeadSaved<double> s;
    Vec loss(T), lse(T), mx(T);
    head_loss_forward(p(), x.data(), tg.data(), s, loss.data(), lse.data(), mx.data(), static_cast<double*>(nullptr),
                      T, C, V, 2);
    double pen = 0;
    for (int64_t t = 1; t < T; ++t) pen += 0.5 * mx[size_t(t)] * mx[size_t(t)];
    return dot(coef, loss) + scale * pen;
  };
  HeadSaved<double> s;
  Vec loss(T), lse(T), mx(T), logits(T * V), dx = zeros(T * C), dlw = zeros(C), dlb = zeros(C), dW = zeros(V * C);
  head_loss_forward(p(), x.data(), tg.data(), s, loss.data(), lse.data(), mx.data(), logits.data(), T, C, V, 2);
  EXPECT_EQ(loss[2], 0.0);
  EXPECT_EQ(mx[4], *std::max_element(logits.begin() + 4 * V, logits.end()));
  head_loss_backward(p(), HeadTensors<double*>{dlw.data(), dlb.data(), dW.data()}, x.data(), s, tg.data(), lse.data(),
                     coef.data(), scale, 1, dx.data(), T, C, V, 2);
  GradCheckResult res;
  grad_check("x", x, dx, f, res);
  grad_check("ln_out.weight", lw, dlw, f, res);
  grad_check("ln_out.bias", lb, dlb, f, res);
  grad_check("head", W, dW, f, res);
  expect_ok(res);
}

TEST(GradOps, Wkv7Inputs) {
  std::mt19937_64 rng(6);
  const int64_t T = 3, C = 8, N = 4;
  Vec wl, al, k, w0, a0, k_k, k_a, rw, ra, rb, rk;
  fill_uniform(wl, T * C, -1, 1, rng), fill_uniform(al, T * C, -1, 1, rng), fill_uniform(k, T * C, -1, 1, rng);
  fill_uniform(w0, C, -3, 0, rng), fill_uniform(a0, C, -1, 1, rng), fill_uniform(k_k, C, 0.5, 1, rng);
  fill_uniform(k_a, C, 0, 1, rng);
  for (Vec* v : {&rw, &ra, &rb, &rk}) fill_uniform(*v, T * C, -1, 1, rng);
  auto f = [&] {
    Vec w(T * C), a(T * C), alpha(T * C), beta(T * C), ko(T * C);
    wkv_inputs_forward(wl.data(), al.data(), k.data(), w0.data(), a0.data(), k_k.data(), k_a.data(), w.data(),
                       a.data(), alpha.data(), beta.data(), ko.data(), T, C, N);
    return dot(rw, w) + dot(ra, alpha) + dot(rb, beta) + dot(rk, ko);
  };
  Vec dwl = zeros(T * C), dal = zeros(T * C), dk = zeros(T * C), dw0 = zeros(C), da0 = zeros(C), dkk = zeros(C),
      dka = zeros(C);
  wkv_inputs_backward(rw.data(), ra.data(), rb.data(), rk.data(), wl.data(), al.data(), k.data(), w0.data(), a0.data(),
                      k_k.data(), k_a.data(), dwl.data(), dal.data(), dk.data(), dw0.data(), da0.data(), dkk.data(),
                      dka.data(), T, C, N);
  GradCheckResult res;
  grad_check("wl", wl, dwl, f, res);
  grad_check("al", al, dal, f, res);
  grad_check("k", k, dk, f, res);
  grad_check("w0", w0, dw0, f, res);
  grad_check("a0", a0, da0, f, res);
  grad_check("k_k", k_k, dkk, f, res);
  grad_check("k_a", k_a, dka, f, res);
  expect_ok(res);
}

TEST(GradOps, ValueResidual) {
  std::mt19937_64 rng(7);
  const int64_t T = 3, C = 4;
  Vec v, vf, vg, v0, r;
  fill_uniform(v, T * C, -1, 1, rng), fill_uniform(vf, T * C, -1, 1, rng), fill_uniform(vg, T * C, -1, 1, rng);
  fill_uniform(v0, C, -1, 1, rng), fill_uniform(r, T * C, -1, 1, rng);
  auto f = [&] {
    Vec out(T * C);
    value_residual_forward(v.data(), vf.data(), vg.data(), v0.data(), out.data(), T, C);
    return dot(r, out);
  };
  Vec dv = zeros(T * C), dvf = zeros(T * C), dvg = zeros(T * C), dv0 = zeros(C);
  value_residual_backward(r.data(), v.data(), vf.data(), vg.data(), v0.data(), dv.data(), dvf.data(), dvg.data(),
                          dv0.data(), T, C);
  GradCheckResult res;
  grad_check("v", v, dv, f, res);
  grad_check("v_first", vf, dvf, f, res);
  grad_check("vg", vg, dvg, f, res);
  grad_check("v0", v0, dv0, f, res);
  expect_ok(res);
}

TEST(GradOps, Rwkv7Output) {
  std::mt19937_64 rng(8);
  const int64_t T = 3, C = 8, N = 4, H = 2;
  Vec y, r_, k, v, rk, g, lw, lb, r;
  for (Vec* x : {&y, &r_, &k, &v, &g, &r}) fill_uniform(*x, T * C, -1, 1, rng);
  fill_uniform(rk, H * N, -0.5, 0.5, rng), fill_uniform(lw, C, 0.5, 1.5, rng), fill_uniform(lb, C, -0.3, 0.3, rng);
  Vec mean(T * H), rstd(T * H);
  auto f = [&] {
    Vec out(T * C), m(T * H), s(T * H);
    rwkv7_output_forward(y.data(), r_.data(), k.data(), v.data(), rk.data(), g.data(), lw.data(), lb.data(), 64e-5,
                         out.data(), m.data(), s.data(), T, C, N);
    return dot(r, out);
  };
  Vec out(T * C);
  rwkv7_output_forward(y.data(), r_.data(), k.data(), v.data(), rk.data(), g.data(), lw.data(), lb.data(), 64e-5,
                       out.data(), mean.data(), rstd.data(), T, C, N);
  Vec dy = zeros(T * C), dr = zeros(T * C), dk = zeros(T * C), dv = zeros(T * C), drk = zeros(H * N),
      dg = zeros(T * C), dlw = zeros(C), dlb = zeros(C);
  rwkv7_output_backward(r.data(), y.data(), r_.data(), k.data(), v.data(), rk.data(), g.data(), lw.data(), lb.data(),
                        mean.data(), rstd.data(), dy.data(), dr.data(), dk.data(), dv.data(), drk.data(), dg.data(),
                        dlw.data(), dlb.data(), T, C, N);
  GradCheckResult res;
  grad_check("y", y, dy, f, res);
  grad_check("r", r_, dr, f, res);
  grad_check("k", k, dk, f, res);
  grad_check("v", v, dv, f, res);
  grad_check("r_k", rk, drk, f, res);
  grad_check("g", g, dg, f, res);
  grad_check("ln_w", lw, dlw, f, res);
  grad_check("ln_b", lb, dlb, f, res);
  expect_ok(res);
}

TEST(GradOps, Wkv7Recurrence) {
  // T = 11 with snapshots every 4 tokens: two full segments and a partial one are recomputed.
  std::mt19937_64 rng(9);
  const int64_t T = 11, H = 2, N = 4, C = H * N;
  Vec r, w, k, v, alpha, beta, ry;
  fill_uniform(r, T * C, -1, 1, rng), fill_uniform(w, T * C, 0.6, 1.0, rng), fill_uniform(k, T * C, -1, 1, rng);
  fill_uniform(v, T * C, -1, 1, rng), fill_uniform(ry, T * C, -1, 1, rng);
  // alpha = -kk, beta = kk·a as in the model (kk unit per head), so the state stays bounded.
  alpha.resize(T * C), beta.resize(T * C);
  Vec raw;
  fill_uniform(raw, T * C, -1, 1, rng);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      double n = 0;
      for (int64_t j = 0; j < N; ++j) n += raw[t * C + h * N + j] * raw[t * C + h * N + j];
      for (int64_t j = 0; j < N; ++j) {
        const double kk = raw[t * C + h * N + j] / std::sqrt(n), a = 0.2 + 0.6 * double(j) / double(N);
        alpha[t * C + h * N + j] = -kk;
        beta[t * C + h * N + j] = kk * a;
      }
    }
  auto f = [&] {
    Vec state(H * N * N, 0.0), y(T * C);
    wkv7_forward(r.data(), w.data(), k.data(), v.data(), alpha.data(), beta.data(), state.data(), y.data(), T, H, N,
                 static_cast<Wkv7Saved<double>*>(nullptr));
    return dot(ry, y);
  };
  Wkv7Saved<double> saved;
  saved.save_every = 4;
  Vec state(H * N * N, 0.0), y(T * C);
  wkv7_forward(r.data(), w.data(), k.data(), v.data(), alpha.data(), beta.data(), state.data(), y.data(), T, H, N,
               &saved);
  EXPECT_EQ(saved.snapshots.size(), size_t(3 * H * N * N));
  Vec dr = zeros(T * C), dw = zeros(T * C), dk = zeros(T * C), dv = zeros(T * C), da = zeros(T * C),
      db = zeros(T * C);
  wkv7_backward(ry.data(), r.data(), w.data(), k.data(), v.data(), alpha.data(), beta.data(), saved, dr.data(),
                dw.data(), dk.data(), dv.data(), da.data(), db.data(), T, H, N);
  GradCheckResult res;
  grad_check("r", r, dr, f, res);
  grad_check("w", w, dw, f, res);
  grad_check("k", k, dk, f, res);
  grad_check("v", v, dv, f, res);
  grad_check("alpha", alpha, da, f, res);
  grad_check("beta", beta, db, f, res);
  expect_ok(res);
}

// The composite time mix with every parameter, in block 0 (publishes v_first) and a later block.
TEST(GradOps, TimeMix) {
  const int64_t T = 6, C = 8, N = 4, D = 3;
  for (bool first : {true, false}) {
    std::mt19937_64 rng(first ? 10 : 11);
    std::vector<std::pair<std::string, Vec>> prm;
    auto add = [&](const std::string& n, int64_t size, double lo, double hi) {
      Vec v;
      fill_uniform(v, size_t(size), lo, hi, rng);
      prm.emplace_back(n, v);
    };
    for (const char* n : {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_a"}) add(n, C, 0, 1);
    add("w0", C, -3, 0), add("a0", C, -1, 1), add("k_k", C, 0.5, 1), add("r_k", C, -0.5, 0.5);
    add("w1", C * D, -0.5, 0.5), add("w2", D * C, -0.5, 0.5), add("a1", C * D, -0.5, 0.5), add("a2", D * C, -0.5, 0.5);
    add("g1", C * D, -0.5, 0.5), add("g2", D * C, -0.5, 0.5);
    if (!first) add("v0", C, -1, 1), add("v1", C * D, -0.5, 0.5), add("v2", D * C, -0.5, 0.5);
    for (const char* n : {"receptance", "key", "value", "output"}) add(n, C * C, -0.4, 0.4);
    add("ln_w", C, 0.5, 1.5), add("ln_b", C, -0.3, 0.3);
    Vec x, vf, r, rvf;
    fill_uniform(x, T * C, -1, 1, rng), fill_uniform(vf, T * C, -1, 1, rng), fill_uniform(r, T * C, -1, 1, rng);
    fill_uniform(rvf, T * C, -1, 1, rng);
    std::vector<Vec> grads(prm.size());
    for (size_t i = 0; i < prm.size(); ++i) grads[i] = zeros(prm[i].second.size());
    auto tensors = [&](auto get) {
      using P = decltype(get(std::string()));
      TimeMixTensors<P> t{};
      t.x_r = get("x_r"), t.x_w = get("x_w"), t.x_k = get("x_k"), t.x_v = get("x_v"), t.x_a = get("x_a");
      t.x_g = get("x_g"), t.w0 = get("w0"), t.w1 = get("w1"), t.w2 = get("w2"), t.a0 = get("a0"), t.a1 = get("a1");
      t.a2 = get("a2"), t.g1 = get("g1"), t.g2 = get("g2"), t.k_k = get("k_k"), t.k_a = get("k_a");
      t.r_k = get("r_k"), t.receptance = get("receptance"), t.key = get("key"), t.value = get("value");
      t.output = get("output"), t.ln_w = get("ln_w"), t.ln_b = get("ln_b");
      if (!first) t.v0 = get("v0"), t.v1 = get("v1"), t.v2 = get("v2");
      return t;
    };
    auto find = [&](const std::string& n) {
      for (size_t i = 0; i < prm.size(); ++i)
        if (prm[i].first == n) return i;
      return size_t(0);
    };
    auto pw = [&] {
      return tensors([&](const std::string& n) -> const double* { return prm[find(n)].second.data(); });
    };
    auto pg = tensors([&](const std::string& n) -> double* { return grads[find(n)].data(); });
    const TimeMixShape sh{T, C, N, D, D, D, D, first};
    auto f = [&] {
      TimeMixSaved<double> s;
      Vec out(T * C), v_first = vf;
      time_mix_forward(pw(), sh, x.data(), v_first.data(), out.data(), s, 4);
      return dot(r, out) + (first ? dot(rvf, v_first) : 0.0);
    };
    TimeMixSaved<double> s;
    Vec out(T * C), v_first = vf;
    time_mix_forward(pw(), sh, x.data(), v_first.data(), out.data(), s, 4);
    Vec dx = zeros(T * C), dvf = first ? rvf : zeros(T * C);
    time_mix_backward(pw(), pg, sh, x.data(), v_first.data(), s, r.data(), dx.data(), dvf.data());
    GradCheckResult res;
    grad_check("x", x, dx, f, res);
    if (!first) grad_check("v_first", vf, dvf, f, res);
    for (size_t i = 0; i < prm.size(); ++i) grad_check(prm[i].first, prm[i].second, grads[i], f, res);
    expect_ok(res);
  }
}

TEST(GradOps, ChannelMix) {
  std::mt19937_64 rng(12);
  const int64_t T = 5, C = 4, F = 16;
  Vec x, xk, key, value, r;
  fill_uniform(x, T * C, -1, 1, rng), fill_uniform(xk, C, 0, 1, rng), fill_uniform(key, F * C, -0.5, 0.5, rng);
  fill_uniform(value, C * F, -0.5, 0.5, rng), fill_uniform(r, T * C, -1, 1, rng);
  auto f = [&] {
    ChannelMixSaved<double> s;
    Vec out(T * C);
    channel_mix_forward(ChannelMixTensors<const double*>{xk.data(), key.data(), value.data()}, x.data(), out.data(), s,
                        T, C, F);
    return dot(r, out);
  };
  ChannelMixSaved<double> s;
  Vec out(T * C), dx = zeros(T * C), dxk = zeros(C), dkey = zeros(F * C), dval = zeros(C * F);
  const ChannelMixTensors<const double*> p{xk.data(), key.data(), value.data()};
  channel_mix_forward(p, x.data(), out.data(), s, T, C, F);
  channel_mix_backward(p, ChannelMixTensors<double*>{dxk.data(), dkey.data(), dval.data()}, s, r.data(), dx.data(), T,
                       C, F);
  GradCheckResult res;
  grad_check("x", x, dx, f, res);
  grad_check("x_k", xk, dxk, f, res);
  grad_check("key", key, dkey, f, res);
  grad_check("value", value, dval, f, res);
  expect_ok(res);
}

// MoBA over 26 tokens in chunks of 4 (6 complete chunks and a partial one), top-3 (own + 2 past) with
// 2 heads of 4: from t = 12 on, each head picks 2 of ≥ 3 candidate chunks, differently per head.
TEST(GradOps, SparseAttention) {
  std::mt19937_64 rng(13);
  const MobaShape sh{26, 8, 4, 4, 3};
  const int64_t TC = sh.T * sh.C;
  Vec q, k, v, r;
  fill_uniform(q, TC, -1.5, 1.5, rng), fill_uniform(k, TC, -1.5, 1.5, rng), fill_uniform(v, TC, -1, 1, rng);
  fill_uniform(r, TC, -1, 1, rng);
  MobaSaved<double> base;
  Vec out(TC);
  moba_forward(q.data(), k.data(), v.data(), out.data(), sh, base);
  // Selection really happens: some (t, h) rejected a candidate, and the two heads disagree somewhere.
  int rejected = 0, disagree = 0;
  for (int64_t t = 0; t < sh.T; ++t) {
    if (t / sh.chunk > sh.top_k - 1) ++rejected;
    if (base.selected[size_t((t * 2 + 0) * 2)] != base.selected[size_t((t * 2 + 1) * 2)] ||
        base.selected[size_t((t * 2 + 0) * 2 + 1)] != base.selected[size_t((t * 2 + 1) * 2 + 1)])
      ++disagree;
  }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(disagree, 0);
  // Finite differences are only valid while no perturbation changes a selection: check that too.
  bool same_selection = true;
  auto f = [&] {
    MobaSaved<double> s;
    Vec o(TC);
    moba_forward(q.data(), k.data(), v.data(), o.data(), sh, s);
    same_selection = same_selection && s.selected == base.selected;
    return dot(r, o);
  };
  Vec dq = zeros(TC), dk = zeros(TC), dv = zeros(TC);
  moba_backward(r.data(), q.data(), k.data(), v.data(), sh, base, dq.data(), dk.data(), dv.data());
  GradCheckResult res;
  grad_check("q", q, dq, f, res);
  grad_check("k", k, dk, f, res);
  grad_check("v", v, dv, f, res);
  EXPECT_TRUE(same_selection);
  expect_ok(res);
}

TEST(GradOps, SparseAttentionBlock) {
  std::mt19937_64 rng(14);
  const MobaShape sh{14, 8, 4, 3, 2};
  const int64_t T = sh.T, C = sh.C;
  Vec x, Wq, Wk, Wv, Wo, r;
  fill_uniform(x, T * C, -1, 1, rng), fill_uniform(r, T * C, -1, 1, rng);
  for (Vec* W : {&Wq, &Wk, &Wv, &Wo}) fill_uniform(*W, C * C, -0.6, 0.6, rng);
  auto p = [&] { return SparseAttnTensors<const double*>{Wq.data(), Wk.data(), Wv.data(), Wo.data()}; };
  auto f = [&] {
    SparseAttnSaved<double> s;
    Vec out(T * C);
    sparse_attn_forward(p(), sh, x.data(), out.data(), s);
    return dot(r, out);
  };
  SparseAttnSaved<double> s;
  Vec out(T * C), dx = zeros(T * C), dq = zeros(C * C), dk = zeros(C * C), dv = zeros(C * C), dO = zeros(C * C);
  sparse_attn_forward(p(), sh, x.data(), out.data(), s);
  sparse_attn_backward(p(), SparseAttnTensors<double*>{dq.data(), dk.data(), dv.data(), dO.data()}, sh, x.data(), s,
                       r.data(), dx.data());
  GradCheckResult res;
  grad_check("x", x, dx, f, res);
  grad_check("Wq", Wq, dq, f, res);
  grad_check("Wk", Wk, dk, f, res);
  grad_check("Wv", Wv, dv, f, res);
  grad_check("Wo", Wo, dO, f, res);
  expect_ok(res);
}

// Cross-entropy with per-position coefficients and ignored targets, plus L2Wrap checked as the gradient
// of its penalty scale · Σ_t ½ max².
TEST(GradOps, CrossEntropyAndL2Wrap) {
  std::mt19937_64 rng(15);
  const int64_t T = 4, V = 7;
  const std::vector<int32_t> tg = {3, -100, 0, 6};
  const Vec coef = {0.25, 0.0, 0.5, 0.125};
  const double scale = 0.3;  // large, so the L2Wrap part is visible next to the CE part
  Vec logits;
  fill_uniform(logits, T * V, -3, 3, rng);
  auto f = [&] {
    Vec loss(T), lse(T);
    cross_entropy_forward(logits.data(), tg.data(), T, V, loss.data(), lse.data());
    return dot(coef, loss) + l2wrap_penalty(logits.data(), T, V, scale);
  };
  Vec loss(T), lse(T), d = zeros(T * V);
  cross_entropy_forward(logits.data(), tg.data(), T, V, loss.data(), lse.data());
  EXPECT_EQ(loss[1], 0.0);
  cross_entropy_backward(logits.data(), tg.data(), lse.data(), coef.data(), d.data(), T, V);
  l2wrap_backward(logits.data(), T, V, scale, d.data());
  GradCheckResult res;
  grad_check("logits", logits, d, f, res);
  expect_ok(res);
  // L2Wrap alone touches exactly one entry per row: the argmax, by max · scale.
  Vec only = zeros(T * V);
  l2wrap_backward(logits.data(), T, V, scale, only.data());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t am = std::max_element(logits.begin() + t * V, logits.begin() + (t + 1) * V) - logits.begin();
    for (int64_t i = t * V; i < (t + 1) * V; ++i)
      EXPECT_EQ(only[size_t(i)], i == am ? logits[size_t(am)] * scale : 0.0);
  }
}

}  // namespace
}  // namespace rwkvx::train
