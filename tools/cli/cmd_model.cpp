// Model commands: `rwkvx info` (inferred configuration) and `rwkvx logits` (float32 logits for every
// position, for checks against reference implementations). The command-line forms are stable.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "model/model.h"
#include "model_args.h"
#include "runtime/engine.h"

namespace rwkvx {
namespace {

std::vector<int32_t> read_token_file(const std::string& path) {
  std::vector<int32_t> ids = read_token_ids(path);
  if (ids.empty()) throw Error(path + ": token file is empty");
  return ids;
}

void run_info(const ModelArgs& a) {
  auto be = make_reference_backend();
  TensorStore store = load_checkpoint(a.path);
  ModelConfig cfg = infer_config(store, a.options);
  std::printf("file:           %s (%s)\n", a.path.c_str(), store.format.c_str());
  std::map<std::string, int64_t> by_dtype;
  for (const auto& [n, t] : store.tensors) by_dtype[std::string(dtype_name(t.dtype))] += t.numel();
  std::string dt;
  for (const auto& [d, n] : by_dtype) dt += (dt.empty() ? "" : ", ") + d + " " + std::to_string(n);
  std::printf("weights:        %s\n%s", dt.c_str(), cfg.describe().c_str());
}

void run_logits(const ModelArgs& a, const std::string& tokens_file, const std::string& out_path,
                const std::string& mode, int64_t slice) {
  std::vector<int32_t> ids = read_token_file(tokens_file);
  auto be = make_backend(a.device, a.int8);
  auto model = Model::load(a.path, a.options, *be);
  const int64_t V = model->config().n_vocab;
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= V)
      throw Error(tokens_file + ": token " + std::to_string(i) + " has id " + std::to_string(ids[i]) +
                  ", outside the model's vocabulary [0, " + std::to_string(V) + ")");
  State state = model->new_state();
  AtomicFile out(out_path);
  std::vector<float> host;
  const int64_t T = int64_t(ids.size());
  const int64_t step = mode == "decode" ? 1 : slice;
  for (int64_t t0 = 0; t0 < T; t0 += step) {
    const int64_t n = std::min(step, T - t0);
    Tensor logits = model->forward(ids.data() + t0, SeqBatch::single(n), state, LogitsMode::all);
    host.resize(size_t(logits.numel()));
    be->to_host(logits, host.data());
    out.write(host.data(), host.size() * sizeof(float));
  }
  out.commit();
}

}  // namespace
}  // namespace rwkvx

void register_model_commands(CLI::App& app) {
  using namespace rwkvx;
  static ModelArgs info_args, logits_args;
  static std::string tokens_file, out_path, mode = "prefill";
  static int64_t slice = 8192;

  CLI::App* info = app.add_subcommand("info", "print the configuration inferred from a checkpoint and its parameter count");
  add_model_args(info, info_args);
  info->callback([] { run_info(info_args); });

  CLI::App* logits = app.add_subcommand(
      "logits", "write float32 logits [T, vocab] (little-endian, row-major) for every position of a token file");
  add_model_args(logits, logits_args);
  add_device_arg(logits, logits_args);
  logits->add_option("--tokens-file", tokens_file, "whitespace-separated token ids")->required();
  logits->add_option("--out", out_path, "output file (written atomically)")->required();
  logits->add_option("--mode", mode, "prefill: whole sequence per call; decode: one token per call")
      ->check(CLI::IsMember({"prefill", "decode"}))
      ->default_val("prefill");
  logits->add_option("--slice", slice, "prefill: tokens per call (results do not depend on it; bounds memory)")
      ->check(CLI::PositiveNumber)
      ->default_val(8192);
  logits->callback([] { run_logits(logits_args, tokens_file, out_path, mode, slice); });
}
