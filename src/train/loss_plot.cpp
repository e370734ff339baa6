// Loss-curve PNG, drawn by the plotting module (eval/plot.h) and written atomically.
#include "train/loss_plot.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "eval/plot.h"

namespace rwkvx::train {

void write_loss_png(const std::string& path, const std::vector<LossPoint>& points, int width, int height) {
  if (width < 64 || height < 64) throw Error(path + ": loss plot needs at least 64 x 64 pixels");
  Series raw, avg;
  for (const LossPoint& p : points)
    if (std::isfinite(p.loss)) raw.x.push_back(double(p.step)), raw.y.push_back(p.loss);
  // The trailing average over ~1/50 of the run, drawn on top of the raw curve.
  const size_t win = std::max<size_t>(1, raw.y.size() / 50);
  double sum = 0;
  for (size_t i = 0; i < raw.y.size(); ++i) {
    sum += raw.y[i];
    if (i >= win) sum -= raw.y[i - win];
    avg.x.push_back(raw.x[i]);
    avg.y.push_back(sum / double(std::min(i + 1, win)));
  }
  LinePlotOptions o;
  o.width = width, o.height = height, o.margin = 10, o.thickness = 1;
  o.x_ticks = 4, o.y_ticks = 4;
  o.series_colors = {{160, 190, 235}, {20, 60, 170}};
  if (raw.y.empty()) o.x_lo = 0, o.x_hi = 1, o.y_lo = 0, o.y_hi = 1;  // no finite loss yet: the axes alone
  // Text only where there is room for it (tiny pictures keep the axes and curves).
  if (width >= 240 && height >= 120) {
    o.tick_labels = true;
    o.title = "training loss per step (light) and its moving average (dark)";
    o.x_label = "step";
  }
  try {
    write_png(path, line_plot({raw, avg}, o));
  } catch (const Error& e) {
    const std::string what = e.what();
    throw Error(what.find(path) == std::string::npos ? path + ": " + what : what);
  }
}

}  // namespace rwkvx::train
