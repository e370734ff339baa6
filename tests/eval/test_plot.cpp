// The plotting module: PNG bytes (signature, IHDR, pixels read back through libpng), colour scale,
// heatmap layout and line-plot geometry.
#include <gtest/gtest.h>
#include <png.h>

#include <algorithm>
#include <cmath>

#include "eval/plot.h"
#include "support/run_cli.h"

namespace rwkvx {
namespace {

uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }

// Decodes PNG bytes with libpng's simplified API into RGB pixels.
Image decode(const std::vector<uint8_t>& bytes) {
  png_image im{};
  im.version = PNG_IMAGE_VERSION;
  EXPECT_TRUE(png_image_begin_read_from_memory(&im, bytes.data(), bytes.size())) << im.message;
  im.format = PNG_FORMAT_RGB;
  Image out(int(im.width), int(im.height), {});
  EXPECT_TRUE(png_image_finish_read(&im, nullptr, out.pixels.data(), 0, nullptr)) << im.message;
  return out;
}

TEST(Plot, PngSignatureHeaderAndPixels) {
  Image img(7, 3, {1, 2, 3});
  img.at(6, 2) = {200, 100, 50};
  const std::vector<uint8_t> png = encode_png(img);
  ASSERT_GE(png.size(), 33u);
  const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  EXPECT_TRUE(std::equal(sig, sig + 8, png.begin()));
  EXPECT_EQ(std::string(png.begin() + 12, png.begin() + 16), "IHDR");
  EXPECT_EQ(be32(&png[16]), 7u);
  EXPECT_EQ(be32(&png[20]), 3u);
  const Image back = decode(png);
  ASSERT_EQ(back.width, 7);
  EXPECT_EQ(back.pixels, img.pixels);
  EXPECT_THROW(encode_png(Image{}), Error);
}

TEST(Plot, WritePngIsAtomicAndReportsThePath) {
  test::TempDir dir;
  write_png(dir.file("a.png"), Image(4, 5, {9, 9, 9}));
  const std::string s = test::read_text(dir.file("a.png"));
  ASSERT_GE(s.size(), 24u);
  EXPECT_EQ(be32(reinterpret_cast<const uint8_t*>(s.data()) + 20), 5u);
  try {
    write_png(dir.file("no/such/dir/a.png"), Image(4, 5, {}));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no/such/dir"), std::string::npos) << e.what();
  }
}

TEST(Plot, RedGreenScale) {
  EXPECT_EQ(red_green(0), (Rgb{215, 48, 39}));
  EXPECT_EQ(red_green(0.5), (Rgb{255, 255, 191}));
  EXPECT_EQ(red_green(1), (Rgb{26, 152, 80}));
  EXPECT_EQ(red_green(-3), red_green(0));
  EXPECT_EQ(red_green(7), red_green(1));
  EXPECT_EQ(red_green(NAN), (Rgb{160, 160, 160}));
}

TEST(Plot, HeatmapLayout) {
  HeatmapOptions o;
  const Image img = heatmap({{0, 100, 50}, {100, 0, NAN}}, o);
  EXPECT_EQ(img.width, 2 * o.margin + 3 * o.cell_w);
  EXPECT_EQ(img.height, 2 * o.margin + 2 * o.cell_h);
  auto cell = [&](int r, int c) { return img.at(o.margin + c * o.cell_w + 2, o.margin + r * o.cell_h + 2); };
  EXPECT_EQ(cell(0, 0), red_green(0));
  EXPECT_EQ(cell(0, 1), red_green(1));
  EXPECT_EQ(cell(0, 2), red_green(0.5));
  EXPECT_EQ(cell(1, 0), red_green(1));
  EXPECT_EQ(cell(1, 2), red_green(NAN));
  EXPECT_EQ(img.at(0, 0), (Rgb{255, 255, 255}));
  EXPECT_THROW(heatmap({{1, 2}, {3}}), Error);
  EXPECT_THROW(heatmap({}), Error);
  o.hi = o.lo;
  EXPECT_THROW(heatmap({{1}}, o), Error);
}

TEST(Plot, LinePlotGeometry) {
  LinePlotOptions o;
  o.width = 200, o.height = 100, o.margin = 10, o.thickness = 1;
  o.x_lo = 0, o.x_hi = 10, o.y_lo = 0, o.y_hi = 1;
  // Series 0: a horizontal line at y = 0.5; series 1: one point at the top-right corner.
  const Image img = line_plot({{{0, 10}, {0.5, 0.5}}, {{10}, {1}}}, o);
  ASSERT_EQ(img.width, 200);
  const int ph = 100 - 20, y_mid = 10 + ph - 1 - int(std::lround(0.5 * (ph - 1)));
  EXPECT_EQ(img.at(105, y_mid), series_color(0));
  EXPECT_EQ(img.at(10 + 180 - 1, 10), series_color(1));
  EXPECT_EQ(img.at(105, y_mid - 10), (Rgb{255, 255, 255}));
  EXPECT_THROW(line_plot({{{0, 1}, {1}}}), Error);
  EXPECT_THROW(line_plot({{{0}, {NAN}}}), Error);
  EXPECT_NE(series_color(0), series_color(1));
}

}  // namespace
}  // namespace rwkvx
