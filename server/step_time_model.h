// What one denoising step and a call's fixed work cost on ONE worker, learned from that worker's own steps
// (host-inclusive: the step's wall time on the worker thread, scheduler updates and the host gap included),
// for the batching policy (joining, the SLO ratio controller, deadline refusal) and queue estimates.
//
// Model, per (model, latent size): step seconds = a + b * rows + c * tome_rows, where rows are the UNet input
// rows of the call and tome_rows = sum over rows of their ToMe ratio (c < 0 when merging saves time). Fitted by
// exponentially weighted least squares (recent steps count most; the machine's speed drifts) with a small ridge
// that pulls c to 0 until steps at more than one ratio have been seen. A size never seen borrows from the sizes
// seen of that model: between two, interpolated as a power law in latent pixels; beyond them, the nearest two's
// exponent; with one, the prior exponent kSizeExponent (attention's cost grows with the square of the tokens,
// the convolutions' linearly). Fixed seconds per call (text encoding, decode, encode) are an exponentially
// weighted mean per image and (model, size), borrowed the same way.
//
// Thread-safe: its worker Observe()s on its thread, the scheduler and service read on theirs.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/step_cost.h"

namespace tomeserve::server {

// Step cost ~ latent_pixels ^ kSizeExponent when only one size is known.
inline constexpr double kSizeExponent = 1.2;

class StepTimeModel : public StepCost {
 public:
  // One step over `rows` rows of `latent_pixels` each took `seconds`; `tome_rows` = sum of the rows' ratios.
  void Observe(std::string_view model, int64_t latent_pixels, int rows, double tome_rows, double seconds);
  // A call of `images` images spent `seconds` outside its steps.
  void ObserveFixed(std::string_view model, int64_t latent_pixels, int images, double seconds);

  std::optional<double> StepSeconds(std::string_view model, int64_t latent_pixels, int rows,
                                    double tome_rows) const override;
  double FixedSeconds(std::string_view model, int64_t latent_pixels, int images) const override;
  // Steps observed so far (all sizes).
  int64_t observations() const;

 private:
  struct Fit {
    // Weighted normal equations over features (1, rows, tome_rows): sums of x x^T and x y.
    double xx[3][3] = {};
    double xy[3] = {};
    int64_t n = 0;
    // Fixed seconds per image: weighted sum and weight.
    double fixed_sum = 0, fixed_weight = 0;
  };
  using Key = std::pair<std::string, int64_t>;  // (model, latent pixels)
  static std::optional<double> Evaluate(const Fit& fit, int rows, double tome_rows);
  // `value` of a size's fit at the queried size: its own, or borrowed from the model's seen sizes.
  template <typename F>
  std::optional<double> Borrow(std::string_view model, int64_t latent_pixels, F value) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::map<Key, Fit, std::less<>> fits_ ABSL_GUARDED_BY(mu_);
  int64_t observations_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tomeserve::server
