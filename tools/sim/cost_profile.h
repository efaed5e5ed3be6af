// A device's measured costs for tomeserve-sim: UNet step seconds by latent size x rows x ToMe ratio, the
// host's per-step overhead, and per-call fixed costs (text encoding, decode, encode) by size. Loaded from a JSON
// profile (`tomeserve-sim calibrate` writes one) or built in (`h200-sd15-fp16`). Between measured points it
// interpolates linearly in rows and in the rows' mean ratio, and as a power law in latent pixels between
// measured sizes (attention grows with the square of the tokens, convolutions linearly: the measured exponent
// decides); outside them, the nearest segment extended. Immutable once built; safe to share across threads.
//
// JSON: {"name", "device", "source", "native": {"width", "height"}, "batch_cost_budget": rows x latent pixels,
//        "step_overhead_seconds": s, "step": [{"width", "height", "rows", "ratio", "seconds"}...],
//        "fixed": [{"width", "height", "call_seconds", "image_seconds"}...]}
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/step_cost.h"

namespace tomeserve::sim {

struct StepPoint {
  int width = 0, height = 0;
  int rows = 0;
  double ratio = 0;
  double seconds = 0;  // the UNet call alone (the device's part)
};
struct FixedPoint {
  int width = 0, height = 0;
  double call_seconds = 0;   // per call: text encoding and the rest outside the steps
  double image_seconds = 0;  // per image: VAE decode and image encoding
};

struct ProfileData {
  std::string name;
  std::string device;  // "cuda..." for a CUDA device ("cuda:0 fp16"; the replay then counts CUDA graphs)
  std::string source;
  int native_width = 512, native_height = 512;  // the server's warm-up size
  int64_t batch_cost_budget = 16 * 64 * 64;      // rows x latent pixels (the worker's budget on that device)
  double step_overhead_seconds = 0;              // host work per served step beyond the UNet call
  std::vector<StepPoint> steps;
  std::vector<FixedPoint> fixed;
};

absl::StatusOr<ProfileData> ParseProfile(const std::string& json, const std::string& origin);
std::string ProfileJson(const ProfileData& data);
// The built-in profiles' names.
std::vector<std::string> BuiltinProfiles();

class CostProfile : public server::StepCost {
 public:
  // Errors name what is missing (a size with no rows measured at ratio 0, ...).
  static absl::StatusOr<CostProfile> Create(ProfileData data);
  // A JSON file, or the name of a built-in profile. Errors name the file and the field.
  static absl::StatusOr<CostProfile> Load(const std::string& file_or_name);

  // The UNet call plus the host overhead per step: what a served step costs.
  std::optional<double> StepSeconds(std::string_view model, int64_t latent_pixels, int rows,
                                    double tome_rows) const override;
  // CallSeconds + images x ImageSeconds.
  double FixedSeconds(std::string_view model, int64_t latent_pixels, int images) const override;
  double CallSeconds(int64_t latent_pixels) const;   // text encoding: when the call starts
  double ImageSeconds(int64_t latent_pixels) const;  // decode + encode: when its last step ends
  // The UNet call alone.
  double UNetSeconds(int64_t latent_pixels, int rows, double tome_rows) const;

  const ProfileData& data() const { return data_; }

 private:
  explicit CostProfile(ProfileData data);
  // Per measured size (latent pixels), per ratio: (rows, seconds) ascending in rows.
  using Curve = std::vector<std::pair<int, double>>;
  std::map<int64_t, std::map<double, Curve>> steps_;
  std::map<int64_t, FixedPoint> fixed_;
  ProfileData data_;
};

}  // namespace tomeserve::sim
