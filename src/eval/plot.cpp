// PNG writing (libpng, into memory, then an atomic file) and the two plot kinds (see plot.h).
#include "eval/plot.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/atomic_file.h"
#include "core/error.h"
#include "eval/text_font.h"

namespace rwkvx {

Image::Image(int w, int h, Rgb fill) : width(w), height(h), pixels(size_t(std::max(w, 0)) * size_t(std::max(h, 0)), fill) {}

void Image::set(int x, int y, Rgb c) {
  if (x >= 0 && y >= 0 && x < width && y < height) at(x, y) = c;
}

void Image::fill_rect(int x0, int y0, int x1, int y1, Rgb c) {
  x0 = std::max(x0, 0), y0 = std::max(y0, 0), x1 = std::min(x1, width), y1 = std::min(y1, height);
  for (int y = y0; y < y1; ++y)
    for (int x = x0; x < x1; ++x) at(x, y) = c;
}

void Image::draw_line(int x0, int y0, int x1, int y1, Rgb c, int thickness) {
  // Bresenham, stamping a square pen of side `thickness` centred on each point.
  const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  const int lo = -(thickness - 1) / 2, hi = thickness / 2;
  int err = dx + dy;
  for (;;) {
    for (int oy = lo; oy <= hi; ++oy)
      for (int ox = lo; ox <= hi; ++ox) set(x0 + ox, y0 + oy, c);
    if (x0 == x1 && y0 == y1) break;
    const int e2 = 2 * err;
    if (e2 >= dy) err += dy, x0 += sx;
    if (e2 <= dx) err += dx, y0 += sy;
  }
}

namespace {

constexpr int kAdvance = kGlyphWidth + 1;  // pixels from one character to the next (scale 1)
constexpr int kLine = kGlyphHeight + 5;    // pixels from one line of text to the next

// Calls f(byte) for each character of `text`: a UTF-8 sequence is one character (its lead byte).
template <typename F>
void for_each_char(std::string_view text, F&& f) {
  for (const char ch : text) {
    const auto u = static_cast<unsigned char>(ch);
    if ((u & 0xC0) != 0x80) f(u);
  }
}

int widest(const std::vector<std::string>& texts) {
  int w = 0;
  for (const std::string& t : texts) w = std::max(w, text_width(t));
  return w;
}

// A tick value with as many decimals as the axis span needs (three significant digits of the span).
std::string tick_text(double v, double span) {
  const int decimals = std::clamp(2 - int(std::floor(std::log10(std::max(span, 1e-12)))), 0, 6);
  char b[48];
  std::snprintf(b, sizeof b, "%.*f", decimals, std::fabs(v) < 0.5 * std::pow(10.0, -decimals) ? 0.0 : v);
  return b;
}

}  // namespace

void draw_text(Image& img, int x, int y, std::string_view text, Rgb c, int scale) {
  int pen = x;
  for_each_char(text, [&](unsigned char ch) {
    const auto& rows = glyph_rows(ch);
    for (int r = 0; r < kGlyphHeight; ++r)
      for (int col = 0; col < kGlyphWidth; ++col)
        if (rows[size_t(r)] >> (kGlyphWidth - 1 - col) & 1)
          img.fill_rect(pen + col * scale, y + r * scale, pen + (col + 1) * scale, y + (r + 1) * scale, c);
    pen += kAdvance * scale;
  });
}

int text_width(std::string_view text, int scale) {
  int n = 0;
  for_each_char(text, [&](unsigned char) { ++n; });
  return n == 0 ? 0 : (n * kAdvance - 1) * scale;
}

namespace {

void png_write_to_vector(png_structp png, png_bytep data, png_size_t n) {
  auto* out = static_cast<std::vector<uint8_t>*>(png_get_io_ptr(png));
  out->insert(out->end(), data, data + n);
}
void png_flush_nothing(png_structp) {}
[[noreturn]] void png_error_throw(png_structp png, png_const_charp msg) {
  // libpng requires this handler not to return; longjmp back into encode_png, which throws.
  *static_cast<std::string*>(png_get_error_ptr(png)) = msg;
  png_longjmp(png, 1);
}
void png_warning_ignore(png_structp, png_const_charp) {}

}  // namespace

std::vector<uint8_t> encode_png(const Image& img) {
  if (img.width <= 0 || img.height <= 0 || img.pixels.size() != size_t(img.width) * size_t(img.height))
    throw Error("png: empty or inconsistent image (" + std::to_string(img.width) + "x" + std::to_string(img.height) + ")");
  std::vector<uint8_t> out;
  std::string message;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &message, png_error_throw, png_warning_ignore);
  if (!png) throw Error("png: cannot create the libpng writer");
  png_infop info = png_create_info_struct(png);
  std::vector<png_bytep> rows(size_t(img.height));
  // setjmp is safe here: every object that lives across it is created before and destroyed after.
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    throw Error("png: libpng failed: " + message);
  }
  if (!info) png_error(png, "cannot create the info struct");
  png_set_write_fn(png, &out, png_write_to_vector, png_flush_nothing);
  png_set_IHDR(png, info, png_uint_32(img.width), png_uint_32(img.height), 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < img.height; ++y)
    rows[size_t(y)] = reinterpret_cast<png_bytep>(const_cast<Rgb*>(&img.pixels[size_t(y) * size_t(img.width)]));
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

void write_png(const std::string& path, const Image& img) {
  const std::vector<uint8_t> bytes = encode_png(img);
  AtomicFile f(path);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

Rgb series_color(size_t i) {
  static const Rgb palette[] = {{31, 119, 180}, {214, 39, 40}, {44, 160, 44},  {255, 127, 14},
                                {148, 103, 189}, {140, 86, 75}, {227, 119, 194}, {23, 190, 207}};
  return palette[i % 8];
}

Rgb red_green(double t) {
  if (std::isnan(t)) return {160, 160, 160};
  t = std::clamp(t, 0.0, 1.0);
  // Red (215, 48, 39) → yellow (255, 255, 191) → green (26, 152, 80): the ends of ColorBrewer's RdYlGn.
  const Rgb a = t < 0.5 ? Rgb{215, 48, 39} : Rgb{255, 255, 191}, b = t < 0.5 ? Rgb{255, 255, 191} : Rgb{26, 152, 80};
  const double u = t < 0.5 ? t * 2 : (t - 0.5) * 2;
  auto mix = [u](uint8_t p, uint8_t q) { return uint8_t(std::lround(p + (q - p) * u)); };
  return {mix(a.r, b.r), mix(a.g, b.g), mix(a.b, b.b)};
}

Image line_plot(const std::vector<Series>& series, const LinePlotOptions& opt) {
  double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
  for (size_t s = 0; s < series.size(); ++s) {
    if (series[s].x.size() != series[s].y.size())
      throw Error("line plot: series " + std::to_string(s) + " has " + std::to_string(series[s].x.size()) +
                  " x values but " + std::to_string(series[s].y.size()) + " y values");
    for (size_t i = 0; i < series[s].x.size(); ++i) {
      const double x = series[s].x[i], y = series[s].y[i];
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      xlo = std::min(xlo, x), xhi = std::max(xhi, x), ylo = std::min(ylo, y), yhi = std::max(yhi, y);
    }
  }
  if (!(xlo <= xhi) && !(opt.x_lo < opt.x_hi && opt.y_lo < opt.y_hi)) throw Error("line plot: no finite point to plot");
  if (opt.x_lo < opt.x_hi) xlo = opt.x_lo, xhi = opt.x_hi;
  if (opt.y_lo < opt.y_hi) {
    ylo = opt.y_lo, yhi = opt.y_hi;
  } else {
    const double pad = std::max((yhi - ylo) * 0.05, 1e-6 * std::max(1.0, std::fabs(yhi)));
    ylo -= pad, yhi += pad;
  }
  if (xhi <= xlo) xhi = xlo + 1;
  const int m = opt.margin, W = opt.width, H = opt.height;
  const int y_ticks = std::max(opt.y_ticks, 0), x_ticks = std::max(opt.x_ticks, 0);
  std::vector<std::string> y_text, x_text;
  if (opt.tick_labels) {
    for (int i = 0; i <= y_ticks && y_ticks > 0; ++i) y_text.push_back(tick_text(ylo + (yhi - ylo) * i / y_ticks, yhi - ylo));
    for (int i = 0; i <= x_ticks && x_ticks > 0; ++i) x_text.push_back(tick_text(xlo + (xhi - xlo) * i / x_ticks, xhi - xlo));
  }
  // The plot area [left, left + pw) × [top, top + ph); text takes room beyond the margin only when asked for.
  const int left = m + (y_text.empty() ? 0 : widest(y_text) + 6);
  const int top = m + (opt.title.empty() ? 0 : kLine) + (opt.y_label.empty() ? 0 : kLine);
  const int bottom = m + (x_text.empty() ? 0 : kLine) + (opt.x_label.empty() ? 0 : kLine);
  const int pw = W - left - m, ph = H - top - bottom;
  if (pw < 2 || ph < 2) throw Error("line plot: the image is too small for its margins");
  Image img(W, H, {255, 255, 255});
  const Rgb grid{225, 225, 225}, axis{0, 0, 0};
  for (int i = 0; i <= x_ticks && x_ticks > 0; ++i) {
    const int x = left + int(std::lround(double(pw - 1) * i / x_ticks));
    img.draw_line(x, top, x, top + ph - 1, grid);
    img.draw_line(x, top + ph, x, top + ph + 4, axis);  // tick below the x axis
    if (!x_text.empty()) draw_text(img, x - text_width(x_text[size_t(i)]) / 2, top + ph + 6, x_text[size_t(i)], axis);
  }
  for (int i = 0; i <= y_ticks && y_ticks > 0; ++i) {
    const int y = top + ph - 1 - int(std::lround(double(ph - 1) * i / y_ticks));
    img.draw_line(left, y, left + pw - 1, y, grid);
    img.draw_line(left - 5, y, left - 1, y, axis);  // tick left of the y axis
    if (!y_text.empty()) draw_text(img, left - 7 - text_width(y_text[size_t(i)]), y - kGlyphHeight / 2, y_text[size_t(i)], axis);
  }
  img.draw_line(left - 1, top, left - 1, top + ph, axis);            // y axis
  img.draw_line(left - 1, top + ph, left + pw - 1, top + ph, axis);  // x axis
  if (!opt.title.empty()) draw_text(img, left, m, opt.title, axis);
  if (!opt.y_label.empty()) draw_text(img, m, m + (opt.title.empty() ? 0 : kLine), opt.y_label, axis);
  if (!opt.x_label.empty())
    draw_text(img, left + (pw - text_width(opt.x_label)) / 2, top + ph + (x_text.empty() ? 6 : 6 + kLine), opt.x_label, axis);
  auto color_of = [&](size_t i) { return i < opt.series_colors.size() ? opt.series_colors[i] : series_color(i); };
  auto px = [&](double x) { return left + int(std::lround((x - xlo) / (xhi - xlo) * (pw - 1))); };
  auto py = [&](double y) { return top + ph - 1 - int(std::lround((y - ylo) / (yhi - ylo) * (ph - 1))); };
  for (size_t s = 0; s < series.size(); ++s) {
    bool have_prev = false;
    int x0 = 0, y0 = 0;
    for (size_t i = 0; i < series[s].x.size(); ++i) {
      const double x = series[s].x[i], y = series[s].y[i];
      if (!std::isfinite(x) || !std::isfinite(y)) {
        have_prev = false;
        continue;
      }
      // Clamp far-away points so integer pixel coordinates cannot overflow; the image clips the rest.
      const int x1 = std::clamp(px(x), -W, 2 * W), y1 = std::clamp(py(y), -H, 2 * H);
      if (have_prev) img.draw_line(x0, y0, x1, y1, color_of(s), opt.thickness);
      else img.draw_line(x1, y1, x1, y1, color_of(s), opt.thickness + 1);
      x0 = x1, y0 = y1, have_prev = true;
    }
  }
  if (!opt.series_names.empty()) {  // legend, top right inside the plot, on white
    const int n = int(opt.series_names.size()), w = widest(opt.series_names) + 24, h = n * kLine + 6;
    const int x0 = left + pw - 6 - w, y0 = top + 6;
    img.fill_rect(x0, y0, x0 + w, y0 + h, {255, 255, 255});
    for (int i = 0; i < n; ++i) {
      const int y = y0 + 4 + i * kLine;
      img.draw_line(x0 + 4, y + kGlyphHeight / 2, x0 + 16, y + kGlyphHeight / 2, color_of(size_t(i)), 3);
      draw_text(img, x0 + 22, y, opt.series_names[size_t(i)], axis);
    }
  }
  return img;
}

Image heatmap(const std::vector<std::vector<double>>& values, const HeatmapOptions& opt) {
  if (values.empty() || values[0].empty()) throw Error("heatmap: no cells");
  if (!(opt.hi > opt.lo)) throw Error("heatmap: the colour range needs hi > lo");
  const size_t cols = values[0].size();
  for (size_t r = 0; r < values.size(); ++r)
    if (values[r].size() != cols)
      throw Error("heatmap: row " + std::to_string(r) + " has " + std::to_string(values[r].size()) +
                  " cells, row 0 has " + std::to_string(cols));
  const size_t rows = values.size();
  if (!opt.row_labels.empty() && opt.row_labels.size() != rows)
    throw Error("heatmap: " + std::to_string(opt.row_labels.size()) + " row labels for " + std::to_string(rows) + " rows");
  if (!opt.col_labels.empty() && opt.col_labels.size() != cols)
    throw Error("heatmap: " + std::to_string(opt.col_labels.size()) + " column labels for " + std::to_string(cols) +
                " columns");
  const int m = opt.margin, cw = std::max(opt.cell_w, opt.col_labels.empty() ? 0 : widest(opt.col_labels) + 4);
  const int ch = opt.cell_h;
  // The cells start at (left, top); text takes room beyond the margin only when asked for.
  const int left = m + (opt.row_labels.empty() ? 0 : widest(opt.row_labels) + 6);
  const int top = m + (opt.title.empty() ? 0 : kLine) + (opt.y_label.empty() ? 0 : kLine);
  const int bottom = m + (opt.col_labels.empty() ? 0 : kLine) + (opt.x_label.empty() ? 0 : kLine);
  const int W = std::max({left + int(cols) * cw + m, 2 * m + text_width(opt.title), 2 * m + text_width(opt.y_label),
                          left + text_width(opt.x_label) + m});
  const int H = top + int(rows) * ch + bottom;
  Image img(W, H, {255, 255, 255});
  const Rgb black{0, 0, 0}, white{255, 255, 255};
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) {
      const int x = left + int(c) * cw, y = top + int(r) * ch;
      const Rgb fill = red_green((values[r][c] - opt.lo) / (opt.hi - opt.lo));
      img.fill_rect(x, y, x + cw - 1, y + ch - 1, fill);
      if (!opt.show_values || !std::isfinite(values[r][c])) continue;
      char b[32];
      std::snprintf(b, sizeof b, "%.0f", values[r][c]);
      const int tw = text_width(b);
      if (tw > cw - 3 || ch < kGlyphHeight + 2) continue;  // no room: the colour alone
      const bool dark = 0.299 * fill.r + 0.587 * fill.g + 0.114 * fill.b < 128;
      draw_text(img, x + (cw - 1 - tw) / 2, y + (ch - 1 - kGlyphHeight) / 2, b, dark ? white : black);
    }
  if (!opt.title.empty()) draw_text(img, m, m, opt.title, black);
  if (!opt.y_label.empty()) draw_text(img, m, m + (opt.title.empty() ? 0 : kLine), opt.y_label, black);
  for (size_t r = 0; r < opt.row_labels.size(); ++r)
    draw_text(img, left - 6 - text_width(opt.row_labels[r]), top + int(r) * ch + (ch - 1 - kGlyphHeight) / 2,
              opt.row_labels[r], black);
  const int below = top + int(rows) * ch + 3;
  for (size_t c = 0; c < opt.col_labels.size(); ++c)
    draw_text(img, left + int(c) * cw + (cw - 1 - text_width(opt.col_labels[c])) / 2, below, opt.col_labels[c], black);
  if (!opt.x_label.empty())
    draw_text(img, left, below + (opt.col_labels.empty() ? 0 : kLine), opt.x_label, black);
  return img;
}

}  // namespace rwkvx
