// Exact-vs-lossy comparison on text (see quality.h).
#include "runtime/quality.h"

#include <algorithm>
#include <cmath>

namespace rwkvx {
namespace {

// Mean of log-sum-exp(l) - l[target] over rows; logits [n, V] host fp32.
double cross_entropy(const float* l, int64_t V, int32_t target) {
  const float mx = *std::max_element(l, l + V);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(l[v]) - mx);
  return std::log(sum) + mx - l[target];
}

}  // namespace

QualityReport compare_quality(const Model& exact, const Model& lossy, const std::vector<int32_t>& ids, bool decode) {
  const int64_t V = exact.config().n_vocab, n = int64_t(ids.size()) - 1;
  if (lossy.config().n_vocab != V) throw Error("quality: the two models have different vocabularies");
  if (n < 1) throw Error("quality: the text must encode to at least 2 tokens");
  constexpr int64_t kWindow = 128;  // logits of one window are [128, V] per model
  State se = exact.new_state(), sl = lossy.new_state();
  std::vector<float> le(static_cast<size_t>(kWindow * V)), ll(static_cast<size_t>(kWindow * V));
  QualityReport r;
  double max_ref = 0, max_diff = 0, sum_abs = 0;
  int64_t agree = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kWindow) {
    const int64_t w = std::min(kWindow, n - t0);
    Tensor te = exact.forward(ids.data() + t0, SeqBatch::single(w), se, LogitsMode::all);
    exact.backend().to_host(te, le.data());
    if (decode) {
      for (int64_t i = 0; i < w; ++i) {
        Tensor tl = lossy.forward(ids.data() + t0 + i, SeqBatch::single(1), sl, LogitsMode::all);
        lossy.backend().to_host(tl, ll.data() + i * V);
      }
    } else {
      Tensor tl = lossy.forward(ids.data() + t0, SeqBatch::single(w), sl, LogitsMode::all);
      lossy.backend().to_host(tl, ll.data());
    }
    for (int64_t i = 0; i < w; ++i) {
      const float *a = le.data() + i * V, *b = ll.data() + i * V;
      for (int64_t v = 0; v < V; ++v) {
        const double d = std::fabs(double(a[v]) - b[v]);
        max_diff = std::max(max_diff, d);
        max_ref = std::max(max_ref, std::fabs(double(a[v])));
        sum_abs += d;
      }
      agree += (std::max_element(a, a + V) - a) == (std::max_element(b, b + V) - b);
      const int32_t target = ids[size_t(t0 + i + 1)];
      r.loss_exact += cross_entropy(a, V, target);
      r.loss_lossy += cross_entropy(b, V, target);
    }
  }
  r.positions = n;
  r.logit_rel_max_err = max_ref > 0 ? max_diff / max_ref : max_diff;
  r.logit_mean_abs_err = sum_abs / double(n * V);
  r.top1_agreement = double(agree) / double(n);
  r.loss_exact /= double(n);
  r.loss_lossy /= double(n);
  return r;
}

}  // namespace rwkvx
