// The tools behind the default model (issue 8): chunk size / top-k stored in safetensors metadata and
// read as load defaults, the official RWKV-7 training init, synthetic passkey documents, window-aligned
// packing in `rwkvx data`.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "eval/passkey.h"
#include "model/config.h"
#include "model/formats/safetensors_writer.h"
#include "model/formats/tensor_store.h"
#include "model/random_init.h"
#include "support/run_cli.h"
#include "support/test_util.h"
#include "train/data/binidx.h"
#include "train/data/passkey_data.h"

namespace rwkvx {
namespace {

RandomModelSpec tiny_x() {
  RandomModelSpec s;
  s.n_vocab = 300, s.n_embd = 64, s.n_rwkv = 2, s.n_sparse = 2, s.dtype = DType::f32;
  return s;
}

TEST(CheckpointMetadata, RoundTripsAndSetsTheSparseDefaults) {
  test::TempDir dir;
  const std::vector<TensorData> t = make_random_model(tiny_x());
  const std::string plain = dir.file("plain.safetensors"), meta = dir.file("meta.safetensors");
  save_safetensors(plain, t);
  save_safetensors(meta, t, sparse_metadata(64, 5, 2));
  TensorStore p = load_checkpoint(plain), m = load_checkpoint(meta);
  EXPECT_TRUE(p.metadata.empty());
  ASSERT_EQ(m.metadata.size(), 2u);
  EXPECT_EQ(m.metadata.at(kMetaChunkSize), "64");
  EXPECT_EQ(m.metadata.at(kMetaTopK), "5");

  // No option: the checkpoint's values, else the official defaults.
  ModelConfig c = infer_config(m, ModelOptions{});
  EXPECT_EQ(c.sparse.chunk, 64);
  EXPECT_EQ(c.sparse.top_k, 5);
  EXPECT_EQ(c.chunk_source, "checkpoint");
  ModelConfig d = infer_config(p, ModelOptions{});
  EXPECT_EQ(d.sparse.chunk, 2048);
  EXPECT_EQ(d.sparse.top_k, 3);
  EXPECT_EQ(d.chunk_source, "default");
  // An option wins over the metadata, each value on its own.
  ModelOptions o;
  o.chunk = 16;
  ModelConfig e = infer_config(m, o);
  EXPECT_EQ(e.sparse.chunk, 16);
  EXPECT_EQ(e.sparse.top_k, 5);
  EXPECT_EQ(e.chunk_source, "option");
  EXPECT_EQ(e.top_k_source, "checkpoint");
  // RWKV-7 models get no metadata.
  EXPECT_TRUE(sparse_metadata(64, 3, 0).empty());
}

TEST(CheckpointMetadata, BadValuesAreErrorsNamingTheKey) {
  test::TempDir dir;
  const std::vector<TensorData> t = make_random_model(tiny_x());
  for (const char* bad : {"0", "-4", "12x", "", "99999999999"}) {
    const std::string f = dir.file("bad.safetensors");
    save_safetensors(f, t, {{kMetaChunkSize, bad}});
    TensorStore s = load_checkpoint(f);
    try {
      infer_config(s, ModelOptions{});
      ADD_FAILURE() << "no error for '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("rwkvx.chunk_size"), std::string::npos) << e.what();
    }
    // An explicit option does not read it.
    ModelOptions o;
    o.chunk = 8;
    EXPECT_NO_THROW(infer_config(s, o));
  }
  // Non-string metadata values (not allowed by the format) are ignored, not fatal.
  std::vector<uint8_t> bytes = serialize_safetensors(t, {{kMetaTopK, "4"}});
  const uint64_t n = bytes[0] | uint64_t(bytes[1]) << 8 | uint64_t(bytes[2]) << 16;
  std::string header(bytes.begin() + 8, bytes.begin() + 8 + long(n));
  const size_t at = header.find("\"4\"");
  ASSERT_NE(at, std::string::npos);
  header.replace(at, 3, "[4]");
  std::string file(bytes.begin(), bytes.begin() + 8);
  const uint64_t n2 = header.size();
  for (int i = 0; i < 8; ++i) file[size_t(i)] = char(n2 >> (8 * i));
  file += header + std::string(bytes.begin() + 8 + long(n), bytes.end());
  TensorStore s = load_checkpoint(dir.write("odd.safetensors", file));
  EXPECT_TRUE(s.metadata.empty());
  EXPECT_EQ(infer_config(s, ModelOptions{}).sparse.top_k, 3);
}

TEST(CheckpointMetadata, ExpandAndInfoThroughTheCli) {
  test::TempDir dir;
  RandomModelSpec r7;
  r7.n_vocab = 300, r7.n_embd = 64, r7.n_rwkv = 2;
  const std::string src = dir.file("r7.safetensors");
  save_safetensors(src, make_random_model(r7));
  const std::string x = dir.file("x.safetensors"), xp = dir.file("x.pth");
  test::CliResult r = test::run_rwkvx(dir, {"expand", "--model", src, "--out", x, "--sparse-layers", "1",
                                            "--chunk-size", "32", "--top-k", "2"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("chunk 32 and top-k 2 stored"), std::string::npos) << r.stdout_text;
  r = test::run_rwkvx(dir, {"info", "--model", x});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("chunk 32 (checkpoint), top-k 2 (checkpoint)"), std::string::npos) << r.stdout_text;
  r = test::run_rwkvx(dir, {"info", "--model", x, "--top-k", "4"});
  EXPECT_NE(r.stdout_text.find("chunk 32 (checkpoint), top-k 4 (option)"), std::string::npos) << r.stdout_text;
  // .pth output: as before (no metadata, official defaults); asking to store values there is an error.
  r = test::run_rwkvx(dir, {"expand", "--model", src, "--out", xp, "--sparse-layers", "1"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  r = test::run_rwkvx(dir, {"info", "--model", xp});
  EXPECT_NE(r.stdout_text.find("chunk 2048 (default), top-k 3 (default)"), std::string::npos) << r.stdout_text;
  r = test::run_rwkvx(dir, {"expand", "--model", src, "--out", dir.file("y.pth"), "--chunk-size", "32"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.stderr_text.find("safetensors"), std::string::npos) << r.stderr_text;
  r = test::run_rwkvx(dir, {"info", "--model", x, "--chunk-size", "0"});
  EXPECT_NE(r.status, 0);
}

TEST(CheckpointMetadata, TrainerWritesAndKeepsIt) {
  test::TempDir dir;
  RandomModelSpec s = tiny_x();
  const std::string model = dir.file("x.safetensors");
  save_safetensors(model, make_random_model(s), sparse_metadata(8, 2, s.n_sparse));
  // A small binidx of ids below the vocab.
  {
    BinIdxWriter w(dir.file("d"), BinIdxDType::u16);
    std::vector<int32_t> ids;
    for (int i = 0; i < 4000; ++i) ids.push_back((i * 37 + 11) % 299 + 1);
    w.add_document(ids);
    w.finish();
  }
  const std::string cfg = dir.write("c.json", R"({"stage": "stage2", "model": "x.safetensors", "data": "d",
      "out_dir": "out", "ctx_len": 32, "micro_bsz": 2, "steps": 2, "tokens": 0, "pad_multiple": 0,
      "save_formats": ["safetensors", "pth"], "lr_init": 1e-3, "lr_final": 1e-3})");
  test::CliResult r = test::run_rwkvx(dir, {"train", cfg});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  TensorStore out = load_checkpoint(dir.file("out/rwkv-final.safetensors"));
  EXPECT_EQ(out.metadata.at(kMetaChunkSize), "8");
  EXPECT_EQ(out.metadata.at(kMetaTopK), "2");
  TensorStore st = load_checkpoint(dir.file("out/state-00000002/weights.safetensors"));
  EXPECT_EQ(st.metadata.at(kMetaChunkSize), "8");
  EXPECT_TRUE(load_checkpoint(dir.file("out/rwkv-final.pth")).metadata.empty());
}

TEST(TrainInit, OfficialRwkv7Init) {
  RandomModelSpec s;
  s.n_vocab = 1000, s.n_embd = 128, s.n_rwkv = 3, s.dtype = DType::f32, s.train_init = true;
  rwkv7_lora_dims(128, s);
  const std::vector<TensorData> t = make_random_model(s);
  EXPECT_EQ(make_random_model(s)[5].bytes, t[5].bytes);  // deterministic
  auto values = [&](const std::string& name) {
    for (const TensorData& d : t)
      if (d.name == name) {
        std::vector<float> v(d.bytes.size() / 4);
        std::memcpy(v.data(), d.bytes.data(), d.bytes.size());
        return v;
      }
    ADD_FAILURE() << "no " << name;
    return std::vector<float>{};
  };
  for (const char* zero : {"blocks.1.att.output.weight", "blocks.1.ffn.value.weight", "blocks.0.att.w1",
                           "blocks.2.att.g1", "blocks.0.ln1.bias"})
    for (float x : values(zero)) ASSERT_EQ(x, 0.0f) << zero;
  for (float x : values("blocks.0.att.k_a")) ASSERT_FLOAT_EQ(x, 1.02f);
  for (float x : values("emb.weight")) ASSERT_LE(std::abs(x), 1e-4f);
  // Head [1000, 128]: orthonormal columns times 0.5 · sqrt(1000 / 128).
  const std::vector<float> h = values("head.weight");
  const double gain = 0.5 * std::sqrt(1000.0 / 128.0);
  for (int a : {0, 7, 127})
    for (int b : {0, 7, 127}) {
      double dot = 0;
      for (int r = 0; r < 1000; ++r) dot += double(h[size_t(r * 128 + a)]) * h[size_t(r * 128 + b)];
      EXPECT_NEAR(dot / (gain * gain), a == b ? 1.0 : 0.0, 1e-5) << a << "," << b;
    }
  // Token-shift ramp of layer 0: x_k[c] = 1 − (c / C)^0.7.
  const std::vector<float> xk = values("blocks.0.att.x_k");
  EXPECT_FLOAT_EQ(xk[0], 1.0f);
  EXPECT_NEAR(xk[64], 1.0 - std::pow(0.5, 0.7), 1e-6);
  // Loads as a model.
  test::TempDir dir;
  save_safetensors(dir.file("m.safetensors"), t);
  EXPECT_NO_THROW(infer_config(load_checkpoint(dir.file("m.safetensors")), ModelOptions{}));
  s.n_sparse = 1;
  EXPECT_THROW(make_random_model(s), Error);
}

TEST(PasskeyData, DeterministicDocumentsOfThreeKinds) {
  PasskeyDataOptions o;
  o.docs = 300;
  o.seed = 5;
  o.min_chars = 50, o.max_chars = 900;
  std::string hay;
  for (int i = 0; i < 200; ++i) hay += "Line " + std::to_string(i) + " of the haystack, with \xc3\xa9 and \xe2\x94\x82.\n";
  o.haystack = {hay};
  validate_passkey_data(o);
  int official = 0, haystack = 0, sentences = 0;
  for (uint64_t i = 0; i < o.docs; ++i) {
    const PasskeyDocument d = passkey_document(o, i);
    const PasskeyDocument again = passkey_document(o, i);
    ASSERT_EQ(d.text, again.text);
    const std::string k = std::to_string(d.key);
    ASSERT_GE(k.size(), size_t(o.min_digits));
    ASSERT_LE(k.size(), size_t(o.max_digits));
    // Every document ends with the answer, and holds the key earlier too.
    ASSERT_TRUE(d.text.ends_with(" " + k + ".")) << d.text;
    ASSERT_NE(d.text.find(k), d.text.size() - k.size() - 1) << d.text;
    ASSERT_NO_THROW((void)nlohmann::json(d.text).dump()) << "invalid UTF-8 in document " << i;
    if (d.kind == "official") {
      ++official;
      EXPECT_EQ(d.text, passkey_prompt(d.filler_chars, d.depth_chars, int(d.key)) + " " + k + ".");
    } else if (d.kind == "haystack") {
      ++haystack;
    } else {
      ASSERT_EQ(d.kind, "sentences");
      ++sentences;
    }
  }
  EXPECT_GT(official, 80);
  EXPECT_GT(haystack, 50);
  EXPECT_GT(sentences, 50);
  const std::string seed5 = passkey_document(o, 0).text;
  o.seed = 6;
  EXPECT_NE(passkey_document(o, 0).text, seed5);
  o.haystack.clear();
  EXPECT_THROW(validate_passkey_data(o), Error);
  o.haystack_fraction = 0;
  EXPECT_NO_THROW(validate_passkey_data(o));
  o.max_digits = 10;
  EXPECT_THROW(validate_passkey_data(o), Error);
}

TEST(PasskeyData, EdgeDepthsPutTheKeyAtAnEndOfTheFiller) {
  PasskeyDataOptions o;
  o.docs = 400;
  o.seed = 3;
  o.min_chars = 100, o.max_chars = 900;
  o.haystack_fraction = 0;
  int first = 0, last = 0, inside = 0;
  o.edge_depth_fraction = 0.5;
  validate_passkey_data(o);
  for (uint64_t i = 0; i < o.docs; ++i) {
    const PasskeyDocument d = passkey_document(o, i);
    if (d.depth_chars == 0) ++first;
    else if (d.depth_chars == d.filler_chars) ++last;
    else ++inside;
    if (d.kind == "official") {
      EXPECT_EQ(d.text, passkey_prompt(d.filler_chars, d.depth_chars, int(d.key)) + " " + std::to_string(d.key) + ".");
    }
  }
  // About a quarter at each end (binomial, 400 draws: far inside these bounds), the rest inside.
  EXPECT_GT(first, 60);
  EXPECT_GT(last, 60);
  EXPECT_GT(inside, 140);
  // Off: hardly any document at an end (a uniform depth hits one with chance 2 / (filler + 1)).
  o.edge_depth_fraction = 0;
  int ends = 0;
  for (uint64_t i = 0; i < o.docs; ++i) {
    const PasskeyDocument d = passkey_document(o, i);
    ends += d.depth_chars == 0 || d.depth_chars == d.filler_chars;
  }
  EXPECT_LT(ends, 8);
  for (double bad : {-0.1, 1.5, std::nan("")}) {
    o.edge_depth_fraction = bad;
    EXPECT_THROW(validate_passkey_data(o), Error) << bad;
  }
}

TEST(PasskeyData, CliWritesJsonlThatDataConverts) {
  test::TempDir dir;
  const std::string vocab = test::shared_dir() + "/data/rwkv_vocab_v20230424.txt";
  const std::string out = dir.file("pk.jsonl");
  test::CliResult r = test::run_rwkvx(dir, {"passkey-data", "--out", out, "--docs", "40", "--seed", "3",
                                            "--haystack-fraction", "0", "--max-chars", "600"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("40 documents"), std::string::npos) << r.stdout_text;
  const std::string first = test::read_text(out);
  r = test::run_rwkvx(dir, {"passkey-data", "--out", out, "--docs", "40", "--seed", "3", "--haystack-fraction", "0",
                            "--max-chars", "600"});
  EXPECT_EQ(test::read_text(out), first);
  r = test::run_rwkvx(dir, {"passkey-data", "--out", dir.file("x.jsonl")});  // haystack share without a file
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.stderr_text.find("--haystack"), std::string::npos) << r.stderr_text;

  // Window-aligned packing: no document of at most 64 tokens crosses a multiple of 64.
  r = test::run_rwkvx(dir, {"data", "--input", out, "--out", dir.file("d"), "--vocab", vocab, "--align", "256"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("alignment padding"), std::string::npos) << r.stdout_text;
  BinIdxDataset d = BinIdxDataset::open(dir.file("d"));
  uint64_t pos = 0, crossing_short = 0;
  for (uint64_t k = 0; k < d.n_items(); ++k) {
    std::vector<int32_t> ids = d.item(k);
    size_t lead = 0;
    while (lead < ids.size() && ids[lead] == 0) ++lead;
    const uint64_t start = pos + lead, len = ids.size() - lead;
    if (len <= 256 && start / 256 != (start + len - 1) / 256) ++crossing_short;
    pos += ids.size();
  }
  EXPECT_EQ(crossing_short, 0u);
}

}  // namespace
}  // namespace rwkvx
