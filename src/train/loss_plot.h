// The loss-curve picture `rwkvx train` writes beside loss.csv: a PNG with axes, the per-step loss (light)
// and its moving average (dark), with the step and loss at the ticks; loss.csv holds the numbers.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace rwkvx::train {

struct LossPoint {
  int64_t step = 0;
  double loss = 0;
};

// Writes an RGB PNG of `width` x `height` pixels atomically (temp file, fsync, rename). Non-finite losses
// are skipped. Throws rwkvx::Error naming the path on failure.
void write_loss_png(const std::string& path, const std::vector<LossPoint>& points, int width = 800, int height = 400);

}  // namespace rwkvx::train
