// `rwkvx quality`: what the lossy speed options (--int8, --kv-dtype bf16) cost on a text, against the
// exact fast CPU path: logit error, top-1 agreement and next-token loss, for prefill and for decode.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.h"
#include "model_args.h"
#include "runtime/engine.h"
#include "runtime/quality.h"
#include "runtime/tokenizer.h"

namespace rwkvx {
namespace {

struct QualityArgs {
  ModelArgs model;
  std::string text, vocab;
  int64_t tokens = 1024, decode_tokens = 256;
  bool json = false;
};

void run_quality(const QualityArgs& a) {
  if (!a.model.int8 && a.model.options.kv_dtype == DType::f32)
    throw Error("quality: nothing to compare; give --int8 and/or --kv-dtype bf16");
  std::ifstream in(a.text, std::ios::binary);
  if (!in) throw Error(a.text + ": cannot open text file");
  std::stringstream ss;
  ss << in.rdbuf();
  Tokenizer tok = Tokenizer::load(a.vocab.empty() ? default_vocab_path() : a.vocab);
  std::vector<int32_t> ids = tok.encode(ss.str());
  if (int64_t(ids.size()) > a.tokens) ids.resize(size_t(a.tokens));
  if (ids.size() < 2) throw Error(a.text + ": the text encodes to fewer than 2 tokens");

  ModelOptions exact_opt = a.model.options;
  exact_opt.kv_dtype = DType::f32;
  auto exact_be = make_backend(a.model.device), lossy_be = make_backend(a.model.device, a.model.int8);
  LoadedModel exact = load_model(a.model.path, exact_opt, *exact_be);
  LoadedModel lossy = load_model(a.model.path, a.model.options, *lossy_be);
  const std::vector<int32_t> head(ids.begin(), ids.begin() + std::min<int64_t>(int64_t(ids.size()), a.decode_tokens + 1));
  const QualityReport prefill = compare_quality(*exact.model, *lossy.model, ids, false);
  const QualityReport decode = compare_quality(*exact.model, *lossy.model, head, true);
  const std::string what = std::string(a.model.int8 ? "int8 weights" : "") +
                           (a.model.int8 && a.model.options.kv_dtype == DType::bf16 ? " + " : "") +
                           (a.model.options.kv_dtype == DType::bf16 ? "bf16 KV cache" : "");
  auto row = [](const QualityReport& r) {
    return nlohmann::json{{"positions", r.positions},       {"logit_rel_max_err", r.logit_rel_max_err},
                          {"logit_mean_abs_err", r.logit_mean_abs_err}, {"top1_agreement", r.top1_agreement},
                          {"loss_exact", r.loss_exact},     {"loss_lossy", r.loss_lossy},
                          {"loss_delta", r.loss_lossy - r.loss_exact}};
  };
  if (a.json) {
    std::printf("%s\n", nlohmann::json{{"model", a.model.path}, {"lossy", what}, {"prefill", row(prefill)},
                                       {"decode", row(decode)}}.dump(2).c_str());
    return;
  }
  std::printf("model %s, text %s: %s against the exact path\n\n", a.model.path.c_str(), a.text.c_str(), what.c_str());
  std::printf("%-8s %9s %14s %14s %10s %11s %11s %11s\n", "path", "positions", "max|dl|/max|l|", "mean|dl|",
              "top-1 agree", "loss exact", "loss lossy", "delta");
  for (auto [name, r] : {std::pair{"prefill", prefill}, {"decode", decode}})
    std::printf("%-8s %9lld %14.3e %14.3e %9.2f%% %11.5f %11.5f %+11.5f\n", name, (long long)r.positions,
                r.logit_rel_max_err, r.logit_mean_abs_err, 100 * r.top1_agreement, r.loss_exact, r.loss_lossy,
                r.loss_lossy - r.loss_exact);
}

}  // namespace
}  // namespace rwkvx

void register_quality_commands(CLI::App& app) {
  using namespace rwkvx;
  static QualityArgs a;
  CLI::App* cmd = app.add_subcommand(
      "quality", "measure what --int8 and --kv-dtype bf16 cost on a text (logit error, loss) against the exact path");
  add_model_args(cmd, a.model);
  add_device_arg(cmd, a.model);
  cmd->add_option("--text", a.text, "UTF-8 text file")->required();
  cmd->add_option("--vocab", a.vocab, "World vocabulary file (default: the bundled one)");
  cmd->add_option("--tokens", a.tokens, "compare at most this many tokens in prefill")->check(CLI::Range(2, 1 << 24))->default_val(1024);
  cmd->add_option("--decode-tokens", a.decode_tokens, "positions compared token by token (the generation path)")
      ->check(CLI::Range(1, 1 << 20))->default_val(256);
  cmd->add_flag("--json", a.json, "print one JSON object instead of the table");
  cmd->callback([] { run_quality(a); });
}
