#include "server/step_time_model.h"

#include <cmath>
#include <algorithm>
#include <cstdlib>
#include <vector>

namespace tomeserve::server {
namespace {

// Weight kept by older steps per new step: ~50 steps of memory.
constexpr double kForget = 0.98;
// Fixed costs per call: ~20 calls of memory.
constexpr double kForgetFixed = 0.95;
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

void StepTimeModel::Observe(std::string_view model, int64_t latent_pixels, int rows, double tome_rows,
                            double seconds) {
  if (rows <= 0 || !(seconds >= 0) || !std::isfinite(seconds)) return;
  const double x[3] = {1.0, static_cast<double>(rows), tome_rows};
  absl::MutexLock lock(&mu_);
  Fit& fit = fits_[Key(model, latent_pixels)];
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) fit.xx[i][j] = kForget * fit.xx[i][j] + x[i] * x[j];
    fit.xy[i] = kForget * fit.xy[i] + x[i] * seconds;
  }
  ++fit.n;
  ++observations_;
}

void StepTimeModel::ObserveFixed(std::string_view model, int64_t latent_pixels, int images, double seconds) {
  if (images <= 0 || !(seconds >= 0) || !std::isfinite(seconds)) return;
  absl::MutexLock lock(&mu_);
  Fit& fit = fits_[Key(model, latent_pixels)];
  fit.fixed_sum = kForgetFixed * fit.fixed_sum + seconds / images;
  fit.fixed_weight = kForgetFixed * fit.fixed_weight + 1.0;
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

template <typename F>
std::optional<double> StepTimeModel::Borrow(std::string_view model, int64_t latent_pixels, F value) const {
  // The model's sizes with a value, nearest first in log pixels.
  std::vector<std::pair<double, double>> seen;  // (log pixels, log value)
  for (auto it = fits_.lower_bound(Key(model, 0)); it != fits_.end() && it->first.first == model; ++it) {
    std::optional<double> v = value(it->second);
    if (!v || *v <= 0) continue;
    if (it->first.second == latent_pixels) return v;
    seen.emplace_back(std::log(static_cast<double>(it->first.second)), std::log(*v));
  }
  if (seen.empty()) return std::nullopt;
  const double x = std::log(static_cast<double>(latent_pixels));
  std::sort(seen.begin(), seen.end(),
            [x](const auto& a, const auto& b) { return std::abs(a.first - x) < std::abs(b.first - x); });
  double exponent = kSizeExponent;
  if (seen.size() >= 2 && std::abs(seen[1].first - seen[0].first) > 1e-9) {
    // Between two seen sizes (or beyond them): the power law through the nearest two, clamped to a sane range.
    exponent = std::clamp((seen[1].second - seen[0].second) / (seen[1].first - seen[0].first), 0.3, 2.0);
  }
  return std::exp(seen[0].second + exponent * (x - seen[0].first));
}

std::optional<double> StepTimeModel::StepSeconds(std::string_view model, int64_t latent_pixels, int rows,
                                                 double tome_rows) const {
  absl::MutexLock lock(&mu_);
  // Borrowed sizes scale the same batch (rows and mean ratio) from the seen sizes' fits.
  return Borrow(model, latent_pixels, [&](const Fit& f) { return Evaluate(f, rows, tome_rows); });
}

double StepTimeModel::FixedSeconds(std::string_view model, int64_t latent_pixels, int images) const {
  absl::MutexLock lock(&mu_);
  std::optional<double> per_image = Borrow(model, latent_pixels, [](const Fit& f) -> std::optional<double> {
    if (f.fixed_weight <= 0) return std::nullopt;
    return f.fixed_sum / f.fixed_weight;
  });
  return per_image.value_or(0.0) * images;
}

int64_t StepTimeModel::observations() const {
  absl::MutexLock lock(&mu_);
  return observations_;
}

}  // namespace tomeserve::server
