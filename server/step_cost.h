// What a batch's work costs, as the batching policy asks it: the server's learned StepTimeModel (one per worker)
// and tomeserve-sim's measured CostProfile both answer. Implementations are safe for concurrent calls.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace tomeserve::server {

class StepCost {
 public:
  virtual ~StepCost() = default;
  // Seconds of one step of `model` (the UNet call, the noise-scheduler updates and the host work between
  // steps) over `rows` rows of `latent_pixels` each, `tome_rows` = sum of the rows' ToMe ratios; nullopt: not
  // known yet.
  virtual std::optional<double> StepSeconds(std::string_view model, int64_t latent_pixels, int rows,
                                            double tome_rows) const = 0;
  // Seconds a call of `images` images spends outside the denoising steps (text encoding, VAE decoding, image
  // encoding); 0 while unknown.
  virtual double FixedSeconds(std::string_view model, int64_t latent_pixels, int images) const = 0;
};

}  // namespace tomeserve::server
