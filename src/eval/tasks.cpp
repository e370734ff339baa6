// Multiple-choice log-likelihood scoring (spec system.md §5.3), see tasks.h.
#include "eval/tasks.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "eval/passkey.h"
#include "model/model.h"
#include "model/state_copy.h"
#include "runtime/tokenizer.h"

namespace rwkvx {

std::vector<TaskExample> load_task_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open task file");
  std::vector<TaskExample> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(n) + ": ";
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      throw Error(where + "not valid JSON (" + e.what() + ")");
    }
    if (!j.is_object()) throw Error(where + "expected a JSON object");
    TaskExample ex;
    ex.line = n;
    if (!j.contains("context") || !j["context"].is_string()) throw Error(where + "\"context\" must be a string");
    ex.context = j["context"].get<std::string>();
    if (!j.contains("choices") || !j["choices"].is_array()) throw Error(where + "\"choices\" must be an array of strings");
    for (const auto& c : j["choices"]) {
      if (!c.is_string()) throw Error(where + "\"choices\" must be an array of strings");
      if (c.get<std::string>().empty()) throw Error(where + "a choice is empty (acc_norm divides by its length)");
      ex.choices.push_back(c.get<std::string>());
    }
    if (ex.choices.size() < 2) throw Error(where + "needs at least 2 choices");
    if (!j.contains("label") || !j["label"].is_number_integer()) throw Error(where + "\"label\" must be an integer");
    const int64_t label = j["label"].get<int64_t>();
    if (label < 0 || label >= int64_t(ex.choices.size()))
      throw Error(where + "label " + std::to_string(label) + " is outside the " + std::to_string(ex.choices.size()) + " choices");
    ex.label = int(label);
    if (j.contains("delimiter")) {
      if (!j["delimiter"].is_string()) throw Error(where + "\"delimiter\" must be a string");
      ex.delimiter = j["delimiter"].get<std::string>();
    }
    out.push_back(std::move(ex));
  }
  if (out.empty()) throw Error(path + ": no examples");
  return out;
}

std::pair<std::vector<int32_t>, std::vector<int32_t>> encode_pair(const Tokenizer& tok, const std::string& context,
                                                                  const std::string& continuation) {
  // Python's context.rstrip(): the kept part is what strip_whitespace keeps, up to its end.
  const std::string stripped = strip_whitespace(context);
  size_t keep = 0;
  if (!stripped.empty()) keep = context.rfind(stripped) + stripped.size();
  const std::string ctx = context.substr(0, keep), cont = context.substr(keep) + continuation;
  std::vector<int32_t> ctx_enc = tok.encode(ctx), whole = tok.encode(ctx + cont);
  std::vector<int32_t> cont_enc(whole.begin() + std::min(whole.size(), ctx_enc.size()), whole.end());
  return {std::move(ctx_enc), std::move(cont_enc)};
}

int64_t utf8_length(const std::string& s) {
  int64_t n = 0;
  for (size_t i = 0; i < s.size(); ++n) {
    const uint8_t c = uint8_t(s[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    bool ok = i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) ok = (uint8_t(s[i + k]) & 0xC0) == 0x80;
    i += ok ? len : 1;
  }
  return n;
}

namespace {

constexpr int32_t kNewline = 11;  // '\n', the token lm-eval's RWKV wrapper prepends

// Adds log softmax(row)[target] to `s` and checks greediness.
void add_token(const float* row, int64_t V, int32_t target, ChoiceScore& s) {
  const float* best = std::max_element(row, row + V);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - *best);
  s.loglikelihood += double(row[target]) - *best - std::log(sum);
  s.is_greedy = s.is_greedy && (best - row) == target;
  ++s.tokens;
}

// Scores `cont` given the state after [11] + ctx and the logits of its last position.
ChoiceScore score_from(const Model& model, const State& ctx_state, const std::vector<float>& first_row,
                       const std::vector<int32_t>& cont) {
  const int64_t V = model.config().n_vocab;
  ChoiceScore s;
  if (cont.empty()) return s;
  add_token(first_row.data(), V, cont[0], s);
  if (cont.size() > 1) {
    State st = model.new_state();
    copy_state_slot(model.backend(), ctx_state, 0, st, 0);
    Tensor l = model.forward(cont.data(), SeqBatch::single(int64_t(cont.size()) - 1), st, LogitsMode::all);
    std::vector<float> rows(size_t(l.numel()));
    model.backend().to_host(l, rows.data());
    for (size_t i = 1; i < cont.size(); ++i) add_token(rows.data() + (i - 1) * V, V, cont[i], s);
  }
  return s;
}

State run_context(const Model& model, const std::vector<int32_t>& ctx, std::vector<float>& last_row) {
  std::vector<int32_t> src{kNewline};
  src.insert(src.end(), ctx.begin(), ctx.end());
  State st = model.new_state();
  Tensor l = model.forward(src.data(), SeqBatch::single(int64_t(src.size())), st, LogitsMode::last);
  last_row.resize(size_t(model.config().n_vocab));
  model.backend().to_host(l, last_row.data());
  return st;
}

int argmax_first(const std::vector<double>& v) { return int(std::max_element(v.begin(), v.end()) - v.begin()); }

}  // namespace

ChoiceScore score_continuation(const Model& model, const std::vector<int32_t>& ctx, const std::vector<int32_t>& cont) {
  std::vector<float> row;
  State st = run_context(model, ctx, row);
  return score_from(model, st, row, cont);
}

ExampleResult score_example(const Model& model, const Tokenizer& tok, const TaskExample& ex) {
  ExampleResult r;
  std::vector<double> ll, ll_norm;
  std::vector<float> row;
  State ctx_state;
  std::vector<int32_t> ctx_enc;
  bool have_ctx = false;
  for (const std::string& choice : ex.choices) {
    auto [ctx, cont] = encode_pair(tok, ex.context, ex.delimiter + choice);
    // Every choice has the same context encoding (trailing whitespace moves the same way each time).
    if (!have_ctx || ctx != ctx_enc) ctx_state = run_context(model, ctx, row), ctx_enc = ctx, have_ctx = true;
    const ChoiceScore s = score_from(model, ctx_state, row, cont);
    r.scores.push_back(s);
    ll.push_back(s.loglikelihood);
    ll_norm.push_back(s.loglikelihood / double(utf8_length(choice)));
  }
  r.pred = argmax_first(ll), r.pred_norm = argmax_first(ll_norm);
  r.acc = r.pred == ex.label, r.acc_norm = r.pred_norm == ex.label;
  return r;
}

TaskResult run_task_file(const Model& model, const Tokenizer& tok, const std::string& path) {
  const std::vector<TaskExample> examples = load_task_file(path);
  TaskResult t;
  t.path = path;
  for (const TaskExample& ex : examples) {
    try {
      t.examples.push_back(score_example(model, tok, ex));
    } catch (const Error& e) {
      throw Error(path + ":" + std::to_string(ex.line) + ": " + e.what());
    }
    t.acc += t.examples.back().acc, t.acc_norm += t.examples.back().acc_norm;
  }
  t.n = int64_t(examples.size());
  t.acc /= double(t.n), t.acc_norm /= double(t.n);
  return t;
}

}  // namespace rwkvx
