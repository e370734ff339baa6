// Training preparation commands: `rwkvx expand` (RWKV-7 → RWKV-X checkpoint, spec system.md §3.2–3.3)
// and `rwkvx data` (jsonl / text → binidx, §4.1). Both write their outputs atomically.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "commands.h"
#include "core/error.h"
#include "model/formats/tensor_store.h"
#include "runtime/tokenizer.h"
#include "train/data/make_data.h"
#include "train/data/passkey_data.h"
#include "train/data/sampler.h"
#include "train/expand.h"

namespace rwkvx {
namespace {

struct ExpandArgs {
  std::string model, out, sparse_layers, init = "paper";
  uint64_t seed = 1;
  int chunk = 0, top_k = 0;
};

void run_expand(const ExpandArgs& a) {
  if (!a.out.ends_with(".pth") && !a.out.ends_with(".safetensors"))
    throw Error("--out " + a.out + ": unknown checkpoint extension (use .pth or .safetensors)");
  const int chunk = a.chunk > 0 ? a.chunk : kDefaultChunkSize, top_k = a.top_k > 0 ? a.top_k : kDefaultTopK;
  if ((a.chunk > 0 || a.top_k > 0) && !a.out.ends_with(".safetensors"))
    throw Error("--chunk-size/--top-k are stored as safetensors metadata; write a .safetensors file (a .pth file "
                "cannot hold them: pass them to every command that loads it instead)");
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
  save_checkpoint(a.out, r.tensors, sparse_metadata(chunk, top_k, r.n_sparse));
  int64_t params = 0;
  for (const TensorData& t : r.tensors) params += int64_t(t.bytes.size() / dtype_size(t.dtype));
  std::string after;
  for (int64_t p : r.positions) after += (after.empty() ? "" : ", ") + std::to_string(p);
  std::printf("wrote %s: RWKV-X with %lld RWKV blocks and %lld sparse-attention blocks (after RWKV blocks %s), "
              "init %s%s, %lld parameters%s\n",
              a.out.c_str(), static_cast<long long>(r.source.n_rwkv), static_cast<long long>(r.n_sparse),
              after.c_str(), expand_init_name(opt.init),
              opt.init == ExpandInit::random ? (", seed " + std::to_string(a.seed)).c_str() : "",
              static_cast<long long>(params),
              a.out.ends_with(".safetensors")
                  ? (", chunk " + std::to_string(chunk) + " and top-k " + std::to_string(top_k) + " stored").c_str()
                  : "");
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
  std::printf("wrote %s.bin and %s.idx: %llu documents, %llu tokens (%s)", out.c_str(), out.c_str(),
              static_cast<unsigned long long>(s.documents), static_cast<unsigned long long>(s.tokens),
              binidx_dtype_name(uint8_t(s.dtype)));
  if (a.opt.align > 0)
    std::printf(", %llu of them alignment padding", static_cast<unsigned long long>(s.padding));
  std::printf("\n");
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

struct PasskeyDataArgs {
  PasskeyDataOptions opt;
  std::string out;
  std::vector<std::string> haystack_files;
};

void run_passkey_data(PasskeyDataArgs& a) {
  a.opt.haystack.clear();
  for (const std::string& f : a.haystack_files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) throw Error(f + ": cannot open");
    std::stringstream ss;
    ss << in.rdbuf();
    a.opt.haystack.push_back(ss.str());
  }
  write_passkey_jsonl(a.out, a.opt);
  std::map<std::string, uint64_t> kinds;
  uint64_t chars = 0;
  for (uint64_t i = 0; i < a.opt.docs; ++i) {
    const PasskeyDocument d = passkey_document(a.opt, i);
    ++kinds[d.kind];
    chars += d.text.size();
  }
  std::printf("wrote %s: %llu documents (%llu official, %llu haystack, %llu sentences), %llu characters, seed %llu\n",
              a.out.c_str(), static_cast<unsigned long long>(a.opt.docs),
              static_cast<unsigned long long>(kinds["official"]), static_cast<unsigned long long>(kinds["haystack"]),
              static_cast<unsigned long long>(kinds["sentences"]), static_cast<unsigned long long>(chars),
              static_cast<unsigned long long>(a.opt.seed));
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
  ex->add_option("--chunk-size", ea.chunk,
                 "sparse-attention chunk size stored in the .safetensors metadata (rwkvx.chunk_size; default 2048), "
                 "used by every command that loads the model without --chunk-size")
      ->check(CLI::PositiveNumber);
  ex->add_option("--top-k", ea.top_k, "chunks per query stored in the .safetensors metadata (rwkvx.top_k; default 3)")
      ->check(CLI::PositiveNumber);
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
  d->add_option("--align", da.opt.align,
                "window-aligned packing (0 = off, as make_data.py): a document of at most N tokens that would cross a "
                "multiple of N is preceded by 0s up to it, so training windows of ctx_len N hold it whole");
  d->callback([] { run_data(da); });

  static PasskeyDataArgs pa;
  CLI::App* pk = app.add_subcommand(
      "passkey-data",
      "write synthetic passkey-retrieval training documents as jsonl ({\"text\": ...} per line, for `rwkvx data`): a "
      "key hidden in filler and asked for at the end, followed by the answer. A share has exactly the evaluation's "
      "form (spec system.md §5.1); the others vary the instruction, the filler (other repeated sentences or "
      "passages of --haystack text), the key sentence and question, and the key's digits. Deterministic per seed");
  pk->add_option("--out", pa.out, "output .jsonl file (written atomically)")->required();
  pk->add_option("--docs", pa.opt.docs, "number of documents")->default_val(1000)->check(CLI::PositiveNumber);
  pk->add_option("--seed", pa.opt.seed, "seed (document i depends only on the options, the seed and i)")->default_val(1);
  pk->add_option("--min-chars", pa.opt.min_chars, "fewest filler characters per document (log-uniform)")
      ->default_val(400);
  pk->add_option("--max-chars", pa.opt.max_chars, "most filler characters per document (about 3.75 per token)")
      ->default_val(4000);
  pk->add_option("--min-digits", pa.opt.min_digits, "fewest key digits")->default_val(1);
  pk->add_option("--max-digits", pa.opt.max_digits, "most key digits (at most 9)")->default_val(6);
  pk->add_option("--official-fraction", pa.opt.official_fraction, "share of documents in the exact §5.1 form")
      ->default_val(0.4);
  pk->add_option("--haystack-fraction", pa.opt.haystack_fraction, "share of documents with --haystack passages as filler")
      ->default_val(0.3);
  pk->add_option("--edge-depth-fraction", pa.opt.edge_depth_fraction,
                 "share of documents with the key exactly at the start or the end of the filler (the evaluation's "
                 "depths 0 and 1)")
      ->default_val(0.0);
  pk->add_option("--haystack", pa.haystack_files, "UTF-8 text file(s) to cut filler passages from; repeatable")
      ->check(CLI::ExistingFile);
  pk->callback([] { run_passkey_data(pa); });
}
