// Multiple-choice tasks scored by log-likelihood, as lm-eval-harness 0.4 does for the RWKV models (spec
// system.md §5.3): the (context, continuation) pair is encoded by lm-eval's _encode_pair, '\n' (token 11)
// is prepended, one forward from an empty state scores the continuation tokens, and
// acc = [argmax_i ll_i == label], acc_norm = [argmax_i ll_i / len(choice_i) == label] with len in Unicode
// characters of the choice (without the delimiter), first index on ties (numpy argmax).
//
// Task files are jsonl, one example per line:
//   {"context": "2 + 3 =", "choices": ["5", "6", "7"], "label": 0}
// optional "delimiter" (default " ", lm-eval's target_delimiter): the continuation of choice i is
// delimiter + choices[i]. See docs/eval.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace rwkvx {

class Model;
class Tokenizer;

struct TaskExample {
  std::string context;
  std::vector<std::string> choices;
  int label = 0;
  std::string delimiter = " ";
  int64_t line = 0;  // 1-based line in the task file
};

// Parses a task file. Throws rwkvx::Error "<path>:<line>: <what is wrong>" for a line that is not a JSON
// object, lacks a field, has fewer than 2 choices, an empty choice, or a label outside the choices, and
// "<path>: no examples" for a file without any.
std::vector<TaskExample> load_task_file(const std::string& path);

// lm-eval's _encode_pair: trailing whitespace of the context moves to the continuation; returns
// (enc(context), enc(context + continuation)[len(enc(context)):]).
std::pair<std::vector<int32_t>, std::vector<int32_t>> encode_pair(const Tokenizer& tok, const std::string& context,
                                                                  const std::string& continuation);

// Number of Unicode code points of UTF-8 text (Python's len(str)); invalid bytes count one each.
int64_t utf8_length(const std::string& s);

struct ChoiceScore {
  double loglikelihood = 0;  // Σ log p(continuation token)
  bool is_greedy = true;     // every continuation token is the argmax
  int64_t tokens = 0;        // continuation tokens scored
};

// Log-likelihood of `cont` after `ctx` (token ids, already encoded): one forward of [11] + ctx + cont from
// an empty state.
ChoiceScore score_continuation(const Model& model, const std::vector<int32_t>& ctx, const std::vector<int32_t>& cont);

struct ExampleResult {
  std::vector<ChoiceScore> scores;
  int pred = 0, pred_norm = 0;  // argmax of ll and of ll / len(choice)
  bool acc = false, acc_norm = false;
};

// Scores one example (the context is run once and its state shared by the choices).
ExampleResult score_example(const Model& model, const Tokenizer& tok, const TaskExample& ex);

struct TaskResult {
  std::string path;
  int64_t n = 0;
  double acc = 0, acc_norm = 0;  // means over the examples, in [0, 1]
  std::vector<ExampleResult> examples;
};

TaskResult run_task_file(const Model& model, const Tokenizer& tok, const std::string& path);

}  // namespace rwkvx
