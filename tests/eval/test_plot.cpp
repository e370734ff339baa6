// The plotting module: PNG bytes (signature, IHDR, pixels read back through libpng), colour scale,
// heatmap layout and line-plot geometry, the bitmap font and the labels drawn with it.
#include <gtest/gtest.h>
#include <png.h>

#include <algorithm>
#include <cmath>

#include "eval/plot.h"
#include "eval/text_font.h"
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

int count(const Image& img, Rgb c, int x0 = 0, int y0 = 0, int x1 = -1, int y1 = -1) {
  if (x1 < 0) x1 = img.width;
  if (y1 < 0) y1 = img.height;
  int n = 0;
  for (int y = std::max(y0, 0); y < std::min(y1, img.height); ++y)
    for (int x = std::max(x0, 0); x < std::min(x1, img.width); ++x) n += img.at(x, y) == c;
  return n;
}

TEST(PlotText, FontGlyphsAreDistinct) {
  const std::string chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,-+%:()[]/=_'?!*<>#|";
  const auto& box = glyph_rows(0x80);
  for (size_t i = 0; i < chars.size(); ++i) {
    const auto& g = glyph_rows(static_cast<unsigned char>(chars[i]));
    EXPECT_NE(g, box) << chars[i];
    for (uint8_t row : g) EXPECT_LT(row, 1u << kGlyphWidth) << chars[i];
    for (size_t j = 0; j < i; ++j) EXPECT_NE(g, glyph_rows(static_cast<unsigned char>(chars[j]))) << chars[i] << chars[j];
  }
  EXPECT_EQ(glyph_rows('a'), glyph_rows('A'));
  EXPECT_EQ(glyph_rows('~'), box);  // not in the font
  EXPECT_EQ(glyph_rows(' '), (std::array<uint8_t, kGlyphHeight>{}));
}

TEST(PlotText, DrawTextPlacesTheGlyphPixels) {
  const Rgb white{255, 255, 255}, ink{10, 20, 30};
  Image img(40, 20, white);
  draw_text(img, 2, 3, "1", ink);
  // '1': "..#.." on top, ".###." at the bottom.
  EXPECT_EQ(img.at(4, 3), ink);
  EXPECT_EQ(img.at(2, 3), white);
  EXPECT_EQ(img.at(3, 9), ink);
  EXPECT_EQ(img.at(6, 9), white);
  EXPECT_EQ(count(img, ink), 10);  // the pixels of '1'
  Image big(40, 20, white);
  draw_text(big, 0, 0, "1", ink, 2);
  EXPECT_EQ(count(big, ink), 40);
  EXPECT_EQ(text_width(""), 0);
  EXPECT_EQ(text_width("ab"), 11);
  EXPECT_EQ(text_width("ab", 3), 33);
  EXPECT_EQ(text_width("\xc3\xa9"), 5);  // é: one character, drawn as the box
  Image u(10, 10, white);
  draw_text(u, 0, 0, "\xc3\xa9", ink);
  EXPECT_EQ(count(u, ink), 5 + 5 + 2 * 5);  // the hollow box
  Image clip(3, 3, white);
  draw_text(clip, -2, -2, "W", ink);  // clipped, no crash
  EXPECT_GT(count(clip, ink), 0);
}

TEST(PlotText, HeatmapLabelsAndValues) {
  HeatmapOptions o;
  const std::vector<std::vector<double>> v = {{100, 0}, {50, NAN}};
  const Image plain = heatmap(v, o);
  o.title = "title", o.x_label = "length", o.y_label = "depth", o.show_values = true;
  o.row_labels = {"0%", "100%"}, o.col_labels = {"1K", "128K"};
  const Image img = heatmap(v, o);
  const int left = o.margin + text_width("100%") + 6, top = o.margin + 2 * 12;
  const int cw = std::max(o.cell_w, text_width("128K") + 4);
  EXPECT_EQ(img.width, std::max(left + 2 * cw + o.margin, 2 * o.margin + text_width("title")));
  EXPECT_EQ(img.height, top + 2 * o.cell_h + o.margin + 2 * 12);
  EXPECT_GT(img.height, plain.height);
  const Rgb black{0, 0, 0}, white{255, 255, 255};
  EXPECT_GT(count(img, black, 0, 0, img.width, o.margin + 7), 0);                        // title
  EXPECT_GT(count(img, black, 0, top, left, top + 2 * o.cell_h), 0);                     // row labels
  EXPECT_GT(count(img, black, left, top + 2 * o.cell_h, img.width, img.height), 0);      // column labels
  EXPECT_GT(count(img, white, left + 1, top + 1, left + cw - 2, top + o.cell_h - 2), 0);  // "100" on green
  EXPECT_GT(count(img, black, left + 1, top + o.cell_h + 1, left + cw - 2, top + 2 * o.cell_h - 2), 0);  // "50" on yellow
  EXPECT_EQ(count(img, red_green(NAN), left + cw, top + o.cell_h, left + 2 * cw - 1, top + 2 * o.cell_h - 1),
            (cw - 1) * (o.cell_h - 1));  // NaN: the colour alone
  o.row_labels = {"one"};
  EXPECT_THROW(heatmap(v, o), Error);
  o.row_labels.clear(), o.col_labels = {"a", "b", "c"};
  EXPECT_THROW(heatmap(v, o), Error);
}

TEST(PlotText, LinePlotTicksAndLegend) {
  LinePlotOptions o;
  o.width = 300, o.height = 200, o.margin = 10, o.thickness = 1;
  o.x_lo = 0, o.x_hi = 100, o.y_lo = 0, o.y_hi = 2;
  o.x_ticks = 4, o.y_ticks = 4;
  o.tick_labels = true, o.title = "t", o.x_label = "x", o.y_label = "y";
  o.series_names = {"first", "second"};
  const Image img = line_plot({{{0, 100}, {1, 1}}, {{50}, {2}}}, o);
  const Rgb black{0, 0, 0};
  const int left = o.margin + text_width("2.00") + 6;  // the widest y tick label
  // The y axis is the column left − 1; tick labels sit left of it, the legend swatches top right.
  EXPECT_EQ(img.at(left - 1, 100), black);
  EXPECT_GT(count(img, black, 0, 30, left - 6, 190), 0);
  EXPECT_GT(count(img, series_color(1), 200, 30, 300, 60), 0);  // legend swatch of the series with one point
  EXPECT_GT(count(img, black, 200, 30, 300, 60), 0);              // legend names
  o.width = 20;
  EXPECT_THROW(line_plot({{{0, 1}, {0, 1}}}, o), Error);  // no room left for the plot
}

}  // namespace
}  // namespace rwkvx
