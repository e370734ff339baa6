// binidx (spec system.md §4.1) and pretraining sample selection (§4.2): the writer's bytes against a
// hand-built index, round trips, every header field corrupted in turn (each error names the file and the
// field), the official magic primes, and the sampled windows of a hand-made dataset.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"
#include "support/run_cli.h"
#include "train/data/binidx.h"
#include "train/data/sampler.h"

namespace rwkvx {
namespace {

std::string slurp(const std::string& path) { return test::read_text(path); }
void spit(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

template <typename T>
void put(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}

std::string write_docs(const test::TempDir& dir, const std::string& name, BinIdxDType dt,
                       const std::vector<std::vector<int32_t>>& docs) {
  const std::string prefix = dir.file(name);
  BinIdxWriter w(prefix, dt);
  for (const auto& d : docs) w.add_document(d);
  w.finish();
  return prefix;
}

TEST(BinIdx, WriterBytesMatchTheFormat) {
  test::TempDir dir;
  const std::string prefix = write_docs(dir, "d", BinIdxDType::u16, {{5, 6, 0}, {0}, {65535, 1, 2, 0}});
  // The index as spec §4.1 lays it out, built by hand.
  std::string idx("MMIDIDX\0\0", 9);
  put<uint64_t>(idx, 1);
  idx += char(8);
  put<uint64_t>(idx, 3);
  put<uint64_t>(idx, 4);
  for (int32_t s : {3, 1, 4}) put<int32_t>(idx, s);
  for (int64_t p : {0, 6, 8}) put<int64_t>(idx, p);
  for (int64_t d : {0, 1, 2, 3}) put<int64_t>(idx, d);
  EXPECT_EQ(slurp(prefix + ".idx"), idx);
  std::string bin;
  for (uint16_t t : {5, 6, 0, 0, 65535, 1, 2, 0}) put<uint16_t>(bin, t);
  EXPECT_EQ(slurp(prefix + ".bin"), bin);
}

TEST(BinIdx, RoundTripU16AndI32) {
  test::TempDir dir;
  const std::vector<std::vector<int32_t>> docs = {{1, 2, 3, 0}, {}, {0}, {40000, 65535, 7, 0}};
  for (BinIdxDType dt : {BinIdxDType::u16, BinIdxDType::i32}) {
    const std::string prefix = write_docs(dir, dt == BinIdxDType::u16 ? "u16" : "i32", dt, docs);
    BinIdxDataset d = BinIdxDataset::open(prefix);
    EXPECT_EQ(d.dtype_code(), uint8_t(dt));
    EXPECT_EQ(d.n_items(), docs.size());
    EXPECT_EQ(d.n_tokens(), 9u);
    EXPECT_EQ(d.doc_idx(), (std::vector<int64_t>{0, 1, 2, 3, 4}));
    for (size_t k = 0; k < docs.size(); ++k) EXPECT_EQ(d.item(k), docs[k]) << k;
    EXPECT_EQ(d.token(4), 0);
    EXPECT_EQ(d.token(5), 40000);
    std::vector<int32_t> w(3);
    d.read_tokens(2, 3, w.data());
    EXPECT_EQ(w, (std::vector<int32_t>{3, 0, 0}));
    EXPECT_THROW(d.read_tokens(7, 3, w.data()), Error);
    EXPECT_THROW(d.token(9), Error);
    EXPECT_THROW(d.item(4), Error);
    // A vocab bound turns out-of-range ids into errors naming the position.
    try {
      d.read_tokens(4, 3, w.data(), 300);
      FAIL();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("token 40000 at position 5"), std::string::npos) << e.what();
    }
  }
  // An i32 dataset holds ids past 16 bits; a u16 one refuses them.
  const std::string big = write_docs(dir, "big", BinIdxDType::i32, {{70000, 0}});
  EXPECT_EQ(BinIdxDataset::open(big).item(0), (std::vector<int32_t>{70000, 0}));
  BinIdxWriter w(dir.file("small"), BinIdxDType::u16);
  EXPECT_THROW(w.add_document(std::vector<int32_t>{70000}), Error);
  EXPECT_THROW(w.add_document(std::vector<int32_t>{-1}), Error);
  EXPECT_THROW(BinIdxWriter(dir.file("x"), BinIdxDType::i64), Error);
}

TEST(BinIdx, NothingAppearsUntilFinish) {
  test::TempDir dir;
  const std::string prefix = dir.file("partial");
  {
    BinIdxWriter w(prefix, BinIdxDType::u16);
    w.add_document(std::vector<int32_t>{1, 2, 0});
  }  // destroyed without finish(), as after an error
  EXPECT_FALSE(std::filesystem::exists(prefix + ".bin"));
  EXPECT_FALSE(std::filesystem::exists(prefix + ".idx"));
}

TEST(BinIdx, ReadsOtherIntegerDtypes) {
  test::TempDir dir;
  // int64 and uint8 files, as other Megatron tools may write them.
  for (uint8_t code : {uint8_t(5), uint8_t(1), uint8_t(3)}) {
    const std::string prefix = dir.file("c" + std::to_string(code));
    const size_t es = binidx_itemsize(code);
    std::string idx("MMIDIDX\0\0", 9);
    put<uint64_t>(idx, 1);
    idx += char(code);
    put<uint64_t>(idx, 1);
    put<uint64_t>(idx, 2);
    put<int32_t>(idx, 3);
    put<int64_t>(idx, 0);
    put<int64_t>(idx, 0);
    put<int64_t>(idx, 1);
    spit(prefix + ".idx", idx);
    std::string bin(3 * es, '\0');
    for (int i = 0; i < 3; ++i) bin[size_t(i) * es] = char(10 + i);
    spit(prefix + ".bin", bin);
    EXPECT_EQ(BinIdxDataset::open(prefix).item(0), (std::vector<int32_t>{10, 11, 12})) << int(code);
  }
}

// Corrupts one field of a valid pair and checks the error names the file and the field.
TEST(BinIdx, HeaderCorruptionGivesClearErrors) {
  test::TempDir dir;
  const std::string good = write_docs(dir, "good", BinIdxDType::u16, {{1, 2, 0}, {3, 0}});
  const std::string idx0 = slurp(good + ".idx"), bin0 = slurp(good + ".bin");
  struct Case {
    const char* what;
    std::function<void(std::string& idx, std::string& bin)> edit;
    std::string expect_file, expect_text;
  };
  auto set64 = [](std::string& s, size_t off, uint64_t v) { std::memcpy(s.data() + off, &v, 8); };
  const std::vector<Case> cases = {
      {"magic", [](std::string& i, std::string&) { i[0] = 'X'; }, ".idx", "field 'magic'"},
      {"version", [&](std::string& i, std::string&) { set64(i, 9, 2); }, ".idx", "field 'version': 2"},
      {"dtype unknown", [](std::string& i, std::string&) { i[17] = 9; }, ".idx", "field 'dtype': unknown code 9"},
      {"dtype float", [](std::string& i, std::string&) { i[17] = 6; }, ".idx", "cannot hold token ids"},
      {"short", [](std::string& i, std::string&) { i.resize(20); }, ".idx", "too short"},
      {"truncated", [](std::string& i, std::string&) { i.pop_back(); }, ".idx", "truncated or corrupt"},
      {"huge count", [&](std::string& i, std::string&) { set64(i, 18, uint64_t(1) << 62); }, ".idx", "field 'count'"},
      {"huge doc count", [&](std::string& i, std::string&) { set64(i, 26, uint64_t(1) << 62); }, ".idx",
       "field 'doc_count'"},
      {"negative size", [](std::string& i, std::string&) { i[34 + 3] = char(0x80); }, ".idx", "field 'sizes[0]'"},
      {"size past bin", [](std::string& i, std::string&) { i[34 + 4] = 50; }, ".idx", "field 'sizes[1]'"},
      {"pointer", [&](std::string& i, std::string&) { set64(i, 34 + 8 + 8, 4); }, ".idx", "field 'pointers[1]'"},
      {"doc_idx start", [&](std::string& i, std::string&) { set64(i, 34 + 24, 1); }, ".idx", "field 'doc_idx[0]'"},
      {"doc_idx end", [&](std::string& i, std::string&) { set64(i, 34 + 24 + 16, 1); }, ".idx", "field 'doc_idx[2]'"},
      {"doc_idx order", [&](std::string& i, std::string&) { set64(i, 34 + 24 + 8, 5); }, ".idx", "field 'doc_idx[1]'"},
      {"bin odd size", [](std::string&, std::string& b) { b.push_back('x'); }, ".bin", "not a multiple"},
      {"bin longer", [](std::string&, std::string& b) { b.append(2, 'x'); }, ".idx", "do not belong together"},
      {"bin shorter", [](std::string&, std::string& b) { b.resize(b.size() - 2); }, ".idx", "field 'sizes[1]'"},
  };
  for (const Case& c : cases) {
    std::string idx = idx0, bin = bin0;
    c.edit(idx, bin);
    const std::string prefix = dir.file(std::string("bad_") + std::to_string(&c - cases.data()));
    spit(prefix + ".idx", idx);
    spit(prefix + ".bin", bin);
    try {
      BinIdxDataset::open(prefix);
      ADD_FAILURE() << c.what << ": accepted";
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(prefix + c.expect_file), std::string::npos) << c.what << ": " << m;
      EXPECT_NE(m.find(c.expect_text), std::string::npos) << c.what << ": " << m;
    }
  }
  try {
    BinIdxDataset::open(dir.file("missing"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.idx: cannot open"), std::string::npos) << e.what();
  }
  spit(dir.file("nobin.idx"), idx0);
  EXPECT_THROW(BinIdxDataset::open(dir.file("nobin")), Error);
}

TEST(Sampling, MagicPrimesOfTheOfficialRuns) {
  // Spec §4.1: MiniPile at ctx 512 and the ProLong-64K pack at ctx 64000.
  EXPECT_EQ(magic_prime(1498226207, 512), 2926181u);
  EXPECT_EQ(magic_prime(36627478782, 64000), 572303u);
  EXPECT_EQ(magic_prime(1000, 10), 89u);  // 99, 98, ...: 89 is the first prime ≡ 2 (mod 3)
  EXPECT_EQ(magic_prime(29, 10), 0u);     // fewer than 3 windows
  EXPECT_EQ(magic_prime(30, 10), 2u);
  EXPECT_TRUE(is_prime(2926181));
  EXPECT_FALSE(is_prime(2926183));
  EXPECT_FALSE(is_prime(1));
  EXPECT_TRUE(is_prime(1000000007));
}

TEST(Sampling, WindowsOfAHandMadeDataset) {
  test::TempDir dir;
  // Tokens 0..999 split into documents of uneven sizes; token t sits at position t.
  std::vector<std::vector<int32_t>> docs;
  for (int32_t t = 0, len = 1; t < 1000; t += len, len = len % 37 + 5) {
    std::vector<int32_t> d;
    for (int32_t k = t; k < std::min(1000, t + len); ++k) d.push_back(k);
    docs.push_back(d);
  }
  const std::string prefix = write_docs(dir, "seq", BinIdxDType::u16, docs);
  BinIdxDataset data = BinIdxDataset::open(prefix);
  ASSERT_EQ(data.n_tokens(), 1000u);

  PretrainSampling s;
  s.ctx_len = 10;
  s.magic_prime = magic_prime(data.n_tokens(), s.ctx_len);
  s.epoch_steps = 5;
  s.micro_bsz = 2;
  s.world_size = 3;
  ASSERT_EQ(s.magic_prime, 89u);
  EXPECT_EQ(s.samples_per_epoch(), 30u);
  EXPECT_EQ(s.step(2, 4, 1), 2u * 30 + 4 * 3 + 1);

  // step 73 on epoch 2, idx 4, rank 1: 73³ = 389017 = 89·4370 + 87 → window 87, tokens 870..880.
  TokenWindow w = pretrain_sample(data, s, 2, 4, 1);
  EXPECT_EQ(w.step, 73u);
  EXPECT_EQ(w.start, 870u);
  std::vector<int32_t> x(10), y(10);
  for (int i = 0; i < 10; ++i) x[size_t(i)] = 870 + i, y[size_t(i)] = 871 + i;
  EXPECT_EQ(w.x, x);
  EXPECT_EQ(w.y, y);

  // Cubing is a bijection mod p (p ≡ 2 mod 3): p consecutive steps visit every window once.
  std::set<uint64_t> starts;
  for (uint64_t step = 1000; step < 1000 + 89; ++step) starts.insert(s.window_start(step));
  EXPECT_EQ(starts.size(), 89u);
  EXPECT_EQ(*starts.rbegin(), 880u);
  // 128-bit arithmetic: a step near 2^64 against modular exponentiation by hand.
  const uint64_t big = ~uint64_t(0) - 5, r = big % 89;
  EXPECT_EQ(s.window_start(big), (r * r % 89) * r % 89 * 10);

  // Validation: bad primes, windows past the end, ranks, token bounds.
  PretrainSampling bad = s;
  bad.magic_prime = 91;  // 7 · 13
  EXPECT_THROW(pretrain_sample(data, bad, 0, 0, 0), Error);
  bad.magic_prime = 97;  // prime but ≡ 1 (mod 3)
  EXPECT_THROW(pretrain_sample(data, bad, 0, 0, 0), Error);
  bad.magic_prime = 101;  // windows past the 100th
  try {
    pretrain_sample(data, bad, 0, 0, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("largest valid one is 89"), std::string::npos) << e.what();
  }
  bad = s;
  bad.ctx_len = 0;
  EXPECT_THROW(pretrain_sample(data, bad, 0, 0, 0), Error);
  EXPECT_THROW(pretrain_sample(data, s, 0, 0, 3), Error);  // rank >= world size
  EXPECT_THROW(pretrain_sample(data, s, 2, 4, 1, 500), Error);  // ids above a vocab of 501
}

}  // namespace
}  // namespace rwkvx
