// jsonl / text → binidx (spec system.md §4.1, pretrain/make_data.py): documents in input order (or
// shuffled per epoch copy), each encoded and followed by the end-of-document token 0.
#include "train/data/make_data.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "train/data/splitmix.h"

namespace rwkvx {
namespace {

using DocSink = std::function<void(std::string_view text)>;

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string_view strip(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

std::string lower_ext(const std::string& path) {
  const size_t slash = path.find_last_of('/'), dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return "";
  std::string e = path.substr(dot + 1);
  for (char& c : e) c = char(std::tolower(static_cast<unsigned char>(c)));
  return e;
}

std::string input_format(const MakeDataOptions& opt, const std::string& path) {
  if (opt.format == "jsonl" || opt.format == "text") return opt.format;
  if (opt.format != "auto") throw Error("--format '" + opt.format + "': choose auto, jsonl or text");
  const std::string e = lower_ext(path);
  if (e == "jsonl" || e == "json" || e == "ndjson") return "jsonl";
  if (e == "txt" || e == "text" || e == "md") return "text";
  throw Error(path + ": cannot tell the format from the extension '" + e +
              "' (.jsonl or .txt expected); give --format jsonl or --format text");
}

std::ifstream open_input(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open: " + std::strerror(errno));
  return in;
}

// One JSON object per non-blank line; the document is its `field` string.
void read_jsonl(const std::string& path, const std::string& field, const DocSink& sink) {
  std::ifstream in = open_input(path);
  std::string line;
  uint64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    const std::string_view s = strip(line);
    if (s.empty()) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(s);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": invalid JSON: " + e.what());
    }
    if (!j.is_object()) throw Error(where + ": expected a JSON object, got " + std::string(j.type_name()));
    auto it = j.find(field);
    if (it == j.end()) throw Error(where + ": no \"" + field + "\" field (choose the field with --text-field)");
    if (!it->is_string())
      throw Error(where + ": field \"" + field + "\" is a " + std::string(it->type_name()) + ", expected a string");
    sink(it->get_ref<const std::string&>());
  }
  if (in.bad()) throw Error(path + ": read failed: " + std::strerror(errno));
}

void read_text(const std::string& path, TextSplit split, const DocSink& sink) {
  std::ifstream in = open_input(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path + ": read failed: " + std::strerror(errno));
  // Lines, without their "\n" (and a "\r" before it).
  std::vector<std::string_view> lines;
  for (size_t pos = 0; pos < text.size();) {
    size_t e = text.find('\n', pos);
    if (e == std::string::npos) e = text.size();
    std::string_view l(text.data() + pos, e - pos);
    if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
    lines.push_back(l);
    pos = e + 1;
  }
  // A UTF-8 sequence never contains a '\n' byte, so checking line by line finds the first bad line.
  if (!is_valid_utf8(text))
    for (size_t i = 0; i < lines.size(); ++i)
      if (!is_valid_utf8(lines[i])) throw Error(path + ":" + std::to_string(i + 1) + ": not valid UTF-8");
  switch (split) {
    case TextSplit::file:
      if (!text.empty()) sink(text);
      break;
    case TextSplit::line:
      for (std::string_view l : lines)
        if (!strip(l).empty()) sink(l);
      break;
    case TextSplit::blank: {
      std::string para;
      bool any = false;
      for (std::string_view l : lines) {
        if (strip(l).empty()) {
          if (any) sink(para);
          para.clear();
          any = false;
          continue;
        }
        if (any) para += '\n';
        para += l;
        any = true;
      }
      if (any) sink(para);
      break;
    }
  }
}

void read_inputs(const MakeDataOptions& opt, const DocSink& sink) {
  for (const std::string& path : opt.inputs) {
    if (input_format(opt, path) == "jsonl")
      read_jsonl(path, opt.text_field, sink);
    else
      read_text(path, opt.text_split, sink);
  }
}

}  // namespace

TextSplit parse_text_split(const std::string& name) {
  if (name == "file") return TextSplit::file;
  if (name == "line") return TextSplit::line;
  if (name == "blank") return TextSplit::blank;
  throw Error("--text-split '" + name + "': choose file, line or blank");
}

MakeDataStats make_binidx(const Tokenizer& tok, const MakeDataOptions& opt,
                          const std::function<void(const MakeDataStats&)>& progress) {
  if (opt.inputs.empty()) throw Error("no input files");
  if (opt.out_prefix.empty()) throw Error("no output prefix");
  if (opt.epochs < 1) throw Error("--epochs must be >= 1");
  if (opt.text_field.empty()) throw Error("--text-field must not be empty");
  // Check every input's format and readability before writing anything.
  for (const std::string& path : opt.inputs) {
    input_format(opt, path);
    open_input(path);
  }
  MakeDataStats st;
  st.dtype = binidx_dtype_for_vocab(int64_t(tok.vocab_size()) - 1);
  BinIdxWriter writer(opt.out_prefix, st.dtype);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids;
  auto add = [&](std::string_view text) {
    ids = tok.encode(text);
    ids.push_back(0);  // end of document
    if (opt.align > 0 && ids.size() <= opt.align) {
      const uint64_t room = opt.align - st.tokens % opt.align;
      if (ids.size() > room) {
        ids.insert(ids.begin(), size_t(room), 0);
        st.padding += room;
      }
    }
    writer.add_document(ids);
    st.documents++;
    st.tokens += ids.size();
    st.input_bytes += text.size();
    if (progress && st.documents % 1024 == 0) {
      st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      progress(st);
    }
  };
  if (!opt.shuffle) {
    for (uint64_t e = 0; e < opt.epochs; ++e) read_inputs(opt, add);
  } else {
    std::vector<std::string> docs;
    read_inputs(opt, [&](std::string_view t) { docs.emplace_back(t); });
    SplitMix64 rng(opt.seed);
    std::vector<size_t> order(docs.size());
    for (uint64_t e = 0; e < opt.epochs; ++e) {
      for (size_t i = 0; i < order.size(); ++i) order[i] = i;
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
      for (size_t i : order) add(docs[i]);
    }
  }
  writer.finish();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (progress) progress(st);
  return st;
}

}  // namespace rwkvx
