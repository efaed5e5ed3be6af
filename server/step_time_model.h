// What one UNet step costs, learned from the workers' own steps, for admission (deadline refusal), queue
// estimates and the SLO ratio controller.
//
// Model, per latent size (latent pixels): seconds = a + b * rows + c * tome_rows, where rows are the UNet
// input rows of the call and tome_rows = sum over rows of their ToMe ratio (c < 0 when merging saves time).
// Fitted by exponentially weighted least squares (recent steps count most; the machine's speed drifts) with a
// small ridge that pulls c to 0 until steps at more than one ratio have been seen. A size never seen borrows
// the nearest seen size's fit scaled by the pixel ratio; nothing seen at all: no prediction.
//
// Thread-safe: workers Observe() on their threads, the scheduler and service Predict() on theirs.
#pragma once

#include <cstdint>
#include <map>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tomeserve::server {

class StepTimeModel {
 public:
  // One UNet step (call + scheduler updates) over `rows` rows of `latent_pixels` each took `seconds`;
  // `tome_rows` = sum of the rows' ToMe ratios.
  void Observe(int64_t latent_pixels, int rows, double tome_rows, double seconds);
  // Predicted seconds of one such step; nullopt before any step was observed.
  std::optional<double> Predict(int64_t latent_pixels, int rows, double tome_rows) const;
  // Steps observed so far (all sizes).
  int64_t observations() const;

 private:
  struct Fit {
    // Weighted normal equations over features (1, rows, tome_rows): sums of x x^T and x y.
    double xx[3][3] = {};
    double xy[3] = {};
    int64_t n = 0;
  };
  static std::optional<double> Evaluate(const Fit& fit, int rows, double tome_rows);

  mutable absl::Mutex mu_;
  std::map<int64_t, Fit> fits_ ABSL_GUARDED_BY(mu_);  // by latent pixels
  int64_t observations_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tomeserve::server
