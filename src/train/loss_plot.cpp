// Loss-curve PNG: rasterised by hand (Bresenham lines), encoded with libpng into memory, written atomically.
#include "train/loss_plot.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>

#include "core/atomic_file.h"
#include "core/error.h"

namespace rwkvx::train {
namespace {

struct Rgb {
  uint8_t r, g, b;
};

class Canvas {
 public:
  Canvas(int w, int h) : w_(w), h_(h), px_(size_t(w) * size_t(h) * 3, 255) {}
  void set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    uint8_t* p = &px_[(size_t(y) * size_t(w_) + size_t(x)) * 3];
    p[0] = c.r, p[1] = c.g, p[2] = c.b;
  }
  void line(int x0, int y0, int x1, int y1, Rgb c) {
    const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
    const int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    for (;;) {
      set(x0, y0, c);
      if (x0 == x1 && y0 == y1) break;
      const int e2 = 2 * err;
      if (e2 >= dy) err += dy, x0 += sx;
      if (e2 <= dx) err += dx, y0 += sy;
    }
  }
  const uint8_t* row(int y) const { return &px_[size_t(y) * size_t(w_) * 3]; }
  int width() const { return w_; }
  int height() const { return h_; }

 private:
  int w_, h_;
  std::vector<uint8_t> px_;
};

void append_bytes(png_structp png, png_bytep data, png_size_t n) {
  auto* out = static_cast<std::vector<uint8_t>*>(png_get_io_ptr(png));
  out->insert(out->end(), data, data + n);
}
void no_flush(png_structp) {}

// Encodes the canvas; returns false if libpng reported an error.
bool encode_png(const Canvas& cv, std::vector<uint8_t>& out) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  if (!png) return false;
  png_infop info = png_create_info_struct(png);
  if (!info || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, info ? &info : nullptr);
    return false;
  }
  png_set_write_fn(png, &out, append_bytes, no_flush);
  png_set_IHDR(png, info, png_uint_32(cv.width()), png_uint_32(cv.height()), 8, PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < cv.height(); ++y) png_write_row(png, const_cast<png_bytep>(cv.row(y)));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return true;
}

}  // namespace

void write_loss_png(const std::string& path, const std::vector<LossPoint>& points, int width, int height) {
  if (width < 64 || height < 64) throw Error(path + ": loss plot needs at least 64 x 64 pixels");
  Canvas cv(width, height);
  const int left = 40, right = width - 16, top = 16, bottom = height - 32;
  const Rgb axis{0, 0, 0}, grid{225, 225, 225}, raw{160, 190, 235}, avg{20, 60, 170};

  std::vector<LossPoint> pts;
  for (const LossPoint& p : points)
    if (std::isfinite(p.loss)) pts.push_back(p);
  if (!pts.empty()) {
    int64_t s0 = pts.front().step, s1 = pts.back().step;
    double lo = pts.front().loss, hi = lo;
    for (const LossPoint& p : pts) lo = std::min(lo, p.loss), hi = std::max(hi, p.loss);
    if (s1 == s0) s1 = s0 + 1;
    if (hi - lo < 1e-12) hi = lo + 1;
    const double pad = (hi - lo) * 0.05;
    lo -= pad, hi += pad;
    auto X = [&](int64_t s) { return left + int(std::lround(double(s - s0) / double(s1 - s0) * (right - left))); };
    auto Y = [&](double l) { return bottom - int(std::lround((l - lo) / (hi - lo) * (bottom - top))); };
    // Horizontal grid at quarters of the range, tick marks on both axes.
    for (int q = 1; q <= 4; ++q) {
      const int y = bottom - (bottom - top) * q / 4;
      cv.line(left + 1, y, right, y, grid);
      cv.line(left - 5, y, left, y, axis);
    }
    for (int q = 1; q <= 4; ++q) {
      const int x = left + (right - left) * q / 4;
      cv.line(x, bottom, x, bottom + 5, axis);
    }
    // The raw curve, then its trailing average over ~1/50 of the run on top.
    for (size_t i = 1; i < pts.size(); ++i)
      cv.line(X(pts[i - 1].step), Y(pts[i - 1].loss), X(pts[i].step), Y(pts[i].loss), raw);
    const size_t win = std::max<size_t>(1, pts.size() / 50);
    double sum = 0;
    int px = 0, py = 0;
    for (size_t i = 0; i < pts.size(); ++i) {
      sum += pts[i].loss;
      if (i >= win) sum -= pts[i - win].loss;
      const double m = sum / double(std::min(i + 1, win));
      const int x = X(pts[i].step), y = Y(m);
      if (i > 0) cv.line(px, py, x, y, avg);
      px = x, py = y;
    }
  }
  cv.line(left, top, left, bottom, axis);
  cv.line(left, bottom, right, bottom, axis);

  std::vector<uint8_t> bytes;
  if (!encode_png(cv, bytes)) throw Error(path + ": PNG encoding failed");
  AtomicFile f(path);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace rwkvx::train
