// The CUDA training ops of src/train/cuda/train_kernels.cu against their CPU references (the functions of
// the same names in src/train/ops/ and the AdamW arithmetic of src/train/optimizer.cpp), in float and in
// double, on fresh random inputs. Shapes are not multiples of the kernels' blocks (128-channel column
// blocks, 32-token blocks, warps, 16-byte vectors): T = 37, C = 96, N = 16; T = 5, C = 99, N = 33 (odd C:
// the scalar paths); and a realistic T = 300, C = 768, N = 64. Forward outputs are poisoned with NaN (an
// element a kernel forgets to write fails), backward outputs are pre-filled with random values (the ops
// ADD), null outputs are skipped, and every gradient reduced over tokens must repeat bit for bit.
// Without a GPU every test skips and says so.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "core/error.h"
#include "train/cuda/train_ops_cuda.h"
#include "train/ops/elementwise.h"
#include "train/ops/embedding.h"
#include "train/ops/fast.h"
#include "train/ops/loss.h"
#include "train/ops/norm.h"
#include "train/ops/rwkv7_time_mix.h"

namespace rwkvx {
namespace {

namespace tc = train::cuda;

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device copy of a host vector, `off` elements into its allocation (off = 1: a pointer that is not
// 16-byte aligned, for the scalar paths of the vectorized kernels).
template <class T>
class Dev {
 public:
  explicit Dev(const std::vector<T>& h, int off = 0) : n_(h.size()), off_(off) {
    ck(cudaMalloc(reinterpret_cast<void**>(&base_), (n_ + size_t(off) + 1) * sizeof(T)), "cudaMalloc");
    if (n_) ck(cudaMemcpy(base_ + off, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  static Dev nan(size_t n, int off = 0) {
    return Dev(std::vector<T>(n, std::numeric_limits<T>::quiet_NaN()), off);
  }
  ~Dev() {
    if (base_) cudaFree(base_);
  }
  Dev(Dev&& o) noexcept : base_(o.base_), n_(o.n_), off_(o.off_) { o.base_ = nullptr; }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  T* p() const { return base_ + off_; }
  std::vector<T> host() const {
    ck(cudaDeviceSynchronize(), "kernel");
    std::vector<T> h(n_);
    if (n_) ck(cudaMemcpy(h.data(), base_ + off_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }

 private:
  T* base_ = nullptr;
  size_t n_;
  int off_;
};

// max |got - ref| / max |ref|; infinite when got has a NaN or an infinity where ref is finite.
template <class S>
double rel_err(const std::vector<S>& got, const std::vector<S>& ref) {
  if (got.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isfinite(double(ref[i])) && !std::isfinite(double(got[i]))) return INFINITY;
    num = std::max(num, std::fabs(double(got[i]) - double(ref[i])));
    den = std::max(den, std::fabs(double(ref[i])));
  }
  return den > 0 ? num / den : num;
}
template <class S>
bool same_bits(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0;
}

// fp64: rounding only; fp32: a few ulps of the largest element (the CPU accumulates some sums in fp32).
template <class S>
double tol() {
  return std::is_same_v<S, double> ? 1e-12 : 2e-5;
}
template <class S>
const char* type_name() {
  return std::is_same_v<S, double> ? "double" : "float";
}

#define EXPECT_CLOSE(got, ref, tolerance) \
  EXPECT_LE(rel_err(got, ref), tolerance) << #got << " vs " << #ref << " (" << type_name<S>() << ")"

struct Shape {
  int64_t T, C, N;
};
const Shape kShapes[] = {{37, 96, 16}, {5, 99, 33}, {300, 768, 64}};

class TrainCudaOps : public testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda_device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << "): CUDA training op tests skipped";
    ck(cudaStreamCreate(&st), "cudaStreamCreate");
  }
  void TearDown() override {
    if (st) cudaStreamDestroy(st);
  }
  template <class S>
  std::vector<S> rnd(int64_t n, double lo = -1, double hi = 1) {
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<S> v(static_cast<size_t>(n));
    for (S& x : v) x = S(u(rng));
    return v;
  }

  template <class S>
  void elementwise(int64_t n, int off);
  template <class S>
  void shifts(const Shape& sh);
  template <class S>
  void group_norm(const Shape& sh, int64_t G);
  template <class S>
  void wkv_inputs(const Shape& sh, bool clamp_head);
  template <class S>
  void value_residual(const Shape& sh);
  template <class S>
  void rwkv7_output(const Shape& sh);
  template <class S>
  void embedding(const Shape& sh);
  template <class S>
  void cross_entropy(int64_t n, int64_t V, double l2_scale, int off);

  cudaStream_t st = nullptr;
  std::mt19937_64 rng{20261124};
};

// ---- elementwise ------------------------------------------------------------------------------------------

template <class S>
void TrainCudaOps::elementwise(int64_t n, int off) {
  SCOPED_TRACE(std::string(type_name<S>()) + " n=" + std::to_string(n) + " off=" + std::to_string(off));
  const std::vector<S> x = rnd<S>(n, -3, 3), dy = rnd<S>(n), pre = rnd<S>(n);
  const Dev<S> dx_in(x, off), ddy(dy, off);
  std::vector<S> ref(static_cast<size_t>(n)), dref;

  // Forwards into a poisoned output, then in place (y aliases x).
  auto forward = [&](auto gpu_op, auto cpu_op, const char* name, bool in_place) {
    cpu_op(x.data(), ref.data(), n);
    Dev<S> y = Dev<S>::nan(size_t(n), off);
    gpu_op(st, dx_in.p(), y.p(), n);
    EXPECT_LE(rel_err(y.host(), ref), tol<S>()) << name;
    if (in_place) {
      Dev<S> xy(x, off);
      gpu_op(st, xy.p(), xy.p(), n);
      EXPECT_LE(rel_err(xy.host(), ref), tol<S>()) << name << " in place";
    }
  };
  forward(tc::tanh_forward<S>, train::tanh_forward<S>, "tanh_forward", true);
  forward(tc::sigmoid_forward<S>, train::sigmoid_forward<S>, "sigmoid_forward", true);
  forward(tc::relu_square_forward<S>, train::relu_square_forward<S>, "relu_square_forward", false);

  // Backwards add into a pre-filled gradient; the second operand is x itself (any values do).
  auto backward = [&](auto gpu_op, auto cpu_op, const char* name) {
    dref = pre;
    cpu_op(dy.data(), x.data(), dref.data(), n);
    Dev<S> dx(pre, off);
    gpu_op(st, ddy.p(), dx_in.p(), dx.p(), n);
    EXPECT_LE(rel_err(dx.host(), dref), tol<S>()) << name;
  };
  backward(tc::tanh_backward<S>, train::tanh_backward<S>, "tanh_backward");
  backward(tc::sigmoid_backward<S>, train::sigmoid_backward<S>, "sigmoid_backward");
  backward(tc::relu_square_backward<S>, train::relu_square_backward<S>, "relu_square_backward");

  dref = pre;
  for (int64_t i = 0; i < n; ++i) dref[size_t(i)] += x[size_t(i)];
  Dev<S> acc(pre, off);
  tc::add_inplace<S>(st, acc.p(), dx_in.p(), n);
  EXPECT_TRUE(same_bits(acc.host(), dref)) << "add_inplace";
}

TEST_F(TrainCudaOps, Elementwise) {
  for (int64_t n : {int64_t(1), int64_t(3553), int64_t(300 * 768)})
    for (int off : {0, 1}) {
      elementwise<float>(n, off);
      elementwise<double>(n, off);
    }
}

// ---- token shift and its lerp ----------------------------------------------------------------------------

template <class S>
void TrainCudaOps::shifts(const Shape& sh) {
  const int64_t T = sh.T, C = sh.C, TC = T * C;
  SCOPED_TRACE(std::string(type_name<S>()) + " T=" + std::to_string(T) + " C=" + std::to_string(C));
  const std::vector<S> x = rnd<S>(TC), mu = rnd<S>(C, 0, 1), dout = rnd<S>(TC);
  const std::vector<S> pre_dx = rnd<S>(TC), pre_dd = rnd<S>(TC), pre_mu = rnd<S>(C);
  const Dev<S> dx_(x), dmu_(mu), ddout(dout);

  std::vector<S> delta(static_cast<size_t>(TC));
  train::token_shift_forward<S>(x.data(), nullptr, delta.data(), T, C);
  Dev<S> gdelta = Dev<S>::nan(static_cast<size_t>(TC));
  tc::token_shift_forward<S>(st, dx_.p(), gdelta.p(), T, C);
  EXPECT_TRUE(same_bits(gdelta.host(), delta)) << "token_shift_forward";

  std::vector<S> dx = pre_dx;
  train::token_shift_backward<S>(dout.data(), dx.data(), T, C);
  Dev<S> gdx(pre_dx);
  tc::token_shift_backward<S>(st, ddout.p(), gdx.p(), T, C);
  EXPECT_TRUE(same_bits(gdx.host(), dx)) << "token_shift_backward";

  std::vector<S> out(static_cast<size_t>(TC));
  train::shift_mix_forward<S>(x.data(), delta.data(), mu.data(), out.data(), T, C);
  Dev<S> gout = Dev<S>::nan(static_cast<size_t>(TC));
  tc::shift_mix_forward<S>(st, dx_.p(), gdelta.p(), dmu_.p(), gout.p(), T, C);
  EXPECT_CLOSE(gout.host(), out, tol<S>());

  std::vector<S> ref_dx = pre_dx, ref_dd = pre_dd, ref_dmu = pre_mu;
  train::shift_mix_backward<S>(dout.data(), delta.data(), mu.data(), ref_dx.data(), ref_dd.data(), ref_dmu.data(), T,
                               C);
  Dev<S> g_dx(pre_dx), g_dd(pre_dd), g_dmu(pre_mu);
  tc::shift_mix_backward<S>(st, ddout.p(), gdelta.p(), dmu_.p(), g_dx.p(), g_dd.p(), g_dmu.p(), T, C);
  const std::vector<S> got_dx = g_dx.host(), got_dd = g_dd.host(), got_dmu = g_dmu.host();
  EXPECT_CLOSE(got_dx, ref_dx, tol<S>());
  EXPECT_CLOSE(got_dd, ref_dd, tol<S>());
  EXPECT_CLOSE(got_dmu, ref_dmu, tol<S>());
  // Repeat: the reduced gradient bit for bit. Nulls: dx and ddelta skipped, dmu alone the same bits.
  Dev<S> g_dmu2(pre_mu);
  tc::shift_mix_backward<S>(st, ddout.p(), gdelta.p(), dmu_.p(), nullptr, nullptr, g_dmu2.p(), T, C);
  EXPECT_TRUE(same_bits(g_dmu2.host(), got_dmu)) << "shift_mix_backward dmu repeat";
  Dev<S> g_dd2(pre_dd);
  tc::shift_mix_backward<S>(st, ddout.p(), gdelta.p(), dmu_.p(), nullptr, g_dd2.p(), nullptr, T, C);
  EXPECT_TRUE(same_bits(g_dd2.host(), got_dd)) << "shift_mix_backward ddelta alone";
  tc::shift_mix_backward<S>(st, ddout.p(), gdelta.p(), dmu_.p(), nullptr, nullptr, nullptr, T, C);
}

TEST_F(TrainCudaOps, TokenShiftAndShiftMix) {
  for (const Shape& sh : kShapes) {
    shifts<float>(sh);
    shifts<double>(sh);
  }
}

// ---- group norm -----------------------------------------------------------------------------------------

template <class S>
void TrainCudaOps::group_norm(const Shape& sh, int64_t G) {
  const int64_t T = sh.T, C = sh.C, TC = T * C, R = T * (C / G);
  SCOPED_TRACE(std::string(type_name<S>()) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
               " G=" + std::to_string(G));
  const double eps = G == C ? 1e-5 : train::kLnXEps;
  std::vector<S> x = rnd<S>(TC, -2, 2);
  for (int64_t i = 0; i < TC; ++i) x[size_t(i)] += S(0.5 * double((i / G) % 7));  // groups with different means
  const std::vector<S> w = rnd<S>(C, 0.5, 1.5), b = rnd<S>(C), dy = rnd<S>(TC);
  const std::vector<S> pre_dx = rnd<S>(TC), pre_dw = rnd<S>(C), pre_db = rnd<S>(C);
  std::vector<S> y(static_cast<size_t>(TC)), mean(static_cast<size_t>(R)), rstd(static_cast<size_t>(R));
  train::group_norm_forward<S>(x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), T, C, G, eps);

  const Dev<S> gx(x), gw(w), gb(b), gdy(dy);
  Dev<S> gy = Dev<S>::nan(static_cast<size_t>(TC)), gmean = Dev<S>::nan(static_cast<size_t>(R)), grstd = Dev<S>::nan(static_cast<size_t>(R));
  tc::group_norm_forward<S>(st, gx.p(), gw.p(), gb.p(), gy.p(), gmean.p(), grstd.p(), T, C, G, eps);
  EXPECT_CLOSE(gy.host(), y, tol<S>());
  EXPECT_CLOSE(gmean.host(), mean, tol<S>());
  EXPECT_CLOSE(grstd.host(), rstd, tol<S>());
  Dev<S> gxy(x);  // x aliases y
  tc::group_norm_forward<S>(st, gxy.p(), gw.p(), gb.p(), gxy.p(), gmean.p(), grstd.p(), T, C, G, eps);
  EXPECT_CLOSE(gxy.host(), y, tol<S>());

  // The backward reads the CPU's statistics (the same inputs on both sides).
  const Dev<S> cmean(mean), crstd(rstd);
  std::vector<S> dx = pre_dx, dw = pre_dw, db = pre_db;
  train::group_norm_backward<S>(dy.data(), x.data(), w.data(), mean.data(), rstd.data(), dx.data(), dw.data(),
                                db.data(), T, C, G);
  Dev<S> gdx(pre_dx), gdw(pre_dw), gdb(pre_db);
  tc::group_norm_backward<S>(st, gdy.p(), gx.p(), gw.p(), cmean.p(), crstd.p(), gdx.p(), gdw.p(), gdb.p(), T, C, G);
  const std::vector<S> got_dx = gdx.host(), got_dw = gdw.host(), got_db = gdb.host();
  EXPECT_CLOSE(got_dx, dx, tol<S>());
  EXPECT_CLOSE(got_dw, dw, tol<S>());
  EXPECT_CLOSE(got_db, db, tol<S>());
  Dev<S> gdw2(pre_dw), gdb2(pre_db);  // repeat, without dx
  tc::group_norm_backward<S>(st, gdy.p(), gx.p(), gw.p(), cmean.p(), crstd.p(), nullptr, gdw2.p(), gdb2.p(), T, C, G);
  EXPECT_TRUE(same_bits(gdw2.host(), got_dw)) << "group_norm_backward dw repeat";
  EXPECT_TRUE(same_bits(gdb2.host(), got_db)) << "group_norm_backward db repeat";
  Dev<S> gdx2(pre_dx);  // dx alone
  tc::group_norm_backward<S>(st, gdy.p(), gx.p(), gw.p(), cmean.p(), crstd.p(), gdx2.p(), nullptr, nullptr, T, C, G);
  EXPECT_TRUE(same_bits(gdx2.host(), got_dx)) << "group_norm_backward dx alone";
}

TEST_F(TrainCudaOps, GroupNorm) {
  for (const Shape& sh : kShapes)
    for (int64_t G : {sh.C, sh.N}) {
      group_norm<float>(sh, G);
      group_norm<double>(sh, G);
    }
}

// ---- wkv inputs -----------------------------------------------------------------------------------------

template <class S>
void TrainCudaOps::wkv_inputs(const Shape& sh, bool clamp_head) {
  const int64_t T = sh.T, C = sh.C, N = sh.N, TC = T * C;
  SCOPED_TRACE(std::string(type_name<S>()) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
               (clamp_head ? " clamp" : ""));
  const std::vector<S> wl = rnd<S>(TC, -2, 2), al = rnd<S>(TC, -2, 2), w0 = rnd<S>(C, -1, 1), a0 = rnd<S>(C),
                       k_k = rnd<S>(C, 0.2, 1.5), k_a = rnd<S>(C, 0, 1);
  std::vector<S> k = rnd<S>(TC);
  if (clamp_head)  // token 1, head 0: k = 0, the norm below its clamp (kk = 0, gradient dkk / 1e-12)
    std::fill(k.begin() + C, k.begin() + C + N, S(0));
  std::vector<S> w(static_cast<size_t>(TC)), a(static_cast<size_t>(TC)), alpha(static_cast<size_t>(TC)), beta(static_cast<size_t>(TC)), k_out(static_cast<size_t>(TC));
  train::wkv_inputs_forward<S>(wl.data(), al.data(), k.data(), w0.data(), a0.data(), k_k.data(), k_a.data(), w.data(),
                               a.data(), alpha.data(), beta.data(), k_out.data(), T, C, N);
  const Dev<S> gwl(wl), gal(al), gk(k), gw0(w0), ga0(a0), gkk(k_k), gka(k_a);
  Dev<S> ow = Dev<S>::nan(static_cast<size_t>(TC)), oa = Dev<S>::nan(static_cast<size_t>(TC)), oalpha = Dev<S>::nan(static_cast<size_t>(TC)),
         obeta = Dev<S>::nan(static_cast<size_t>(TC)), okout = Dev<S>::nan(static_cast<size_t>(TC));
  tc::wkv_inputs_forward<S>(st, gwl.p(), gal.p(), gk.p(), gw0.p(), ga0.p(), gkk.p(), gka.p(), ow.p(), oa.p(),
                            oalpha.p(), obeta.p(), okout.p(), T, C, N);
  EXPECT_CLOSE(ow.host(), w, tol<S>());
  EXPECT_CLOSE(oa.host(), a, tol<S>());
  EXPECT_CLOSE(oalpha.host(), alpha, tol<S>());
  EXPECT_CLOSE(obeta.host(), beta, tol<S>());
  EXPECT_CLOSE(okout.host(), k_out, tol<S>());

  // With the clamp the clamped head's dk is ~1e12 × the others: scale its upstream gradients down so
  // every element still counts against the largest.
  std::vector<S> dw = rnd<S>(TC), dalpha = rnd<S>(TC), dbeta = rnd<S>(TC), dk_out = rnd<S>(TC);
  if (clamp_head)
    for (int64_t j = C; j < C + N; ++j) dalpha[size_t(j)] *= S(1e-12), dbeta[size_t(j)] *= S(1e-12);
  const std::vector<S> pre_dwl = rnd<S>(TC), pre_dal = rnd<S>(TC), pre_dk = rnd<S>(TC);
  const std::vector<S> pre_dw0 = rnd<S>(C), pre_da0 = rnd<S>(C), pre_dkk = rnd<S>(C), pre_dka = rnd<S>(C);
  std::vector<S> dwl = pre_dwl, dal = pre_dal, dk = pre_dk, dw0 = pre_dw0, da0 = pre_da0, dkk = pre_dkk, dka = pre_dka;
  train::wkv_inputs_backward<S>(dw.data(), dalpha.data(), dbeta.data(), dk_out.data(), wl.data(), al.data(), k.data(),
                                w0.data(), a0.data(), k_k.data(), k_a.data(), dwl.data(), dal.data(), dk.data(),
                                dw0.data(), da0.data(), dkk.data(), dka.data(), T, C, N);
  const Dev<S> gdw(dw), gdalpha(dalpha), gdbeta(dbeta), gdkout(dk_out);
  auto run = [&](bool elementwise, bool params) {
    struct Out {
      Dev<S> dwl, dal, dk, dw0, da0, dkk, dka;
    } o{Dev<S>(pre_dwl), Dev<S>(pre_dal), Dev<S>(pre_dk), Dev<S>(pre_dw0), Dev<S>(pre_da0), Dev<S>(pre_dkk),
        Dev<S>(pre_dka)};
    auto e = [&](const Dev<S>& d) { return elementwise ? d.p() : nullptr; };
    auto p = [&](const Dev<S>& d) { return params ? d.p() : nullptr; };
    tc::wkv_inputs_backward<S>(st, gdw.p(), gdalpha.p(), gdbeta.p(), gdkout.p(), gwl.p(), gal.p(), gk.p(), gw0.p(),
                               ga0.p(), gkk.p(), gka.p(), e(o.dwl), e(o.dal), e(o.dk), p(o.dw0), p(o.da0), p(o.dkk),
                               p(o.dka), T, C, N);
    return o;
  };
  const auto full = run(true, true);
  const std::vector<S> got_dwl = full.dwl.host(), got_dal = full.dal.host(), got_dk = full.dk.host();
  const std::vector<S> got_dw0 = full.dw0.host(), got_da0 = full.da0.host(), got_dkk = full.dkk.host(),
                       got_dka = full.dka.host();
  EXPECT_CLOSE(got_dwl, dwl, tol<S>());
  EXPECT_CLOSE(got_dal, dal, tol<S>());
  EXPECT_CLOSE(got_dk, dk, tol<S>());
  EXPECT_CLOSE(got_dw0, dw0, tol<S>());
  EXPECT_CLOSE(got_da0, da0, tol<S>());
  EXPECT_CLOSE(got_dkk, dkk, tol<S>());
  EXPECT_CLOSE(got_dka, dka, tol<S>());
  const auto params = run(false, true);  // repeat of the reductions, elementwise outputs null
  EXPECT_TRUE(same_bits(params.dw0.host(), got_dw0)) << "dw0 repeat";
  EXPECT_TRUE(same_bits(params.da0.host(), got_da0)) << "da0 repeat";
  EXPECT_TRUE(same_bits(params.dkk.host(), got_dkk)) << "dk_k repeat";
  EXPECT_TRUE(same_bits(params.dka.host(), got_dka)) << "dk_a repeat";
  EXPECT_TRUE(same_bits(params.dk.host(), pre_dk)) << "null dk written";
  const auto elems = run(true, false);
  EXPECT_TRUE(same_bits(elems.dk.host(), got_dk)) << "dk without the parameter gradients";
  EXPECT_TRUE(same_bits(elems.dw0.host(), pre_dw0)) << "null dw0 written";
}

TEST_F(TrainCudaOps, WkvInputs) {
  for (const Shape& sh : kShapes) {
    wkv_inputs<float>(sh, false);
    wkv_inputs<double>(sh, false);
  }
  wkv_inputs<float>(kShapes[0], true);
  wkv_inputs<double>(kShapes[0], true);
}

// ---- value residual -------------------------------------------------------------------------------------

template <class S>
void TrainCudaOps::value_residual(const Shape& sh) {
  const int64_t T = sh.T, C = sh.C, TC = T * C;
  SCOPED_TRACE(std::string(type_name<S>()) + " T=" + std::to_string(T) + " C=" + std::to_string(C));
  const std::vector<S> v = rnd<S>(TC), vf = rnd<S>(TC), vg = rnd<S>(TC, -2, 2), v0 = rnd<S>(C), dout = rnd<S>(TC);
  std::vector<S> out(static_cast<size_t>(TC));
  train::value_residual_forward<S>(v.data(), vf.data(), vg.data(), v0.data(), out.data(), T, C);
  const Dev<S> gv(v), gvf(vf), gvg(vg), gv0(v0), gdout(dout);
  Dev<S> gout = Dev<S>::nan(static_cast<size_t>(TC));
  tc::value_residual_forward<S>(st, gv.p(), gvf.p(), gvg.p(), gv0.p(), gout.p(), T, C);
  EXPECT_CLOSE(gout.host(), out, tol<S>());

  const std::vector<S> pre_dv = rnd<S>(TC), pre_dvf = rnd<S>(TC), pre_dvg = rnd<S>(TC), pre_dv0 = rnd<S>(C);
  std::vector<S> dv = pre_dv, dvf = pre_dvf, dvg = pre_dvg, dv0 = pre_dv0;
  train::value_residual_backward<S>(dout.data(), v.data(), vf.data(), vg.data(), v0.data(), dv.data(), dvf.data(),
                                    dvg.data(), dv0.data(), T, C);
  Dev<S> gdv(pre_dv), gdvf(pre_dvf), gdvg(pre_dvg), gdv0(pre_dv0);
  tc::value_residual_backward<S>(st, gdout.p(), gv.p(), gvf.p(), gvg.p(), gv0.p(), gdv.p(), gdvf.p(), gdvg.p(),
                                 gdv0.p(), T, C);
  const std::vector<S> got_dv0 = gdv0.host(), got_dvg = gdvg.host();
  EXPECT_CLOSE(gdv.host(), dv, tol<S>());
  EXPECT_CLOSE(gdvf.host(), dvf, tol<S>());
  EXPECT_CLOSE(got_dvg, dvg, tol<S>());
  EXPECT_CLOSE(got_dv0, dv0, tol<S>());
  Dev<S> gdv0b(pre_dv0), gdvgb(pre_dvg);
  tc::value_residual_backward<S>(st, gdout.p(), gv.p(), gvf.p(), gvg.p(), gv0.p(), nullptr, nullptr, nullptr,
                                 gdv0b.p(), T, C);
  EXPECT_TRUE(same_bits(gdv0b.host(), got_dv0)) << "dv0 repeat";
  tc::value_residual_backward<S>(st, gdout.p(), gv.p(), gvf.p(), gvg.p(), gv0.p(), nullptr, nullptr, gdvgb.p(),
                                 nullptr, T, C);
  EXPECT_TRUE(same_bits(gdvgb.host(), got_dvg)) << "dvg alone";
}

TEST_F(TrainCudaOps, ValueResidual) {
  for (const Shape& sh : kShapes) {
    value_residual<float>(sh);
    value_residual<double>(sh);
  }
}

// ---- rwkv7 output --------------------------------------------------------------------------------------

template <class S>
void TrainCudaOps::rwkv7_output(const Shape& sh) {
  const int64_t T = sh.T, C = sh.C, N = sh.N, TC = T * C, R = T * (C / N);
  SCOPED_TRACE(std::string(type_name<S>()) + " T=" + std::to_string(T) + " C=" + std::to_string(C));
  const double eps = train::kLnXEps;
  const std::vector<S> y = rnd<S>(TC, -3, 3), r = rnd<S>(TC), k = rnd<S>(TC), v = rnd<S>(TC), r_k = rnd<S>(C),
                       g = rnd<S>(TC), ln_w = rnd<S>(C, 0.5, 1.5), ln_b = rnd<S>(C), dout = rnd<S>(TC);
  std::vector<S> out(static_cast<size_t>(TC)), mean(static_cast<size_t>(R)), rstd(static_cast<size_t>(R));
  train::rwkv7_output_forward<S>(y.data(), r.data(), k.data(), v.data(), r_k.data(), g.data(), ln_w.data(),
                                 ln_b.data(), eps, out.data(), mean.data(), rstd.data(), T, C, N);
  const Dev<S> gy(y), gr(r), gk(k), gv(v), grk(r_k), gg(g), glw(ln_w), glb(ln_b), gdout(dout);
  Dev<S> gout = Dev<S>::nan(static_cast<size_t>(TC)), gmean = Dev<S>::nan(static_cast<size_t>(R)), grstd = Dev<S>::nan(static_cast<size_t>(R));
  tc::rwkv7_output_forward<S>(st, gy.p(), gr.p(), gk.p(), gv.p(), grk.p(), gg.p(), glw.p(), glb.p(), eps, gout.p(),
                              gmean.p(), grstd.p(), T, C, N);
  EXPECT_CLOSE(gout.host(), out, tol<S>());
  EXPECT_CLOSE(gmean.host(), mean, tol<S>());
  EXPECT_CLOSE(grstd.host(), rstd, tol<S>());

  const Dev<S> cmean(mean), crstd(rstd);
  std::vector<std::vector<S>> pre;  // dy dr dk dv dr_k dg dln_w dln_b
  for (int i = 0; i < 8; ++i) pre.push_back(rnd<S>(i == 4 || i >= 6 ? C : TC));
  std::vector<std::vector<S>> ref = pre;
  train::rwkv7_output_backward<S>(dout.data(), y.data(), r.data(), k.data(), v.data(), r_k.data(), g.data(),
                                  ln_w.data(), ln_b.data(), mean.data(), rstd.data(), ref[0].data(), ref[1].data(),
                                  ref[2].data(), ref[3].data(), ref[4].data(), ref[5].data(), ref[6].data(),
                                  ref[7].data(), T, C, N);
  // mask bit i: output i is passed (else null).
  auto run = [&](unsigned mask) {
    std::vector<Dev<S>> o;
    for (int i = 0; i < 8; ++i) o.emplace_back(pre[size_t(i)]);
    auto q = [&](int i) { return (mask >> i) & 1 ? o[size_t(i)].p() : nullptr; };
    tc::rwkv7_output_backward<S>(st, gdout.p(), gy.p(), gr.p(), gk.p(), gv.p(), grk.p(), gg.p(), glw.p(), glb.p(),
                                 cmean.p(), crstd.p(), q(0), q(1), q(2), q(3), q(4), q(5), q(6), q(7), T, C, N);
    std::vector<std::vector<S>> h;
    for (auto& d : o) h.push_back(d.host());
    return h;
  };
  const char* names[8] = {"dy", "dr", "dk", "dv", "dr_k", "dg", "dln_w", "dln_b"};
  const auto full = run(0xff);
  for (int i = 0; i < 8; ++i) EXPECT_LE(rel_err(full[size_t(i)], ref[size_t(i)]), tol<S>()) << names[i];
  const auto params = run(0xd0);  // dr_k, dln_w, dln_b only: a repeat of the reductions
  const auto elems = run(0x2f);   // the elementwise outputs only
  for (int i = 0; i < 8; ++i) {
    const bool is_param = i == 4 || i >= 6;
    EXPECT_TRUE(same_bits(params[size_t(i)], is_param ? full[size_t(i)] : pre[size_t(i)])) << names[i] << " params run";
    EXPECT_TRUE(same_bits(elems[size_t(i)], is_param ? pre[size_t(i)] : full[size_t(i)])) << names[i] << " elems run";
  }
}

TEST_F(TrainCudaOps, Rwkv7Output) {
  for (const Shape& sh : kShapes) {
    rwkv7_output<float>(sh);
    rwkv7_output<double>(sh);
  }
}

// ---- embedding ----------------------------------------------------------------------------------------

TEST_F(TrainCudaOps, EmbeddingGradPlan) {
  const std::vector<int32_t> ids = {5, 2, 5, 7, 2, 5, 0};
  const tc::EmbeddingGradPlan p = tc::embedding_grad_plan(ids.data(), int64_t(ids.size()));
  EXPECT_EQ(p.order, (std::vector<int32_t>{6, 1, 4, 0, 2, 5, 3}));
  EXPECT_EQ(p.uniq, (std::vector<int32_t>{0, 2, 5, 7}));
  EXPECT_EQ(p.starts, (std::vector<int32_t>{0, 1, 3, 6, 7}));
  const tc::EmbeddingGradPlan empty = tc::embedding_grad_plan(nullptr, 0);
  EXPECT_TRUE(empty.order.empty() && empty.uniq.empty());
  EXPECT_EQ(empty.starts, (std::vector<int32_t>{0}));
}

template <class S>
void TrainCudaOps::embedding(const Shape& sh) {
  const int64_t T = sh.T, C = sh.C, V = 50;
  SCOPED_TRACE(std::string(type_name<S>()) + " T=" + std::to_string(T) + " C=" + std::to_string(C));
  // Ids from a small range, so most repeat; id 7 fills a run of positions: 34 (over the kernel's 32-row
  // direct path: one 32-row batch and a tail) or 280 (over its 256-row staging: two rounds).
  std::vector<int32_t> ids(static_cast<size_t>(T));
  std::uniform_int_distribution<int32_t> u(0, 9);
  for (auto& id : ids) id = u(rng) * 5;
  for (int64_t t = 0; t < std::min<int64_t>(T, T >= 300 ? 280 : 34); ++t) ids[size_t(t)] = 7;
  const std::vector<S> E = rnd<S>(V * C), dout = rnd<S>(T * C), pre = rnd<S>(V * C);
  std::vector<S> out(static_cast<size_t>(T * C));
  train::embedding_forward<S>(E.data(), ids.data(), out.data(), T, V, C);
  const Dev<int32_t> gids(ids);
  const Dev<S> gE(E), gdout(dout);
  Dev<S> gout = Dev<S>::nan(static_cast<size_t>(T * C));
  tc::embedding_forward<S>(st, gE.p(), gids.p(), gout.p(), T, C);
  EXPECT_TRUE(same_bits(gout.host(), out)) << "embedding_forward";

  std::vector<S> dE = pre;
  train::embedding_backward<S>(dout.data(), ids.data(), dE.data(), T, C);
  const tc::EmbeddingGradPlan plan = tc::embedding_grad_plan(ids.data(), T);
  const Dev<int32_t> order(plan.order), uniq(plan.uniq), starts(plan.starts);
  for (int rep = 0; rep < 2; ++rep) {
    Dev<S> gdE(pre);
    tc::embedding_backward<S>(st, gdout.p(), order.p(), uniq.p(), starts.p(), int64_t(plan.uniq.size()), gdE.p(), C);
    // Summed in t order like the CPU loop: the same bits.
    EXPECT_TRUE(same_bits(gdE.host(), dE)) << "embedding_backward (run " << rep << "), max err "
                                           << rel_err(gdE.host(), dE);
  }
}

TEST_F(TrainCudaOps, Embedding) {
  for (const Shape& sh : kShapes) {
    embedding<float>(sh);
    embedding<double>(sh);
  }
}

// ---- cross-entropy rows ----------------------------------------------------------------------------------

template <class S>
void TrainCudaOps::cross_entropy(int64_t n, int64_t V, double l2_scale, int off) {
  SCOPED_TRACE(std::string(type_name<S>()) + " n=" + std::to_string(n) + " V=" + std::to_string(V) +
               " l2=" + std::to_string(l2_scale) + " off=" + std::to_string(off));
  ASSERT_GE(n, 6);
  std::vector<S> logits = rnd<S>(n * V, -4, 4);
  // Row 5: a tie for the maximum at two indices (L2Wrap takes the first); row 4: the maximum near the end.
  logits[size_t(5 * V + 10)] = logits[size_t(5 * V + V / 2)] = S(9);
  logits[size_t(4 * V + V - 2)] = S(8.5);
  std::vector<int32_t> targets(static_cast<size_t>(n));
  std::uniform_int_distribution<int32_t> ut(0, int32_t(V - 1));
  for (auto& t : targets) t = ut(rng);
  targets[1] = -1, targets[5] = -1;  // ignored (row 5: only its L2Wrap gradient remains)
  targets[4] = int32_t(V - 2);       // the target is the maximum
  std::vector<double> coef(static_cast<size_t>(n));
  std::uniform_real_distribution<double> uc(0.5, 2.0);
  for (auto& c : coef) c = uc(rng);
  coef[2] = 0, coef[3] = 0;  // zero-weight rows (row 3 is after l2_first: L2Wrap still applies)
  const int64_t l2_first = 3;

  std::vector<double> loss(static_cast<size_t>(n)), lse(static_cast<size_t>(n)), rmax(static_cast<size_t>(n));
  if constexpr (std::is_same_v<S, float>) {
    train::fast::cross_entropy_rows(logits.data(), targets.data(), n, V, loss.data(), lse.data(), rmax.data());
  } else {
    train::cross_entropy_forward<S>(logits.data(), targets.data(), n, V, loss.data(), lse.data());
    for (int64_t t = 0; t < n; ++t)
      rmax[size_t(t)] = double(*std::max_element(logits.begin() + t * V, logits.begin() + (t + 1) * V));
  }
  const Dev<S> glogits(logits, off);
  const Dev<int32_t> gtargets(targets);
  Dev<double> gloss = Dev<double>::nan(static_cast<size_t>(n)), glse = Dev<double>::nan(static_cast<size_t>(n)),
              grmax = Dev<double>::nan(static_cast<size_t>(n));
  tc::cross_entropy_rows<S>(st, glogits.p(), gtargets.p(), n, V, gloss.p(), glse.p(), grmax.p());
  const double ce_tol = std::is_same_v<S, double> ? 1e-12 : 1e-6;
  EXPECT_LE(rel_err(gloss.host(), loss), ce_tol) << "loss";
  EXPECT_LE(rel_err(glse.host(), lse), ce_tol) << "lse";
  EXPECT_TRUE(same_bits(grmax.host(), rmax)) << "row_max";
  EXPECT_EQ(gloss.host()[1], 0.0) << "ignored target: zero loss";

  // The gradient, from the CPU's lse (the same inputs on both sides).
  std::vector<S> grad = logits;
  if constexpr (std::is_same_v<S, float>) {
    train::fast::cross_entropy_grad_rows(grad.data(), targets.data(), lse.data(), coef.data(), l2_scale, l2_first, n,
                                         V);
  } else {
    std::fill(grad.begin(), grad.end(), S(0));
    train::cross_entropy_backward<S>(logits.data(), targets.data(), lse.data(), coef.data(), grad.data(), n, V);
    if (l2_scale != 0)
      train::l2wrap_backward<S>(logits.data() + l2_first * V, n - l2_first, V, l2_scale, grad.data() + l2_first * V);
  }
  const Dev<double> clse(lse), gcoef(coef);
  Dev<S> ggrad(logits, off);
  tc::cross_entropy_grad_rows<S>(st, ggrad.p(), gtargets.p(), clse.p(), gcoef.p(), l2_scale, l2_first, n, V);
  const std::vector<S> got = ggrad.host();
  EXPECT_LE(rel_err(got, grad), ce_tol) << "cross_entropy_grad_rows";
  // The rows that must be exactly zero but for the L2Wrap entry, and the tie's first index.
  for (int64_t t : {int64_t(1), int64_t(2), int64_t(3), int64_t(5)}) {
    int64_t nonzero = 0;
    for (int64_t i = 0; i < V; ++i) nonzero += got[size_t(t * V + i)] != S(0);
    EXPECT_EQ(nonzero, l2_scale != 0 && t >= l2_first ? 1 : 0) << "row " << t;
  }
  if (l2_scale != 0) {
    EXPECT_EQ(got[size_t(5 * V + 10)], S(double(S(9)) * l2_scale)) << "L2Wrap tie: first index";
    EXPECT_EQ(got[size_t(5 * V + V / 2)], S(0)) << "L2Wrap tie: second index";
  }
}

TEST_F(TrainCudaOps, CrossEntropy) {
  for (double l2 : {0.0, 0.05})
    for (int off : {0, 1}) {
      cross_entropy<float>(37, 1003, l2, off);
      cross_entropy<double>(37, 1003, l2, off);
    }
  cross_entropy<float>(7, 65536, 0.05, 0);
  cross_entropy<double>(7, 65536, 0.05, 0);
}

// ---- optimizer ---------------------------------------------------------------------------------------------

TEST_F(TrainCudaOps, SumSquaresAndScale) {
  for (int64_t n : {int64_t(0), int64_t(5), int64_t(1000003), int64_t(20000000)})
    for (int off : {0, 1}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " off=" + std::to_string(off));
      const std::vector<float> g = rnd<float>(n, -2, 2);
      // The reference in extended precision: a plain double loop over 20M terms is itself off by ~1e-12.
      long double ref_l = 0;
      for (float x : g) ref_l += (long double)x * (long double)x;
      const double ref = double(ref_l);
      const Dev<float> gg(g, off);
      Dev<double> out = Dev<double>::nan(2);
      tc::sum_squares(st, gg.p(), n, out.p());
      tc::sum_squares(st, gg.p(), n, out.p() + 1);
      const std::vector<double> got = out.host();
      EXPECT_LE(std::fabs(got[0] - ref), 1e-12 * ref) << "sum_squares " << got[0] << " vs " << ref;
      EXPECT_TRUE(std::memcmp(&got[0], &got[1], sizeof(double)) == 0) << "sum_squares repeat";

      const double scale = 0.37;
      std::vector<float> scaled = g;
      for (float& x : scaled) x = float(double(x) * scale);
      Dev<float> gs(g, off);
      tc::scale_inplace(st, gs.p(), n, scale);
      EXPECT_TRUE(same_bits(gs.host(), scaled)) << "scale_inplace";
    }
}

TEST_F(TrainCudaOps, AdamWUpdate) {
  for (int off : {0, 1}) {
    const int64_t n = 100003;
    std::vector<float> p = rnd<float>(n), g = rnd<float>(n, -0.1, 0.1), m = rnd<float>(n, -0.01, 0.01),
                       v = rnd<float>(n, 0, 1e-4);
    g[0] = 0, m[0] = 0, v[0] = 0;  // a parameter with no gradient yet
    const double lr = 3e-4, wd = 0.1, b1 = 0.9, b2 = 0.99, eps = 1e-8;
    const int64_t step = 7;
    const double bc1 = 1.0 - std::pow(b1, double(step)), bc2_sqrt = std::sqrt(1.0 - std::pow(b2, double(step)));
    const Dev<float> gg(g, off);
    Dev<float> gp(p, off), gm(m, off), gv(v, off);
    tc::adamw_update(st, gp.p(), gg.p(), gm.p(), gv.p(), n, lr, wd, b1, b2, eps, bc1, bc2_sqrt);
    // AdamW::step (src/train/optimizer.cpp), element by element.
    for (size_t k = 0; k < size_t(n); ++k) {
      m[k] = float(b1 * m[k] + (1.0 - b1) * g[k]);
      v[k] = float(b2 * v[k] + (1.0 - b2) * double(g[k]) * g[k]);
      const double denom = std::sqrt(double(v[k])) / bc2_sqrt + eps;
      const double update = (double(m[k]) / bc1) / denom + wd * double(p[k]);
      p[k] = float(double(p[k]) - lr * update);
    }
    const std::vector<float> got_p = gp.host(), got_m = gm.host(), got_v = gv.host();
    EXPECT_TRUE(same_bits(got_m, m)) << "m, off " << off << ", max err " << rel_err(got_m, m);
    EXPECT_TRUE(same_bits(got_v, v)) << "v, off " << off << ", max err " << rel_err(got_v, v);
    EXPECT_TRUE(same_bits(got_p, p)) << "p, off " << off << ", max err " << rel_err(got_p, p);
    EXPECT_LE(rel_err(got_p, p), 1e-7);
  }
}

}  // namespace
}  // namespace rwkvx
