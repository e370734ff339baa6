// Multiple-choice tasks (spec system.md §5.3): lm-eval's pair encoding, log-likelihoods equal a direct
// computation through Model::forward, acc/acc_norm on task files whose answers are known by construction,
// malformed files name the line, and the shipped task files are well-formed.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "eval/eval_test_util.h"
#include "eval/tasks.h"

namespace rwkvx {
namespace {

TEST(Tasks, EncodePairMovesTrailingWhitespace) {
  const Tokenizer tok = test::small_tokenizer();
  auto [ctx, cont] = encode_pair(tok, "The sky is ", "blue");
  EXPECT_EQ(ctx, tok.encode("The sky is"));
  EXPECT_EQ(cont, tok.encode(" blue"));
  // enc(ctx + cont) may merge across the boundary; the continuation is the tail after len(enc(ctx)).
  auto [c2, k2] = encode_pair(tok, "gr", "ass");
  const std::vector<int32_t> whole = tok.encode("grass");
  EXPECT_EQ(c2, tok.encode("gr"));
  EXPECT_EQ(k2, std::vector<int32_t>(whole.begin() + std::min(whole.size(), c2.size()), whole.end()));
  auto [c3, k3] = encode_pair(tok, "", " go");
  EXPECT_TRUE(c3.empty());
  EXPECT_EQ(k3, tok.encode(" go"));
  auto [c4, k4] = encode_pair(tok, "Here\n", "we");
  EXPECT_EQ(c4, tok.encode("Here"));
  EXPECT_EQ(k4, tok.encode("\nwe"));
}

TEST(Tasks, Utf8Length) {
  EXPECT_EQ(utf8_length("abc"), 3);
  EXPECT_EQ(utf8_length("h\xC3\xA9llo"), 5);
  EXPECT_EQ(utf8_length("\xE4\xB8\xAD\xF0\x9F\x98\x80"), 2);
  EXPECT_EQ(utf8_length("\xFF\xC3"), 2);
}

// Σ log softmax over one forward of [11] + ctx + cont, by hand.
double direct_loglik(const test::GoldenModel& g, const std::vector<int32_t>& ctx, const std::vector<int32_t>& cont,
                     bool* greedy = nullptr) {
  std::vector<int32_t> src{11};
  src.insert(src.end(), ctx.begin(), ctx.end());
  src.insert(src.end(), cont.begin(), cont.end());
  State st = g.model->new_state();
  Tensor l = g.model->forward(src.data(), SeqBatch::single(int64_t(src.size())), st, LogitsMode::all);
  const std::vector<float> h = test::host(*g.be, l);
  const size_t V = size_t(g.model->config().n_vocab);
  double ll = 0;
  bool all_greedy = true;
  for (size_t j = 1 + ctx.size(); j < src.size(); ++j) {
    const float* row = h.data() + (j - 1) * V;
    double z = 0;
    size_t best = 0;
    for (size_t v = 0; v < V; ++v) z += std::exp(double(row[v])), best = row[v] > row[best] ? v : best;
    ll += double(row[src[j]]) - std::log(z);
    all_greedy = all_greedy && best == size_t(src[j]);
  }
  if (greedy) *greedy = all_greedy;
  return ll;
}

TEST(TasksGolden, LoglikelihoodEqualsDirectForward) {
  const Tokenizer tok = test::small_tokenizer();
  for (const char* name : {"rwkvx-tiny", "rwkv7-tiny"}) {
    auto g = test::load_golden(name);
    const std::vector<int32_t> ctx = tok.encode("There and back again. The grass is"), cont = tok.encode(" green.");
    bool greedy = false;
    const double want = direct_loglik(g, ctx, cont, &greedy);
    const ChoiceScore s = score_continuation(*g.model, ctx, cont);
    EXPECT_NEAR(s.loglikelihood, want, 1e-4 * std::fabs(want)) << name;
    EXPECT_EQ(s.is_greedy, greedy);
    EXPECT_EQ(s.tokens, int64_t(cont.size()));
  }
}

TEST(TasksGolden, GreedyContinuationIsGreedy) {
  auto g = test::load_golden("rwkvx-tiny");
  const Tokenizer tok = test::small_tokenizer();
  std::vector<int32_t> src{11};
  const std::vector<int32_t> ctx = tok.encode("Here we go.");
  src.insert(src.end(), ctx.begin(), ctx.end());
  // Three greedy tokens, one at a time from the full forward.
  std::vector<int32_t> cont;
  for (int i = 0; i < 3; ++i) {
    State st = g.model->new_state();
    std::vector<int32_t> all = src;
    all.insert(all.end(), cont.begin(), cont.end());
    Tensor l = g.model->forward(all.data(), SeqBatch::single(int64_t(all.size())), st, LogitsMode::last);
    const std::vector<float> row = test::host(*g.be, l);
    cont.push_back(int32_t(std::max_element(row.begin(), row.end()) - row.begin()));
  }
  EXPECT_TRUE(score_continuation(*g.model, ctx, cont).is_greedy);
  std::vector<int32_t> other = cont;
  other[1] = other[1] == 5 ? 6 : 5;
  EXPECT_FALSE(score_continuation(*g.model, ctx, other).is_greedy);
}

// A task file whose labels are set, by construction, to the argmax of directly computed log-likelihoods
// (acc must be 1) and whose acc_norm is predicted from the same numbers and the choices' lengths.
TEST(TasksGolden, AccAndAccNormOnKnownAnswers) {
  auto g = test::load_golden("rwkvx-tiny");
  const Tokenizer tok = test::small_tokenizer();
  struct Q {
    std::string context;
    std::vector<std::string> choices;
  };
  const std::vector<Q> qs = {{"The sky is", {"blue", "green", "yellow and green", "a"}},
                             {"Here we", {"go", "go again and again", "back"}},
                             {"The pass key is ", {"2733", "5995", "17531"}},
                             {"There and", {"back again.", "x", "the grass is green"}}};
  std::string file;
  int want_acc_norm = 0;
  for (const Q& q : qs) {
    std::vector<double> ll, norm;
    for (const std::string& c : q.choices) {
      auto [ctx, cont] = encode_pair(tok, q.context, " " + c);
      ll.push_back(direct_loglik(g, ctx, cont));
      norm.push_back(ll.back() / double(c.size()));
    }
    const int label = int(std::max_element(ll.begin(), ll.end()) - ll.begin());
    want_acc_norm += int(std::max_element(norm.begin(), norm.end()) - norm.begin()) == label;
    nlohmann::json j{{"context", q.context}, {"choices", q.choices}, {"label", label}};
    file += j.dump() + "\n";
  }
  test::TempDir dir;
  const std::string path = dir.write("t.jsonl", file);
  const TaskResult r = run_task_file(*g.model, tok, path);
  EXPECT_EQ(r.n, 4);
  EXPECT_EQ(r.acc, 1.0);
  EXPECT_EQ(r.acc_norm, want_acc_norm / 4.0);
  // The same file with every label moved to another choice scores 0 on acc.
  std::string shifted;
  for (size_t i = 0; i < qs.size(); ++i) {
    nlohmann::json j{{"context", qs[i].context}, {"choices", qs[i].choices},
                     {"label", (r.examples[i].pred + 1) % int(qs[i].choices.size())}};
    shifted += j.dump() + "\n";
  }
  const TaskResult r0 = run_task_file(*g.model, tok, dir.write("s.jsonl", shifted));
  EXPECT_EQ(r0.acc, 0.0);
  // Deterministic: a second run gives identical log-likelihoods.
  const TaskResult r2 = run_task_file(*g.model, tok, path);
  for (size_t i = 0; i < r.examples.size(); ++i)
    for (size_t c = 0; c < r.examples[i].scores.size(); ++c)
      EXPECT_EQ(r.examples[i].scores[c].loglikelihood, r2.examples[i].scores[c].loglikelihood);
}

TEST(Tasks, MalformedFilesNameTheLine) {
  test::TempDir dir;
  const std::string good = "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": 1}\n";
  const std::pair<std::string, std::string> cases[] = {
      {good + "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": 2}\n", "label 2 is outside"},
      {good + "not json\n", "not valid JSON"},
      {good + "{\"context\": \"a\", \"choices\": [\"b\"], \"label\": 0}\n", "at least 2 choices"},
      {good + "{\"context\": \"a\", \"choices\": [\"b\", \"\"], \"label\": 0}\n", "empty"},
      {good + "{\"choices\": [\"b\", \"c\"], \"label\": 0}\n", "\"context\""},
      {good + "{\"context\": \"a\", \"choices\": [\"b\", 3], \"label\": 0}\n", "array of strings"},
      {good + "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": \"0\"}\n", "\"label\""},
      {good + "[1, 2]\n", "JSON object"},
  };
  for (const auto& [text, what] : cases) {
    const std::string path = dir.write("bad.jsonl", text);
    try {
      load_task_file(path);
      ADD_FAILURE() << "no error for " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("bad.jsonl:2: "), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(load_task_file(dir.write("empty.jsonl", "\n \n")), Error);
  EXPECT_THROW(load_task_file(dir.file("missing.jsonl")), Error);
  const auto ex = load_task_file(dir.write("d.jsonl", "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": 1, \"delimiter\": \"\"}\n"));
  ASSERT_EQ(ex.size(), 1u);
  EXPECT_EQ(ex[0].delimiter, "");
  EXPECT_EQ(ex[0].label, 1);
}

TEST(Tasks, ShippedTaskFilesAreWellFormed) {
  const std::filesystem::path dir = std::filesystem::path(RWKVX_SOURCE_DIR) / "data" / "tasks";
  int files = 0;
  uintmax_t bytes = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    bytes += e.file_size();
    if (e.path().extension() != ".jsonl") continue;
    ++files;
    const auto ex = load_task_file(e.path().string());
    EXPECT_GE(ex.size(), 20u) << e.path();
  }
  EXPECT_GE(files, 3);
  EXPECT_LT(bytes, 200u * 1024u);
}

}  // namespace
}  // namespace rwkvx
