// Finite-difference gradient checking for the training tests: central differences in fp64 against the
// analytic gradient, on every entry of small tensors or a seeded random subset of large ones.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace rwkvx::test {

inline void fill_uniform(std::vector<double>& v, size_t n, double lo, double hi, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> d(lo, hi);
  v.resize(n);
  for (double& x : v) x = d(rng);
}

struct GradCheckResult {
  double worst = 0;  // max over checked entries of |analytic - numeric| / max(|analytic|, |numeric|, floor)
  std::string where;
  int checked = 0;
};

// Perturbs x[i] by ±h, ±2h for the chosen entries and compares the fourth-order central difference
// (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h with analytic[i]: with h = 1e-4 its truncation error
// is ~1e-16 and its rounding error ~1e-12 · |f|, far below the tolerances used.
// The error of an entry is |a - n| / max(|a|, |n|, floor): relative where the gradient is not tiny,
// absolute (scaled by floor) where it is. max_entries < 0: all entries.
inline void grad_check(const std::string& name, std::vector<double>& x, const std::vector<double>& analytic,
                       const std::function<double()>& f, GradCheckResult& res, int max_entries = -1,
                       double floor = 1e-4, double h = 1e-4, uint64_t seed = 7) {
  ASSERT_EQ(x.size(), analytic.size()) << name;
  std::vector<size_t> idx(x.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  if (max_entries >= 0 && idx.size() > size_t(max_entries)) {
    std::mt19937_64 rng(seed + std::hash<std::string>{}(name));
    std::shuffle(idx.begin(), idx.end(), rng);
    idx.erase(idx.begin() + max_entries, idx.end());  // (resize: a GCC 12 -Warray-bounds false positive)
  }
  for (size_t i : idx) {
    const double keep = x[i];
    auto at = [&](double dx) {
      x[i] = keep + dx;
      return f();
    };
    const double d1 = at(h) - at(-h), d2 = at(2 * h) - at(-2 * h);
    x[i] = keep;
    const double num = (8 * d1 - d2) / (12 * h), a = analytic[i];
    const double err = std::fabs(a - num) / std::max({std::fabs(a), std::fabs(num), floor});
    ++res.checked;
    if (err > res.worst) {
      res.worst = err;
      res.where = name + "[" + std::to_string(i) + "] analytic " + std::to_string(a) + " numeric " +
                  std::to_string(num);
    }
  }
}

// Σ r ⊙ y: the scalar objective that turns an op's outputs into a loss (its gradient w.r.t. y is r).
inline double dot(const std::vector<double>& r, const std::vector<double>& y) {
  double s = 0;
  for (size_t i = 0; i < r.size() && i < y.size(); ++i) s += r[i] * y[i];
  return s;
}

}  // namespace rwkvx::test
