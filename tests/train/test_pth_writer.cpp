// The .pth writer against our reader: every dtype and rank round trips bit-exactly (ZIP64 records
// included), the golden checkpoints survive read → write → read, entry data is 64-byte aligned as torch
// lays it out, CRC-32 is the zip one, and bad tensors are refused without leaving a file.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "model/formats/pth_writer.h"
#include "model/formats/tensor_store.h"
#include "model/formats/zip_reader.h"
#include "support/run_cli.h"
#include "support/test_util.h"

namespace rwkvx {
namespace {

TensorData pattern(std::string name, DType dt, std::vector<int64_t> shape, uint8_t seed) {
  TensorData t{std::move(name), dt, std::move(shape), {}};
  uint64_t n = 1;
  for (int64_t d : t.shape) n *= uint64_t(d);
  t.bytes.resize(n * dtype_size(dt));
  for (size_t i = 0; i < t.bytes.size(); ++i) t.bytes[i] = uint8_t(i * 131 + seed);
  return t;
}

void expect_same(const TensorStore& s, const std::vector<TensorData>& ts) {
  ASSERT_EQ(s.tensors.size(), ts.size());
  for (const TensorData& t : ts) {
    const StoredTensor& g = s.get(t.name);
    EXPECT_EQ(g.dtype, t.dtype) << t.name;
    EXPECT_EQ(g.shape, t.shape) << t.name;
    ASSERT_EQ(g.nbytes(), t.bytes.size()) << t.name;
    if (!t.bytes.empty()) {
      EXPECT_EQ(std::memcmp(g.data, t.bytes.data(), t.bytes.size()), 0) << t.name;
    }
  }
}

std::vector<TensorData> assorted() {
  return {
      pattern("emb.weight", DType::f32, {7, 5}, 1),
      pattern("blocks.0.att.x_r", DType::bf16, {1, 1, 5}, 2),
      pattern("half", DType::f16, {3}, 3),
      pattern("scalar", DType::f32, {}, 4),
      pattern("rank4", DType::bf16, {2, 3, 1, 2}, 5),
      pattern("wide", DType::f32, {70000}, 6),                // sizes past 16 bits (BININT)
      pattern("empty_huge_stride", DType::f32, {0, 3000000000}, 7),  // a stride past 31 bits (LONG1)
      pattern("unicode_name_\xc3\xa9", DType::f32, {2}, 8),
  };
}

TEST(PthWriter, RoundTripsEveryDtypeAndRank) {
  for (bool z64 : {false, true}) {
    PthWriteOptions o;
    o.force_zip64 = z64;
    const std::vector<TensorData> ts = assorted();
    TensorStore s = parse_pth(MappedFile::from_bytes("mem.pth", serialize_pth(ts, o)));
    EXPECT_EQ(s.format, "pth");
    expect_same(s, ts);
  }
}

TEST(PthWriter, LayoutMatchesTorch) {
  PthWriteOptions o;
  o.archive_name = "model";
  const std::vector<TensorData> ts = assorted();
  auto file = MappedFile::from_bytes("mem.pth", serialize_pth(ts, o));
  const auto entries = read_zip_directory(*file);
  for (const char* n : {"data.pkl", ".format_version", ".storage_alignment", "byteorder", "version"})
    EXPECT_TRUE(entries.count(std::string("model/") + n)) << n;
  auto text = [&](const std::string& n) {
    const ZipEntry& e = entries.at("model/" + n);
    return std::string(reinterpret_cast<const char*>(file->data() + e.data_offset), e.size);
  };
  EXPECT_EQ(text("version"), "3\n");
  EXPECT_EQ(text("byteorder"), "little");
  EXPECT_EQ(text(".storage_alignment"), "64");
  for (size_t i = 0; i < ts.size(); ++i) {
    const ZipEntry& e = entries.at("model/data/" + std::to_string(i));
    EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
    EXPECT_EQ(e.size, ts[i].bytes.size());
  }
  // Pickle protocol 2, a plain dict, tensors rebuilt by _rebuild_tensor_v2 (what torch.save writes).
  const std::string pkl = text("data.pkl");
  EXPECT_EQ(pkl.substr(0, 3), std::string("\x80\x02}", 3));
  EXPECT_NE(pkl.find("ctorch._utils\n_rebuild_tensor_v2\n"), std::string::npos);
  EXPECT_NE(pkl.find("ctorch\nBFloat16Storage\n"), std::string::npos);
  EXPECT_EQ(pkl.back(), '.');
}

TEST(PthWriter, Crc32IsTheZipOne) {
  EXPECT_EQ(crc32_update(0, "123456789", 9), 0xCBF43926u);
  EXPECT_EQ(crc32_update(crc32_update(0, "1234", 4), "56789", 5), 0xCBF43926u);
  EXPECT_EQ(crc32_update(0, "", 0), 0u);
}

TEST(PthWriter, GoldenCheckpointsSurviveRewrite) {
  test::TempDir dir;
  for (const char* name : {"rwkv7-tiny", "rwkvx-tiny"}) {
    TensorStore a = load_checkpoint(test::golden_dir(name) + "/model.pth");
    std::vector<TensorData> ts;
    for (const auto& [n, t] : a.tensors) ts.push_back({n, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes())});
    const std::string out = dir.file(std::string(name) + ".pth");
    save_pth(out, ts);
    TensorStore b = load_checkpoint(out);
    expect_same(b, ts);
  }
}

TEST(PthWriter, RefusesBadTensorsWithoutWriting) {
  test::TempDir dir;
  const std::string out = dir.file("bad.pth");
  TensorData t = pattern("w", DType::f32, {2, 2}, 1);
  t.bytes.pop_back();
  try {
    save_pth(out, {t});
    FAIL() << "wrote a tensor with the wrong byte count";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
  }
  TensorData q = pattern("q", DType::q8, {2}, 1);
  EXPECT_THROW(save_pth(out, {q}), Error);
  EXPECT_THROW(save_pth(out, {pattern("", DType::f32, {1}, 1)}), Error);
  PthWriteOptions o;
  o.archive_name = "a/b";
  EXPECT_THROW(save_pth(out, {pattern("w", DType::f32, {1}, 1)}, o), Error);
  EXPECT_FALSE(std::filesystem::exists(out));
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(out).parent_path()))
    EXPECT_EQ(e.path().string().find("bad.pth"), std::string::npos) << "left " << e.path();
}

}  // namespace
}  // namespace rwkvx
