// Long-context loss by position (spec system.md §5.2), see long_loss.h.
#include "eval/long_loss.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "model/model.h"
#include "runtime/tokenizer.h"
#include "train/data/binidx.h"

namespace rwkvx {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

const Tokenizer& need_tokenizer(const Tokenizer* tok, const std::string& path) {
  if (!tok) throw Error(path + ": text documents need a tokenizer");
  return *tok;
}

}  // namespace

std::vector<std::vector<int32_t>> load_documents(const std::string& path, const Tokenizer* tok,
                                                 const std::string& text_field) {
  std::vector<std::vector<int32_t>> docs;
  if (ends_with(path, ".txt")) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path + ": cannot open text file");
    std::stringstream ss;
    ss << in.rdbuf();
    docs.push_back(need_tokenizer(tok, path).encode(ss.str()));
  } else if (ends_with(path, ".jsonl")) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path + ": cannot open jsonl file");
    std::string line;
    for (int64_t n = 1; std::getline(in, line); ++n) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::parse_error& e) {
        throw Error(path + ":" + std::to_string(n) + ": not valid JSON (" + e.what() + ")");
      }
      if (!j.is_object() || !j.contains(text_field) || !j[text_field].is_string())
        throw Error(path + ":" + std::to_string(n) + ": expected an object with a string field \"" + text_field + "\"");
      docs.push_back(need_tokenizer(tok, path).encode(j[text_field].get<std::string>()));
    }
  } else {
    BinIdxDataset ds = BinIdxDataset::open(path);
    for (uint64_t k = 0; k < ds.n_items(); ++k) docs.push_back(ds.item(k));
  }
  if (docs.empty()) throw Error(path + ": no documents");
  return docs;
}

std::vector<double> token_losses(const Model& model, const std::vector<int32_t>& ids, int64_t window) {
  const int64_t V = model.config().n_vocab, n = int64_t(ids.size()) - 1;
  std::vector<double> out;
  if (n < 1) return out;
  for (int32_t id : ids)
    if (id < 0 || id >= V) throw Error("loss: token id " + std::to_string(id) + " is outside the model's vocabulary of " + std::to_string(V));
  window = std::max<int64_t>(window, 1);
  State st = model.new_state();
  std::vector<float> logits(size_t(std::min(window, n) * V));
  out.reserve(size_t(n));
  for (int64_t t0 = 0; t0 < n; t0 += window) {
    const int64_t w = std::min(window, n - t0);
    Tensor l = model.forward(ids.data() + t0, SeqBatch::single(w), st, LogitsMode::all);
    model.backend().to_host(l, logits.data());
    for (int64_t i = 0; i < w; ++i) {
      const float* row = logits.data() + i * V;
      const double mx = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
      out.push_back(std::log(sum) + mx - double(row[ids[size_t(t0 + i + 1)]]));
    }
  }
  return out;
}

std::vector<int64_t> long_loss_default_lengths(int64_t seq_length) {
  std::vector<int64_t> v;
  for (int64_t s = 2048; s < seq_length; s += 2048) v.push_back(s);
  v.push_back(seq_length);
  return v;
}

void validate_long_loss_config(const LongLossConfig& cfg) {
  if (cfg.lengths.empty()) throw Error("loss: no lengths (buckets) given");
  for (size_t i = 0; i < cfg.lengths.size(); ++i) {
    if (cfg.lengths[i] < 1) throw Error("loss: length " + std::to_string(cfg.lengths[i]) + " must be positive");
    if (i > 0 && cfg.lengths[i] <= cfg.lengths[i - 1])
      throw Error("loss: lengths must increase (" + std::to_string(cfg.lengths[i - 1]) + " then " +
                  std::to_string(cfg.lengths[i]) + ")");
  }
  if (cfg.skip < 0) throw Error("loss: --skip must be >= 0");
  if (cfg.max_docs < 1) throw Error("loss: --max-docs must be >= 1");
}

LongLossResult run_long_loss(const Model& model, const std::vector<std::vector<int32_t>>& docs,
                             const LongLossConfig& cfg, const std::function<void(int64_t, int64_t)>& progress) {
  validate_long_loss_config(cfg);
  const size_t nS = cfg.lengths.size();
  std::vector<int64_t> count(nS, 0), bucket_count(nS, 0);
  std::vector<double> sum_mean(nS, 0), sum_bucket(nS, 0);
  std::vector<double> pos_sum(size_t(cfg.lengths.back()), 0);
  std::vector<int64_t> pos_cnt(size_t(cfg.lengths.back()), 0);
  LongLossResult r;
  for (size_t d = 0; d < docs.size(); ++d) {
    if (std::all_of(count.begin(), count.end(), [&](int64_t c) { return c >= cfg.max_docs; })) break;
    ++r.docs_read;
    const std::vector<int32_t>& ids = docs[d];
    const int64_t after_skip = int64_t(ids.size()) - cfg.skip;  // the official len(ids) - 2048
    const int64_t avail = after_skip - 1;                        // positions a full window can score
    int64_t longest = 0;
    for (size_t s = 0; s < nS; ++s)
      if (count[s] < cfg.max_docs && after_skip >= cfg.lengths[s]) longest = cfg.lengths[s];
    const int64_t n = std::min(longest, avail);
    if (n < 1) continue;
    if (progress) progress(int64_t(d), n);
    const std::vector<int32_t> w(ids.begin() + cfg.skip, ids.begin() + cfg.skip + n + 1);
    const std::vector<double> loss = token_losses(model, w);
    for (size_t s = 0; s < nS; ++s) {
      if (count[s] >= cfg.max_docs || after_skip < cfg.lengths[s]) continue;
      const int64_t m = std::min(cfg.lengths[s], n), lo = s == 0 ? 0 : cfg.lengths[s - 1];
      double all = 0, part = 0;
      for (int64_t p = 0; p < m; ++p) {
        all += loss[size_t(p)];
        if (p >= lo) part += loss[size_t(p)];
      }
      sum_mean[s] += all / double(m);
      // A document one token short of S has no position in a one-position bucket; it then counts for
      // mean_loss only, as in the official script, and bucket_loss averages the others.
      if (m > lo) sum_bucket[s] += part / double(m - lo), ++bucket_count[s];
      ++count[s];
    }
    for (int64_t p = 0; p < n; ++p) pos_sum[size_t(p)] += loss[size_t(p)], ++pos_cnt[size_t(p)];
  }
  if (count[0] == 0)
    throw Error("loss: no document has at least skip + S = " + std::to_string(cfg.skip + cfg.lengths[0]) +
                " tokens (the smallest S is " + std::to_string(cfg.lengths[0]) + ")");
  int64_t last = 0;
  for (int64_t p = 0; p < int64_t(pos_cnt.size()); ++p)
    if (pos_cnt[size_t(p)] > 0) last = p + 1;
  for (int64_t p = 0; p < last; ++p) {
    r.position_docs.push_back(pos_cnt[size_t(p)]);
    r.position_loss.push_back(pos_cnt[size_t(p)] > 0 ? pos_sum[size_t(p)] / double(pos_cnt[size_t(p)]) : NAN);
  }
  for (size_t s = 0; s < nS; ++s) {
    LongLossBucket b;
    b.lo = s == 0 ? 0 : cfg.lengths[s - 1];
    b.hi = cfg.lengths[s];
    b.docs = count[s];
    if (count[s] > 0) b.mean_loss = sum_mean[s] / double(count[s]);
    if (bucket_count[s] > 0) b.bucket_loss = sum_bucket[s] / double(bucket_count[s]);
    r.buckets.push_back(b);
  }
  return r;
}

}  // namespace rwkvx
