#include "server/step_time_model.h"

#include <cmath>
#include <cstdlib>

namespace tomeserve::server {
namespace {

// Weight kept by older steps per new step: ~50 steps of memory.
constexpr double kForget = 0.98;
// Ridge on (a, b, c), relative to the data's scale; keeps the 3x3 system solvable with one row count or one
// ratio seen, pulling the unidentified coefficients toward 0 (c) or toward the per-row mean (a, b).
constexpr double kRidge[3] = {1e-6, 1e-6, 1e-3};

// Solves the 3x3 system m x = v (Gaussian elimination with partial pivoting); false when singular.
bool Solve3(double m[3][3], double v[3], double x[3]) {
  for (int col = 0; col < 3; ++col) {
    int pivot = col;
    for (int r = col + 1; r < 3; ++r) {
      if (std::abs(m[r][col]) > std::abs(m[pivot][col])) pivot = r;
    }
    if (std::abs(m[pivot][col]) < 1e-18) return false;
    for (int k = 0; k < 3; ++k) std::swap(m[col][k], m[pivot][k]);
    std::swap(v[col], v[pivot]);
    for (int r = 0; r < 3; ++r) {
      if (r == col) continue;
      const double f = m[r][col] / m[col][col];
      for (int k = col; k < 3; ++k) m[r][k] -= f * m[col][k];
      v[r] -= f * v[col];
    }
  }
  for (int i = 0; i < 3; ++i) x[i] = v[i] / m[i][i];
  return true;
}

}  // namespace

void StepTimeModel::Observe(int64_t latent_pixels, int rows, double tome_rows, double seconds) {
  if (rows <= 0 || !(seconds >= 0) || !std::isfinite(seconds)) return;
  const double x[3] = {1.0, static_cast<double>(rows), tome_rows};
  absl::MutexLock lock(&mu_);
  Fit& fit = fits_[latent_pixels];
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) fit.xx[i][j] = kForget * fit.xx[i][j] + x[i] * x[j];
    fit.xy[i] = kForget * fit.xy[i] + x[i] * seconds;
  }
  ++fit.n;
  ++observations_;
}

std::optional<double> StepTimeModel::Evaluate(const Fit& fit, int rows, double tome_rows) {
  if (fit.n == 0) return std::nullopt;
  double m[3][3], v[3], coef[3];
  const double scale = fit.xx[0][0];  // total weight
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) m[i][j] = fit.xx[i][j];
    m[i][i] += kRidge[i] * scale * (1.0 + fit.xx[i][i] / scale);
    v[i] = fit.xy[i];
  }
  if (!Solve3(m, v, coef)) return fit.xy[0] / fit.xx[0][0];  // the mean step time
  const double mean = fit.xy[0] / fit.xx[0][0];
  const double t = coef[0] + coef[1] * rows + coef[2] * tome_rows;
  // A fit extrapolated far from its data can go negative; a step never costs less than a small fraction of
  // the mean.
  return std::max(t, 0.05 * mean);
}

std::optional<double> StepTimeModel::Predict(int64_t latent_pixels, int rows, double tome_rows) const {
  absl::MutexLock lock(&mu_);
  if (fits_.empty()) return std::nullopt;
  auto it = fits_.find(latent_pixels);
  if (it != fits_.end()) return Evaluate(it->second, rows, tome_rows);
  // The nearest size seen (in log pixels), scaled linearly by pixels.
  const Fit* best = nullptr;
  int64_t best_pixels = 0;
  double best_distance = 0;
  for (const auto& [pixels, fit] : fits_) {
    const double d = std::abs(std::log(static_cast<double>(pixels) / static_cast<double>(latent_pixels)));
    if (best == nullptr || d < best_distance) {
      best = &fit;
      best_pixels = pixels;
      best_distance = d;
    }
  }
  std::optional<double> t = Evaluate(*best, rows, tome_rows);
  if (!t) return std::nullopt;
  return *t * static_cast<double>(latent_pixels) / static_cast<double>(best_pixels);
}

int64_t StepTimeModel::observations() const {
  absl::MutexLock lock(&mu_);
  return observations_;
}

}  // namespace tomeserve::server
