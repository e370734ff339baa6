// Training preparation commands: `rwkvx expand` (RWKV-7 → RWKV-X checkpoint, spec system.md §3.2–3.3)
// and `rwkvx data` (jsonl / text → binidx, §4.1). Both write their outputs atomically.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "commands.h"
#include "core/error.h"
#include "model/formats/tensor_store.h"
#include "runtime/tokenizer.h"
#include "train/data/make_data.h"
#include "train/data/sampler.h"
#include "train/expand.h"

namespace rwkvx {
namespace {

struct ExpandArgs {
  std::string model, out, sparse_layers, init = "paper";
  uint64_t seed = 1;
};

void run_expand(const ExpandArgs& a) {
  if (!a.out.ends_with(".pth") && !a.out.ends_with(".safetensors"))
    throw Error("--out " + a.out + ": unknown checkpoint extension (use .pth or .safetensors)");
  std::error_code ec;
  if (std::filesystem::equivalent(a.model, a.out, ec))
    throw Error("--out " + a.out + " is the input model; write the expanded model to a new file");
  ExpandOptions opt;
  opt.init = parse_expand_init(a.init);
  opt.seed = a.seed;
  TensorStore src = load_checkpoint(a.model);
  if (!a.sparse_layers.empty()) {
    const ModelConfig c = infer_config(src, ModelOptions{});
    opt.n_sparse = parse_sparse_layers(a.sparse_layers, c.n_rwkv);
  }
  ExpandResult r = expand_rwkv7(src, opt);
  save_checkpoint(a.out, r.tensors);
  int64_t params = 0;
  for (const TensorData& t : r.tensors) params += int64_t(t.bytes.size() / dtype_size(t.dtype));
  std::string after;
  for (int64_t p : r.positions) after += (after.empty() ? "" : ", ") + std::to_string(p);
  std::printf("wrote %s: RWKV-X with %lld RWKV blocks and %lld sparse-attention blocks (after RWKV blocks %s), "
              "init %s%s, %lld parameters\n",
              a.out.c_str(), static_cast<long long>(r.source.n_rwkv), static_cast<long long>(r.n_sparse),
              after.c_str(), expand_init_name(opt.init),
              opt.init == ExpandInit::random ? (", seed " + std::to_string(a.seed)).c_str() : "",
              static_cast<long long>(params));
}

struct DataArgs {
  MakeDataOptions opt;
  std::string vocab, text_split = "file";
  uint64_t ctx_len = 0;
};

void run_data(DataArgs& a) {
  const std::string& out = a.opt.out_prefix;
  if (out.ends_with(".bin") || out.ends_with(".idx"))
    throw Error("--out " + out + ": give the prefix; PREFIX.bin and PREFIX.idx are written (drop the extension)");
  a.opt.text_split = parse_text_split(a.text_split);
  const Tokenizer tok = Tokenizer::load(a.vocab.empty() ? default_vocab_path() : a.vocab);
  const bool tty = isatty(STDERR_FILENO);
  auto last = std::chrono::steady_clock::now();
  bool printed = false;
  auto progress = [&](const MakeDataStats& s) {
    const auto now = std::chrono::steady_clock::now();
    if (std::chrono::duration<double>(now - last).count() < (tty ? 0.25 : 10.0)) return;
    last = now;
    printed = true;
    std::fprintf(stderr, "%s%llu documents, %llu tokens, %.0f tokens/s%s", tty ? "\r" : "",
                 static_cast<unsigned long long>(s.documents), static_cast<unsigned long long>(s.tokens),
                 s.seconds > 0 ? double(s.tokens) / s.seconds : 0.0, tty ? "   " : "\n");
  };
  MakeDataStats s = make_binidx(tok, a.opt, progress);
  if (printed && tty) std::fprintf(stderr, "\n");
  std::fprintf(stderr, "%llu documents, %llu tokens in %.1f s (%.0f tokens/s)\n",
               static_cast<unsigned long long>(s.documents), static_cast<unsigned long long>(s.tokens), s.seconds,
               s.seconds > 0 ? double(s.tokens) / s.seconds : 0.0);
  std::printf("wrote %s.bin and %s.idx: %llu documents, %llu tokens (%s)\n", out.c_str(), out.c_str(),
              static_cast<unsigned long long>(s.documents), static_cast<unsigned long long>(s.tokens),
              binidx_dtype_name(uint8_t(s.dtype)));
  if (a.ctx_len > 0) {
    const uint64_t p = magic_prime(s.tokens, a.ctx_len);
    if (p == 0)
      std::printf("no magic_prime: %llu tokens are fewer than 3 windows of ctx_len %llu\n",
                  static_cast<unsigned long long>(s.tokens), static_cast<unsigned long long>(a.ctx_len));
    else
      std::printf("magic_prime = %llu (for ctx_len %llu)\n--my_exit_tokens %llu --magic_prime %llu --ctx_len %llu\n",
                  static_cast<unsigned long long>(p), static_cast<unsigned long long>(a.ctx_len),
                  static_cast<unsigned long long>(s.tokens), static_cast<unsigned long long>(p),
                  static_cast<unsigned long long>(a.ctx_len));
  }
}

}  // namespace
}  // namespace rwkvx

void register_train_data_commands(CLI::App& app) {
  using namespace rwkvx;
  static ExpandArgs ea;
  CLI::App* ex = app.add_subcommand(
      "expand",
      "turn an RWKV-7 checkpoint into RWKV-X: rename its tensors under 'rwkv.' and add sparse-attention blocks "
      "'moba.J' where the official code runs them (spec system.md §3.2), initialised per §3.3");
  ex->add_option("--model", ea.model, "RWKV-7 checkpoint (.pth or .safetensors)")->required()->check(CLI::ExistingFile);
  ex->add_option("--out", ea.out, "output checkpoint, .pth or .safetensors (written atomically)")->required();
  ex->add_option("--sparse-layers", ea.sparse_layers,
                 "number of sparse blocks N (1, or a divisor of the RWKV block count), or the RWKV blocks they follow "
                 "as a list that must match that layout (e.g. 2,5,8,11 for 4 blocks in 12). Default: one per 3 "
                 "blocks if the count is a multiple of 3, else one per 4");
  ex->add_option("--init", ea.init,
                 "paper (alias llamapro): copy r/k/v and FFN key from the preceding RWKV block, zero the output "
                 "projections, so logits equal the source's; official (alias copy): the official code, everything "
                 "copied; random: the official temporary init with zero output projections (uses --seed)")
      ->default_val("paper");
  ex->add_option("--seed", ea.seed, "seed for --init random (other inits draw no random numbers)")->default_val(1);
  ex->callback([] { run_expand(ea); });

  static DataArgs da;
  CLI::App* d = app.add_subcommand(
      "data",
      "convert jsonl (one JSON object per line) or plain text into a binidx dataset PREFIX.bin/.idx with the World "
      "tokenizer: each document is encoded and followed by the end-of-document token 0 (spec system.md §4.1)");
  d->add_option("--input", da.opt.inputs, "input file(s), .jsonl or .txt; repeat for several, read in order")
      ->required()
      ->check(CLI::ExistingFile);
  d->add_option("--out", da.opt.out_prefix, "output prefix: writes PREFIX.bin and PREFIX.idx")->required();
  d->add_option("--vocab", da.vocab, "vocab file (default: $RWKVX_VOCAB or the one shipped in data/)");
  d->add_option("--text-field", da.opt.text_field, "jsonl: the string field holding a document")->default_val("text");
  d->add_option("--format", da.opt.format, "input format: auto (by extension), jsonl or text")
      ->check(CLI::IsMember({"auto", "jsonl", "text"}))
      ->default_val("auto");
  d->add_option("--text-split", da.text_split,
                "text: what is a document: file (the whole file), line (each non-blank line), blank (paragraphs "
                "separated by blank lines)")
      ->default_val("file");
  d->add_option("--epochs", da.opt.epochs, "repeat the data N times (make_data.py's N_EPOCH)")
      ->default_val(1)
      ->check(CLI::PositiveNumber);
  d->add_flag("--shuffle", da.opt.shuffle, "shuffle the documents of every copy (seeded; holds the text in memory)");
  d->add_option("--seed", da.opt.seed, "shuffle seed")->default_val(1);
  d->add_option("--ctx-len", da.ctx_len, "also print the magic_prime for this context length (spec §4.2)");
  d->callback([] { run_data(da); });
}
