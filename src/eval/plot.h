// Small plotting module for the eval commands (and the trainer's loss curves): RGB images, PNG writing
// through libpng, labels in a 5 × 7 bitmap font (capitals, eval/text_font.h), a line plot with several
// series and a heatmap. Pixel (0, 0) is the top-left corner of the image.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace rwkvx {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

// An 8-bit RGB image, rows top to bottom, pixels left to right.
struct Image {
  int width = 0, height = 0;
  std::vector<Rgb> pixels;  // [height][width]

  Image() = default;
  Image(int w, int h, Rgb fill);
  Rgb& at(int x, int y) { return pixels[size_t(y) * size_t(width) + size_t(x)]; }
  const Rgb& at(int x, int y) const { return pixels[size_t(y) * size_t(width) + size_t(x)]; }
  // Sets the pixel if (x, y) is inside the image; ignores it otherwise.
  void set(int x, int y, Rgb c);
  // Filled rectangle [x0, x1) × [y0, y1), clipped to the image.
  void fill_rect(int x0, int y0, int x1, int y1, Rgb c);
  // Line from (x0, y0) to (x1, y1) inclusive, `thickness` pixels wide (a square pen), clipped.
  void draw_line(int x0, int y0, int x1, int y1, Rgb c, int thickness = 1);
};

// Text in the 5 × 7 font, scaled `scale` times: characters 6·scale pixels apart, 7·scale tall, the top-left
// corner at (x, y), clipped to the image. Lower case is drawn as capitals; a character the font lacks (a
// whole UTF-8 sequence counting as one) as a hollow box.
void draw_text(Image& img, int x, int y, std::string_view text, Rgb c, int scale = 1);
// Width in pixels of draw_text's rendering of `text` (0 for an empty text).
int text_width(std::string_view text, int scale = 1);

// Encodes `img` as an 8-bit RGB PNG. Throws rwkvx::Error if the image is empty or libpng fails.
std::vector<uint8_t> encode_png(const Image& img);
// encode_png, written atomically to `path` (temp file, fsync, rename). Throws rwkvx::Error naming the path.
void write_png(const std::string& path, const Image& img);

// The i-th colour of a fixed palette of well-separated series colours (cycles after 8).
Rgb series_color(size_t i);
// Red (t = 0) → yellow (t = 0.5) → green (t = 1); t is clamped to [0, 1]. NaN gives grey.
Rgb red_green(double t);

struct Series {
  std::vector<double> x, y;  // same length; points with a non-finite y are skipped (the line breaks there)
};

struct LinePlotOptions {
  int width = 800, height = 500;
  int margin = 40;  // blank border around the plot area, where axes and ticks go
  // Axis ranges; when lo >= hi the range is taken from the data (y padded by 5%).
  double x_lo = 0, x_hi = 0, y_lo = 0, y_hi = 0;
  int x_ticks = 10, y_ticks = 10;  // grid lines (ticks) dividing each axis into this many equal parts
  int thickness = 2;
  // Text, each optional (none: the plot area spans the image less `margin` on every side): a title and the
  // y axis's name above the plot, the x axis's name below it, the value at every tick, and a legend (a
  // swatch and name per series, top right inside the plot).
  std::string title, x_label, y_label;
  bool tick_labels = false;
  std::vector<std::string> series_names;
  std::vector<Rgb> series_colors;  // colour of series i if given, else series_color(i)
};

// Series i is drawn in its colour, in order (later series on top), over a light grey grid with black axes
// on the left and bottom. x grows to the right, y grows upwards. Throws rwkvx::Error if a series has x and
// y of different lengths, or nothing is finite to plot and the options do not give both axis ranges (then
// the picture is the empty axes).
Image line_plot(const std::vector<Series>& series, const LinePlotOptions& opt = {});

struct HeatmapOptions {
  int cell_w = 24, cell_h = 16;  // pixels per cell (cells widen to fit the column labels)
  int margin = 8;                // white border
  double lo = 0, hi = 100;       // value mapped to red (lo) ... green (hi)
  // Text, each optional (none: the cells fill the image less `margin`): a title and the rows' name above the
  // cells, a label left of each row and below each column, the columns' name below, and each cell's value
  // rounded to an integer inside it (white on dark cells, black on light ones; none for NaN).
  std::string title, x_label, y_label;
  std::vector<std::string> row_labels, col_labels;  // empty, or one per row / column
  bool show_values = false;
};

// values[r][c] becomes a cell at row r (top to bottom) and column c (left to right), coloured
// red_green((v - lo) / (hi - lo)); NaN cells are grey. Cells are separated by 1-pixel white lines.
// Throws rwkvx::Error if the rows have different lengths, there are none, hi <= lo, or the labels do not
// match the rows and columns in number.
Image heatmap(const std::vector<std::vector<double>>& values, const HeatmapOptions& opt = {});

}  // namespace rwkvx
