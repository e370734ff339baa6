// Config parsing for `rwkvx train` (docs/training.md lists every key). Presets follow spec system.md §4.8.
#include "train/train_config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace rwkvx::train {

const char* stage_name(TrainStage s) {
  switch (s) {
    case TrainStage::stage1: return "stage1";
    case TrainStage::stage2: return "stage2";
    case TrainStage::sft: return "sft";
  }
  return "?";
}

namespace {

using json = nlohmann::json;

// The official recipe of each stage (spec §4.8). Stage 1's context is the paper's 1024 (the released
// code uses 512); stage 2 is the LongCE run; SFT is rwkvx0b2_sft.sh.
void apply_preset(TrainConfig& c) {
  switch (c.stage) {
    case TrainStage::stage1:
      c.ctx_len = 1024, c.micro_bsz = 16, c.loss = LossKind::ce, c.recompute = false;
      c.lr_init = c.lr_final = 1e-5, c.warmup_steps = 10, c.eps = 1e-18, c.weight_decay = 1e-3;
      break;
    case TrainStage::stage2:
      c.ctx_len = 64000, c.micro_bsz = 16, c.loss = LossKind::longce, c.recompute = true;
      c.lr_init = c.lr_final = 1e-5, c.warmup_steps = 10, c.eps = 1e-18, c.weight_decay = 1e-3;
      break;
    case TrainStage::sft:
      c.ctx_len = 4096, c.micro_bsz = 32, c.loss = LossKind::ce, c.recompute = true;
      c.lr_init = 2e-5, c.lr_final = 1e-5, c.warmup_steps = 0, c.eps = 1e-8, c.weight_decay = 0;
      c.epoch_count = 2;
      break;
  }
}

struct Reader {
  const std::string& source;
  [[noreturn]] void fail(const std::string& key, const std::string& what, const json& v) const {
    throw Error(source + ": key '" + key + "': " + what + ", got " + v.dump());
  }
  std::string str(const std::string& key, const json& v) const {
    if (!v.is_string() || v.get<std::string>().empty()) fail(key, "expected a non-empty string", v);
    return v.get<std::string>();
  }
  int64_t integer(const std::string& key, const json& v, int64_t min) const {
    if (!v.is_number_integer()) fail(key, "expected an integer >= " + std::to_string(min), v);
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) fail(key, "too large", v);
    const int64_t x = v.get<int64_t>();
    if (x < min) fail(key, "expected an integer >= " + std::to_string(min), v);
    return x;
  }
  double number(const std::string& key, const json& v, double min, bool min_open) const {
    const std::string want = std::string("expected a number ") + (min_open ? "> " : ">= ") + json(min).dump();
    if (!v.is_number()) fail(key, want, v);
    const double x = v.get<double>();
    if (!std::isfinite(x) || x < min || (min_open && x == min)) fail(key, want, v);
    return x;
  }
  bool boolean(const std::string& key, const json& v) const {
    if (!v.is_boolean()) fail(key, "expected true or false", v);
    return v.get<bool>();
  }
  std::string choice(const std::string& key, const json& v, const std::vector<std::string>& options) const {
    std::string list;
    for (const std::string& o : options) list += (list.empty() ? "" : " | ") + ("\"" + o + "\"");
    if (v.is_string())
      for (const std::string& o : options)
        if (v.get<std::string>() == o) return o;
    fail(key, "expected one of " + list, v);
  }
};

std::string resolve(const std::string& base_dir, const std::string& p) {
  if (p.empty() || std::filesystem::path(p).is_absolute() || base_dir.empty()) return p;
  return (std::filesystem::path(base_dir) / p).lexically_normal().string();
}

}  // namespace

TrainConfig parse_train_config(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(source + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(source + ": expected a JSON object of settings, got " + std::string(j.type_name()));
  const Reader r{source};
  TrainConfig c;
  c.source = source;
  if (!j.contains("stage")) throw Error(source + ": missing key 'stage' (\"stage1\", \"stage2\" or \"sft\")");
  const std::string st = r.choice("stage", j["stage"], {"stage1", "stage2", "sft"});
  c.stage = st == "stage1" ? TrainStage::stage1 : st == "stage2" ? TrainStage::stage2 : TrainStage::sft;
  apply_preset(c);

  using Setter = std::function<void(const std::string&, const json&)>;
  const std::map<std::string, Setter> keys = {
      {"stage", [](const std::string&, const json&) {}},
      {"model", [&](const std::string& k, const json& v) { c.model = r.str(k, v); }},
      {"data", [&](const std::string& k, const json& v) { c.data = r.str(k, v); }},
      {"vocab", [&](const std::string& k, const json& v) { c.vocab = r.str(k, v); }},
      {"out_dir", [&](const std::string& k, const json& v) { c.out_dir = r.str(k, v); }},
      {"ctx_len", [&](const std::string& k, const json& v) { c.ctx_len = r.integer(k, v, 1); }},
      {"micro_bsz", [&](const std::string& k, const json& v) { c.micro_bsz = r.integer(k, v, 1); }},
      {"steps", [&](const std::string& k, const json& v) { c.steps = r.integer(k, v, 0); }},
      {"tokens", [&](const std::string& k, const json& v) { c.tokens = r.integer(k, v, -1); }},
      {"magic_prime", [&](const std::string& k, const json& v) { c.magic_prime = uint64_t(r.integer(k, v, 0)); }},
      {"epoch_steps", [&](const std::string& k, const json& v) { c.epoch_steps = r.integer(k, v, 1); }},
      {"epoch_count", [&](const std::string& k, const json& v) { c.epoch_count = r.integer(k, v, 0); }},
      {"epoch_begin", [&](const std::string& k, const json& v) { c.epoch_begin = r.integer(k, v, 0); }},
      {"loss",
       [&](const std::string& k, const json& v) {
         c.loss = r.choice(k, v, {"ce", "longce"}) == "ce" ? LossKind::ce : LossKind::longce;
       }},
      {"l2wrap", [&](const std::string& k, const json& v) { c.l2wrap = r.boolean(k, v); }},
      {"pad_multiple", [&](const std::string& k, const json& v) { c.pad_multiple = r.integer(k, v, 0); }},
      {"longce_truncated", [&](const std::string& k, const json& v) { c.longce_truncated = r.integer(k, v, 1); }},
      {"longce_window", [&](const std::string& k, const json& v) { c.longce_window = r.integer(k, v, 1); }},
      {"longce_cap", [&](const std::string& k, const json& v) { c.longce_cap = r.number(k, v, 0, true); }},
      {"lr_init", [&](const std::string& k, const json& v) { c.lr_init = r.number(k, v, 0, true); }},
      {"lr_final", [&](const std::string& k, const json& v) { c.lr_final = r.number(k, v, 0, false); }},
      {"warmup_steps", [&](const std::string& k, const json& v) { c.warmup_steps = r.integer(k, v, 0); }},
      {"weight_decay", [&](const std::string& k, const json& v) { c.weight_decay = r.number(k, v, 0, false); }},
      {"weight_decay_final",
       [&](const std::string& k, const json& v) { c.weight_decay_final = r.number(k, v, 0, false); }},
      {"beta1", [&](const std::string& k, const json& v) { c.beta1 = r.number(k, v, 0, false); }},
      {"beta2", [&](const std::string& k, const json& v) { c.beta2 = r.number(k, v, 0, false); }},
      {"eps", [&](const std::string& k, const json& v) { c.eps = r.number(k, v, 0, true); }},
      {"grad_clip", [&](const std::string& k, const json& v) { c.grad_clip = r.number(k, v, 0, false); }},
      {"param_groups",
       [&](const std::string& k, const json& v) {
         c.groups = r.choice(k, v, {"rwkvx", "blinkdl"}) == "rwkvx" ? GroupRule::rwkvx : GroupRule::blinkdl;
       }},
      {"recompute", [&](const std::string& k, const json& v) { c.recompute = r.boolean(k, v); }},
      {"device", [&](const std::string& k, const json& v) { c.device = r.choice(k, v, {"cpu", "cuda"}); }},
      {"bf16", [&](const std::string& k, const json& v) { c.bf16 = r.boolean(k, v); }},
      {"seed", [&](const std::string& k, const json& v) { c.seed = uint64_t(r.integer(k, v, 0)); }},
      {"threads", [&](const std::string& k, const json& v) { c.threads = r.integer(k, v, 1); }},
      {"parallel_sequences",
       [&](const std::string& k, const json& v) { c.parallel_sequences = r.integer(k, v, 1); }},
      {"chunk_size", [&](const std::string& k, const json& v) { c.chunk_size = int(r.integer(k, v, 1)); }},
      {"top_k", [&](const std::string& k, const json& v) { c.top_k = int(r.integer(k, v, 1)); }},
      {"save_every", [&](const std::string& k, const json& v) { c.save_every = r.integer(k, v, 0); }},
      {"save_formats",
       [&](const std::string& k, const json& v) {
         if (!v.is_array() || v.empty()) r.fail(k, "expected a non-empty list of \"pth\" / \"safetensors\"", v);
         c.save_pth = c.save_safetensors = false;
         for (const json& f : v) {
           const bool pth = r.choice(k, f, {"pth", "safetensors"}) == "pth";
           (pth ? c.save_pth : c.save_safetensors) = true;
         }
       }},
      {"save_dtype",
       [&](const std::string& k, const json& v) {
         c.save_dtype = r.choice(k, v, {"bf16", "f32"}) == "bf16" ? DType::bf16 : DType::f32;
       }},
      {"keep_states", [&](const std::string& k, const json& v) { c.keep_states = r.integer(k, v, 0); }},
      {"log_every", [&](const std::string& k, const json& v) { c.log_every = r.integer(k, v, 1); }},
  };
  for (const auto& [k, v] : j.items()) {
    auto it = keys.find(k);
    if (it == keys.end()) {
      std::string known;
      for (const auto& kv : keys) known += (known.empty() ? "" : ", ") + kv.first;
      throw Error(source + ": unknown key '" + k + "' (known keys: " + known + ")");
    }
    it->second(k, v);
  }
  for (const char* req : {"model", "data", "out_dir"})
    if (!j.contains(req)) throw Error(source + ": missing key '" + std::string(req) + "'");

  if (c.beta1 >= 1) throw Error(source + ": key 'beta1': expected a number below 1, got " + json(c.beta1).dump());
  if (c.beta2 >= 1) throw Error(source + ": key 'beta2': expected a number below 1, got " + json(c.beta2).dump());
  if (c.parallel_sequences > c.threads)
    throw Error(source + ": key 'parallel_sequences': " + std::to_string(c.parallel_sequences) +
                " sequences at once need at least as many 'threads', got " + std::to_string(c.threads));
  if (c.stage == TrainStage::sft && c.loss == LossKind::longce)
    throw Error(source + ": key 'loss': stage \"sft\" trains on the responses with masked CE; \"longce\" is for "
                "pretraining stages");
  if (c.stage == TrainStage::sft)
    for (const char* k : {"tokens", "magic_prime"})
      if (j.contains(k))
        throw Error(source + ": key '" + k + "': applies to the pretraining stages (binidx data), not to \"sft\"");
  if (c.stage == TrainStage::sft && c.epoch_count == 0 && c.steps == 0)
    throw Error(source + ": key 'epoch_count': 0 with 'steps' 0 leaves an SFT run with no end; set one of them");

  const std::string base = std::filesystem::path(source).parent_path().string();
  c.model = resolve(base, c.model);
  c.data = resolve(base, c.data);
  c.vocab = resolve(base, c.vocab);
  c.out_dir = resolve(base, c.out_dir);
  return c;
}

TrainConfig load_train_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot read the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_train_config(ss.str(), path);
}

std::vector<std::pair<std::string, std::string>> trajectory_keys(const TrainConfig& c) {
  auto d = [](double x) { return json(x).dump(); };
  auto i = [](int64_t x) { return std::to_string(x); };
  return {
      {"stage", stage_name(c.stage)},
      {"data", c.data},
      {"vocab", c.vocab},
      {"ctx_len", i(c.ctx_len)},
      {"micro_bsz", i(c.micro_bsz)},
      {"tokens", i(c.tokens)},
      {"magic_prime", std::to_string(c.magic_prime)},
      {"epoch_steps", i(c.epoch_steps)},
      {"epoch_count", i(c.epoch_count)},
      {"epoch_begin", i(c.epoch_begin)},
      {"loss", c.loss == LossKind::ce ? "ce" : "longce"},
      {"l2wrap", c.l2wrap ? "true" : "false"},
      {"pad_multiple", i(c.pad_multiple)},
      {"longce_truncated", i(c.longce_truncated)},
      {"longce_window", i(c.longce_window)},
      {"longce_cap", d(c.longce_cap)},
      {"lr_init", d(c.lr_init)},
      {"lr_final", d(c.lr_final)},
      {"warmup_steps", i(c.warmup_steps)},
      {"weight_decay", d(c.weight_decay)},
      {"weight_decay_final", d(c.weight_decay_final)},
      {"beta1", d(c.beta1)},
      {"beta2", d(c.beta2)},
      {"eps", d(c.eps)},
      {"grad_clip", d(c.grad_clip)},
      {"param_groups", c.groups == GroupRule::rwkvx ? "rwkvx" : "blinkdl"},
      {"seed", std::to_string(c.seed)},
      {"chunk_size", i(c.chunk_size)},
      {"top_k", i(c.top_k)},
  };
}

}  // namespace rwkvx::train
