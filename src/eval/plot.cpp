// PNG writing (libpng, into memory, then an atomic file) and the two plot kinds (see plot.h).
#include "eval/plot.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "core/atomic_file.h"
#include "core/error.h"

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
  if (!(xlo <= xhi)) throw Error("line plot: no finite point to plot");
  if (opt.x_lo < opt.x_hi) xlo = opt.x_lo, xhi = opt.x_hi;
  if (opt.y_lo < opt.y_hi) {
    ylo = opt.y_lo, yhi = opt.y_hi;
  } else {
    const double pad = std::max((yhi - ylo) * 0.05, 1e-6 * std::max(1.0, std::fabs(yhi)));
    ylo -= pad, yhi += pad;
  }
  if (xhi <= xlo) xhi = xlo + 1;
  const int m = opt.margin, W = opt.width, H = opt.height, pw = W - 2 * m, ph = H - 2 * m;
  if (pw < 2 || ph < 2) throw Error("line plot: the image is too small for its margins");
  Image img(W, H, {255, 255, 255});
  const Rgb grid{225, 225, 225}, axis{0, 0, 0};
  for (int i = 0; i <= opt.x_ticks && opt.x_ticks > 0; ++i) {
    const int x = m + int(std::lround(double(pw - 1) * i / opt.x_ticks));
    img.draw_line(x, m, x, m + ph - 1, grid);
    img.draw_line(x, m + ph, x, m + ph + 4, axis);  // tick below the x axis
  }
  for (int i = 0; i <= opt.y_ticks && opt.y_ticks > 0; ++i) {
    const int y = m + ph - 1 - int(std::lround(double(ph - 1) * i / opt.y_ticks));
    img.draw_line(m, y, m + pw - 1, y, grid);
    img.draw_line(m - 5, y, m - 1, y, axis);  // tick left of the y axis
  }
  img.draw_line(m - 1, m, m - 1, m + ph, axis);            // y axis
  img.draw_line(m - 1, m + ph, m + pw - 1, m + ph, axis);  // x axis
  auto px = [&](double x) { return m + int(std::lround((x - xlo) / (xhi - xlo) * (pw - 1))); };
  auto py = [&](double y) { return m + ph - 1 - int(std::lround((y - ylo) / (yhi - ylo) * (ph - 1))); };
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
      if (have_prev) img.draw_line(x0, y0, x1, y1, series_color(s), opt.thickness);
      else img.draw_line(x1, y1, x1, y1, series_color(s), opt.thickness + 1);
      x0 = x1, y0 = y1, have_prev = true;
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
  const int W = 2 * opt.margin + int(cols) * opt.cell_w, H = 2 * opt.margin + int(values.size()) * opt.cell_h;
  Image img(W, H, {255, 255, 255});
  for (size_t r = 0; r < values.size(); ++r)
    for (size_t c = 0; c < cols; ++c) {
      const int x = opt.margin + int(c) * opt.cell_w, y = opt.margin + int(r) * opt.cell_h;
      img.fill_rect(x, y, x + opt.cell_w - 1, y + opt.cell_h - 1, red_green((values[r][c] - opt.lo) / (opt.hi - opt.lo)));
    }
  return img;
}

}  // namespace rwkvx
