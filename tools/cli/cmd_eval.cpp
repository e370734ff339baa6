// `rwkvx eval passkey|loss|tasks`: the paper's evaluations (spec system.md §5.1–5.3) on any checkpoint,
// printed as tables (or JSON) with optional PNG plots. The protocols live in src/eval/; this file parses
// options, loads models and formats results. See docs/eval.md.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "commands.h"
#include "core/error.h"
#include "core/parse.h"
#include "eval/long_loss.h"
#include "eval/passkey.h"
#include "eval/plot.h"
#include "eval/tasks.h"
#include "model_args.h"
#include "runtime/engine.h"
#include "runtime/tokenizer.h"

namespace rwkvx {
namespace {

// "1K" for 1000, "1M" for 1000000, else the number: the heatmap's column labels.
std::string length_text(int64_t n) {
  if (n > 0 && n % 1000000 == 0) return std::to_string(n / 1000000) + "M";
  if (n > 0 && n % 1000 == 0) return std::to_string(n / 1000) + "K";
  return std::to_string(n);
}

// The last two components of a path ("stage2/rwkv-final.safetensors"): enough to tell runs apart in a legend.
std::string short_path(const std::string& path) {
  const size_t last = path.find_last_of('/');
  if (last == std::string::npos || last == 0) return path;
  const size_t prev = path.find_last_of('/', last - 1);
  return prev == std::string::npos ? path : path.substr(prev + 1);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t a = 0;
  for (;;) {
    const size_t b = s.find(',', a);
    out.push_back(s.substr(a, b == std::string::npos ? std::string::npos : b - a));
    if (b == std::string::npos) break;
    a = b + 1;
  }
  return out;
}

// "2000", "2K" (= 2000, the paper's labels), "1M" (= 1,000,000); positive integers only.
std::vector<int64_t> parse_lengths(const std::string& opt, const std::string& s) {
  std::vector<int64_t> v;
  for (const std::string& w : split_list(s)) {
    size_t used = 0;
    const long long x = leading_integer(w, used);
    int64_t mult = 1;
    if (used > 0 && used + 1 == w.size() && (w[used] == 'K' || w[used] == 'k')) mult = 1000, ++used;
    else if (used > 0 && used + 1 == w.size() && w[used] == 'M') mult = 1000000, ++used;
    if (used == 0 || used != w.size() || x <= 0 || x > (int64_t(1) << 40) / mult)
      throw Error(opt + ": '" + w + "' is not a positive length (examples: 2000, 2K, 1M)");
    v.push_back(x * mult);
  }
  return v;
}

std::vector<double> parse_fractions(const std::string& opt, const std::string& s) {
  std::vector<double> v;
  for (const std::string& w : split_list(s)) {
    size_t used = 0;
    double x = NAN;
    try {
      x = std::stod(w, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != w.size() || !(x >= 0 && x <= 1))
      throw Error(opt + ": '" + w + "' is not a fraction in [0, 1]");
    v.push_back(x);
  }
  return v;
}

std::string vocab_or_default(const std::string& v) { return v.empty() ? default_vocab_path() : v; }

// ---------------------------------------------------------------------------------------------- passkey

struct PasskeyArgs {
  ModelArgs model;
  std::string vocab, lengths, depths, out_png;
  int trials = 5;
  uint32_t seed = 0;
  bool json = false, verbose = false;
};

void run_passkey_cmd(const PasskeyArgs& a) {
  PasskeyConfig cfg;
  cfg.lengths = a.lengths.empty() ? passkey_official_lengths() : parse_lengths("--lengths", a.lengths);
  cfg.depths = a.depths.empty() ? passkey_official_depths() : parse_fractions("--depths", a.depths);
  cfg.trials = a.trials;
  cfg.seed = a.seed;
  validate_passkey_config(cfg);
  Tokenizer tok = Tokenizer::load(vocab_or_default(a.vocab));
  auto be = make_backend(a.model.device, a.model.int8);
  LoadedModel m = load_model(a.model.path, a.model.options, *be);
  const bool tty = isatty(2);
  const std::vector<PasskeyCell> cells = run_passkey(*m.model, tok, cfg, [&](const PasskeyCell& c) {
    if (a.verbose)
      for (const PasskeyTrial& t : c.trials)
        std::fprintf(stderr, "L=%lld depth=%.2f key=%d prompt=%lld tokens -> '%s' %s\n", (long long)c.length_label,
                     c.depth, t.key, (long long)t.prompt_tokens, t.decoded.c_str(), t.correct ? "correct" : "wrong");
    else if (tty)
      std::fprintf(stderr, "\rL=%lld depth=%.2f: %.0f%%   ", (long long)c.length_label, c.depth, c.score);
  });
  if (tty && !a.verbose) std::fprintf(stderr, "\n");
  const size_t nL = cfg.lengths.size(), nD = cfg.depths.size();
  // values[depth][length]: the heatmap's rows are depths (0 at the top), its columns lengths (shortest left).
  std::vector<std::vector<double>> grid(nD, std::vector<double>(nL));
  for (size_t i = 0; i < cells.size(); ++i) grid[i % nD][i / nD] = cells[i].score;
  if (!a.out_png.empty()) {
    HeatmapOptions o;
    o.show_values = true;
    o.title = "passkey retrieval: % of " + std::to_string(cfg.trials) + " keys found, " + short_path(a.model.path);
    o.y_label = "key depth";
    o.x_label = "context length (tokens)";
    for (const int64_t L : cfg.lengths) o.col_labels.push_back(length_text(L));
    for (const double d : cfg.depths) {
      char b[32];
      std::snprintf(b, sizeof b, std::fabs(d * 100 - std::round(d * 100)) < 1e-9 ? "%.0f%%" : "%.1f%%", d * 100);
      o.row_labels.push_back(b);
    }
    write_png(a.out_png, heatmap(grid, o));
  }
  if (a.json) {
    nlohmann::json j{{"model", a.model.path}, {"trials", cfg.trials}, {"seed", cfg.seed}};
    for (const PasskeyCell& c : cells) {
      nlohmann::json cj{{"context_length", c.length_label}, {"filler_chars", c.filler_chars}, {"depth", c.depth},
                        {"depth_chars", c.depth_chars}, {"score", c.score}};
      for (const PasskeyTrial& t : c.trials)
        cj["trials"].push_back({{"key", t.key}, {"prompt_tokens", t.prompt_tokens}, {"output", t.output},
                                {"decoded", t.decoded}, {"correct", t.correct}});
      j["cells"].push_back(cj);
    }
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("passkey retrieval, %s: %% of %d keys found (rows: context length label; columns: depth)\n\n",
              a.model.path.c_str(), cfg.trials);
  std::printf("%8s", "length");
  for (double d : cfg.depths) std::printf(" %5.0f%%", 100 * d);
  std::printf("   mean\n");
  double total = 0;
  for (size_t l = 0; l < nL; ++l) {
    std::printf("%8lld", (long long)cfg.lengths[l]);
    double sum = 0;
    for (size_t d = 0; d < nD; ++d) std::printf(" %6.0f", grid[d][l]), sum += grid[d][l];
    std::printf(" %6.1f\n", sum / double(nD));
    total += sum;
  }
  std::printf("\noverall %.1f%%\n", total / double(nL * nD));
  if (!a.out_png.empty()) std::printf("heatmap: %s (columns: lengths, shortest left; rows: depths, 0 at top)\n", a.out_png.c_str());
}

// ------------------------------------------------------------------------------------------------- loss

struct LossArgs {
  ModelArgs model;
  std::vector<std::string> models;
  std::string data, vocab, buckets, out_png, text_field = "text";
  int64_t ctx = 0, skip = 2048, max_docs = 100;  // ctx 0: not given (32768, or the last bucket)
  bool json = false;
};

// Mean of position_loss over ~`bins` equal position ranges, weighted by documents, for the plot.
Series binned_curve(const LongLossResult& r, int bins) {
  Series s;
  const int64_t P = int64_t(r.position_loss.size());
  const int64_t width = std::max<int64_t>(1, (P + bins - 1) / bins);
  for (int64_t a = 0; a < P; a += width) {
    double sum = 0, w = 0;
    for (int64_t p = a; p < std::min(P, a + width); ++p)
      if (r.position_docs[size_t(p)] > 0) sum += r.position_loss[size_t(p)] * double(r.position_docs[size_t(p)]), w += double(r.position_docs[size_t(p)]);
    s.x.push_back(double(a + std::min(P, a + width)) / 2.0 + 0.5);  // the bin's middle position, 1-based
    s.y.push_back(w > 0 ? sum / w : NAN);
  }
  return s;
}

void run_loss_cmd(const LossArgs& a) {
  LongLossConfig cfg;
  if (a.ctx < 0) throw Error("--ctx must be positive");
  cfg.lengths = a.buckets.empty() ? long_loss_default_lengths(a.ctx > 0 ? a.ctx : 32768) : parse_lengths("--buckets", a.buckets);
  cfg.skip = a.skip;
  cfg.max_docs = a.max_docs;
  validate_long_loss_config(cfg);
  if (a.ctx > 0 && cfg.lengths.back() != a.ctx)
    throw Error("--buckets: the last bucket (" + std::to_string(cfg.lengths.back()) + ") differs from --ctx " +
                std::to_string(a.ctx) + "; give one of them or make them agree");
  const bool text = a.data.ends_with(".txt") || a.data.ends_with(".jsonl");
  std::unique_ptr<Tokenizer> tok;
  if (text) tok = std::make_unique<Tokenizer>(Tokenizer::load(vocab_or_default(a.vocab)));
  const auto docs = load_documents(a.data, tok.get(), a.text_field);
  std::vector<LongLossResult> results;
  for (const std::string& path : a.models) {
    auto be = make_backend(a.model.device, a.model.int8);
    LoadedModel m = load_model(path, a.model.options, *be);
    const bool tty = isatty(2);
    results.push_back(run_long_loss(*m.model, docs, cfg, [&](int64_t d, int64_t n) {
      if (tty) std::fprintf(stderr, "\r%s: document %lld (%lld positions)   ", path.c_str(), (long long)d + 1, (long long)n);
    }));
    if (tty) std::fprintf(stderr, "\n");
  }
  if (!a.out_png.empty()) {
    std::vector<Series> curves;
    for (const LongLossResult& r : results) curves.push_back(binned_curve(r, 256));
    LinePlotOptions o;
    o.x_lo = 0, o.x_hi = double(cfg.lengths.back());
    o.tick_labels = true;
    o.title = "loss by token position, " + short_path(a.data);
    o.y_label = "loss (nats/token)";
    o.x_label = "token position";
    for (const std::string& m : a.models) o.series_names.push_back(short_path(m));
    write_png(a.out_png, line_plot(curves, o));
  }
  if (a.json) {
    nlohmann::json j{{"data", a.data}, {"skip", cfg.skip}, {"max_docs", cfg.max_docs}};
    for (size_t i = 0; i < results.size(); ++i) {
      nlohmann::json mj{{"model", a.models[i]}, {"docs_read", results[i].docs_read}};
      auto num = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); };
      for (const LongLossBucket& b : results[i].buckets)
        mj["buckets"].push_back({{"lo", b.lo}, {"hi", b.hi}, {"docs", b.docs}, {"mean_loss", num(b.mean_loss)},
                                 {"bucket_loss", num(b.bucket_loss)}});
      nlohmann::json pl = nlohmann::json::array();
      for (double x : results[i].position_loss) pl.push_back(num(x));
      mj["position_loss"] = pl;
      mj["position_docs"] = results[i].position_docs;
      j["models"].push_back(mj);
    }
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("long-context loss (nats/token) on %s, first %lld tokens of each document skipped, up to %lld documents per S\n",
              a.data.c_str(), (long long)cfg.skip, (long long)cfg.max_docs);
  for (size_t i = 0; i < results.size(); ++i) {
    std::printf("\nmodel %s (series %zu in the plot)\n%10s %6s %13s %16s\n", a.models[i].c_str(), i + 1, "S", "docs",
                "mean_loss(S)", "loss in (lo, S]");
    for (const LongLossBucket& b : results[i].buckets)
      std::printf("%10lld %6lld %13.4f %16.4f\n", (long long)b.hi, (long long)b.docs, b.mean_loss, b.bucket_loss);
  }
  if (!a.out_png.empty())
    std::printf("\nplot: %s (x: position 0..%lld left to right; y: loss, data range padded 5%%; one curve per model in "
                "--model order: blue, red, green, orange, purple, ..., named in the legend)\n",
                a.out_png.c_str(), (long long)cfg.lengths.back());
}

// ------------------------------------------------------------------------------------------------ tasks

struct TasksArgs {
  ModelArgs model;
  std::vector<std::string> tasks;
  std::string vocab;
  bool json = false;
};

void run_tasks_cmd(const TasksArgs& a) {
  Tokenizer tok = Tokenizer::load(vocab_or_default(a.vocab));
  for (const std::string& t : a.tasks) load_task_file(t);  // fail on a bad file before loading the model
  auto be = make_backend(a.model.device, a.model.int8);
  LoadedModel m = load_model(a.model.path, a.model.options, *be);
  std::vector<TaskResult> results;
  for (const std::string& t : a.tasks) results.push_back(run_task_file(*m.model, tok, t));
  if (a.json) {
    nlohmann::json j{{"model", a.model.path}};
    for (const TaskResult& r : results) {
      nlohmann::json tj{{"task", r.path}, {"n", r.n}, {"acc", r.acc}, {"acc_norm", r.acc_norm}};
      for (const ExampleResult& e : r.examples) {
        nlohmann::json ej{{"pred", e.pred}, {"pred_norm", e.pred_norm}, {"acc", e.acc}, {"acc_norm", e.acc_norm}};
        for (const ChoiceScore& s : e.scores) {
          ej["loglikelihood"].push_back(s.loglikelihood);
          ej["is_greedy"].push_back(s.is_greedy);
        }
        tj["examples"].push_back(ej);
      }
      j["tasks"].push_back(tj);
    }
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("multiple-choice log-likelihood, %s\n\n%-40s %6s %8s %9s\n", a.model.path.c_str(), "task", "n", "acc", "acc_norm");
  for (const TaskResult& r : results)
    std::printf("%-40s %6lld %7.2f%% %8.2f%%\n", r.path.c_str(), (long long)r.n, 100 * r.acc, 100 * r.acc_norm);
}

}  // namespace
}  // namespace rwkvx

void register_eval_commands(CLI::App& app) {
  using namespace rwkvx;
  CLI::App* eval = app.add_subcommand("eval", "evaluations of the paper: passkey retrieval, long-context loss, multiple-choice tasks");
  eval->require_subcommand(1);

  static PasskeyArgs pk;
  CLI::App* p = eval->add_subcommand("passkey", "passkey retrieval by context length and depth (system.md §5.1)");
  add_model_args(p, pk.model);
  add_device_arg(p, pk.model);
  p->add_option("--vocab", pk.vocab, "World vocabulary file (default: the bundled one)");
  p->add_option("--lengths", pk.lengths, "context-length labels L, comma-separated (2K = 2000; default 2K,4K,...,32K)");
  p->add_option("--depths", pk.depths, "key depths as fractions of the filler (default 0,0.1,...,0.9)");
  p->add_option("--trials", pk.trials, "keys per cell (numpy seeds seed .. seed + trials - 1)")->default_val(5)->check(CLI::Range(1, 100000));
  p->add_option("--seed", pk.seed, "seed of the first key")->default_val(0);
  p->add_option("--out-png", pk.out_png,
                "write the heatmap here (columns: lengths; rows: depths; red 0% .. green 100%; labelled, each cell's score in it)");
  p->add_flag("--json", pk.json, "print JSON (every trial) instead of the table");
  p->add_flag("--verbose", pk.verbose, "print every trial's answer to stderr");
  p->callback([] { run_passkey_cmd(pk); });

  static LossArgs ls;
  CLI::App* l = eval->add_subcommand("loss", "loss by token position over long documents (system.md §5.2)");
  add_model_args(l, ls.model);
  l->remove_option(l->get_option("--model"));
  l->add_option("--model,-m", ls.models, "checkpoint; repeat to compare models on one plot")->required();
  add_device_arg(l, ls.model);
  l->add_option("--data", ls.data, "documents: FILE.txt (one document), FILE.jsonl ({\"text\": ...} per line) or a binidx prefix")->required();
  l->add_option("--vocab", ls.vocab, "World vocabulary file for text data (default: the bundled one)");
  l->add_option("--text-field", ls.text_field, "jsonl field holding the text")->default_val("text");
  l->add_option("--ctx", ls.ctx, "longest window S, the official seq_length (default 32768, or the last of --buckets)");
  l->add_option("--buckets", ls.buckets, "window lengths S, increasing (default 2048, 4096, ... below --ctx, then --ctx)");
  l->add_option("--skip", ls.skip, "leading tokens of each document never scored")->default_val(2048);
  l->add_option("--max-docs", ls.max_docs, "documents per S")->default_val(100);
  l->add_option("--out-png", ls.out_png, "write the loss-by-position plot here (one curve per model, with axes and a legend)");
  l->add_flag("--json", ls.json, "print JSON (buckets and the per-position curve) instead of the table");
  l->callback([] { run_loss_cmd(ls); });

  static TasksArgs tk;
  CLI::App* t = eval->add_subcommand("tasks", "multiple-choice tasks scored by log-likelihood: acc and acc_norm (system.md §5.3)");
  add_model_args(t, tk.model);
  add_device_arg(t, tk.model);
  t->add_option("--tasks", tk.tasks, "task files (jsonl, see docs/eval.md)")->required();
  t->add_option("--vocab", tk.vocab, "World vocabulary file (default: the bundled one)");
  t->add_flag("--json", tk.json, "print JSON (every example's log-likelihoods) instead of the table");
  t->callback([] { run_tasks_cmd(tk); });
}
