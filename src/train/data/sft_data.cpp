// SFT conversations → ids and labels, and the SFT sample order (spec system.md §4.9).
#include "train/data/sft_data.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/error.h"
#include "train/data/sampler.h"
#include "train/data/splitmix.h"

namespace rwkvx {
namespace {

using json = nlohmann::json;

bool is_space(char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f'; }

std::string lower(std::string s) {
  for (char& ch : s) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

std::string get_string(const json& o, const char* key, const std::string& where) {
  auto it = o.find(key);
  if (it == o.end()) throw Error(where + ": no \"" + key + "\" field");
  if (!it->is_string()) throw Error(where + ": field \"" + key + "\" is a " + it->type_name() + ", expected a string");
  return it->get<std::string>();
}

}  // namespace

std::string sft_clean_value(const std::string& value) {
  size_t b = 0, e = value.size();
  while (b < e && is_space(value[b])) ++b;
  while (e > b && is_space(value[e - 1])) --e;
  std::string out;
  for (size_t i = b; i < e;) {
    if (value[i] != '\n') {
      out += value[i++];
      continue;
    }
    // A '\n' followed by (whitespace* '\n')+: keep one '\n' and skip to just after the last '\n' of the run.
    size_t last_nl = i;
    for (size_t j = i + 1; j < e && is_space(value[j]); ++j)
      if (value[j] == '\n') last_nl = j;
    out += '\n';
    i = last_nl + 1;
  }
  return out;
}

SftSample sft_encode(const Tokenizer& tok, const std::string& json_line, const std::string& where) {
  json j;
  try {
    j = json::parse(json_line);
  } catch (const json::parse_error& e) {
    throw Error(where + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(where + ": expected a JSON object, got " + std::string(j.type_name()));
  struct Turn {
    bool user;
    std::string value;
  };
  std::vector<Turn> turns;
  if (j.contains("conversations")) {
    const json& conv = j["conversations"];
    if (!conv.is_array() || conv.empty()) throw Error(where + ": \"conversations\" must be a non-empty array");
    for (size_t i = 0; i < conv.size(); ++i) {
      const std::string w = where + ": conversations[" + std::to_string(i) + "]";
      if (!conv[i].is_object()) throw Error(w + ": expected an object with \"from\" and \"value\"");
      const std::string from = lower(get_string(conv[i], "from", w));
      if (from != "user" && from != "assistant")
        throw Error(w + ": \"from\" is \"" + from + "\", expected \"user\" or \"assistant\"");
      turns.push_back({from == "user", get_string(conv[i], "value", w)});
    }
    if (j.contains("system")) {
      if (!j["system"].is_string()) throw Error(where + ": field \"system\" must be a string");
      const std::string sys = j["system"].get<std::string>();
      if (!sft_clean_value(sys).empty() && turns[0].user) turns[0].value = sys + "\n" + turns[0].value;
    }
  } else if (j.contains("prompt") || j.contains("response")) {
    turns.push_back({true, get_string(j, "prompt", where)});
    turns.push_back({false, get_string(j, "response", where)});
  } else {
    throw Error(where + ": expected \"conversations\" (official SFT form) or \"prompt\" and \"response\"");
  }
  SftSample s;
  for (const Turn& t : turns) {
    const std::string v = sft_clean_value(t.value);
    const std::string speaker = t.user ? "User:" : "Assistant:";
    const std::vector<int32_t> ids = tok.encode(v.empty() ? speaker : speaker + " " + v + "\n\n");
    for (size_t i = 0; i < ids.size(); ++i) {
      s.ids.push_back(ids[i]);
      // The first 3 tokens of an assistant turn are "Ass", "istant", ":" (5585, 41693, 59).
      s.labels.push_back(t.user || i < 3 ? -100 : ids[i]);
    }
  }
  return s;
}

std::vector<SftSample> load_sft_jsonl(const Tokenizer& tok, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot read the SFT data file");
  std::vector<SftSample> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    out.push_back(sft_encode(tok, line, path + ":" + std::to_string(n)));
  }
  if (out.empty()) throw Error(path + ": no samples (the file has no non-blank lines)");
  return out;
}

void sft_window(const SftSample& s, int64_t ctx_len, std::vector<int32_t>& x, std::vector<int32_t>& targets) {
  const size_t T = size_t(ctx_len);
  x.assign(T, 0);
  targets.assign(T, -100);
  const size_t n = std::min(T, s.ids.size());
  for (size_t t = 0; t < n; ++t) x[t] = s.ids[t];
  for (size_t t = 0; t + 1 < n; ++t) targets[t] = s.labels[t + 1];
}

uint64_t sft_prime(uint64_t n) {
  for (uint64_t p = n; p-- > 2;)
    if (p % 3 == 2 && is_prime(p)) return p;
  return 0;
}

uint64_t sft_sample_index(uint64_t step, uint64_t n, uint64_t p, uint64_t seed) {
  if (p == 0) return step % n;  // fewer than 3 samples: no prime below n, plain cycling
  using u128 = unsigned __int128;
  const u128 s = step % p;
  const uint64_t k = uint64_t(s * s % p * s % p);
  if (step < p) return k;
  // Permutation number step / p of 0..n−1 (Fisher–Yates).
  std::vector<uint64_t> perm(n);
  std::iota(perm.begin(), perm.end(), uint64_t(0));
  SplitMix64 rng(seed * 1000003ull + step / p);
  for (uint64_t i = n - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(i + 1)]);
  return perm[k];
}

}  // namespace rwkvx
