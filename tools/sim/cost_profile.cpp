#include "tools/sim/cost_profile.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "server/step_time_model.h"

namespace tomeserve::sim {
namespace {

int64_t LatentPixels(int width, int height) { return static_cast<int64_t>(width / 8) * (height / 8); }

// Piecewise linear through (x, y) points sorted by x; outside them the nearest segment extended, never below a
// fifth of the nearest point. One point: proportional to x (a line through the origin).
double Piecewise(const std::vector<std::pair<double, double>>& p, double x) {
  if (p.size() == 1) return p[0].second * x / p[0].first;
  size_t i = 1;
  while (i + 1 < p.size() && x > p[i].first) ++i;
  const auto [x0, y0] = p[i - 1];
  const auto [x1, y1] = p[i];
  if (x1 == x0) return y1;
  const double y = y0 + (y1 - y0) * (x - x0) / (x1 - x0);
  const double nearest = x < x0 ? y0 : (x > x1 ? y1 : std::min(y0, y1));
  return std::max(y, 0.2 * nearest);
}

// A value known at some sizes (latent pixels), at `pixels`: measured, or a power law through the nearest two
// measured sizes (the prior exponent with one).
template <typename F>
double BySize(const std::vector<int64_t>& sizes, int64_t pixels, F at) {
  if (std::find(sizes.begin(), sizes.end(), pixels) != sizes.end()) return at(pixels);
  std::vector<int64_t> near = sizes;
  const double x = std::log(static_cast<double>(pixels));
  std::sort(near.begin(), near.end(), [x](int64_t a, int64_t b) {
    return std::abs(std::log(static_cast<double>(a)) - x) < std::abs(std::log(static_cast<double>(b)) - x);
  });
  const double x0 = std::log(static_cast<double>(near[0]));
  const double y0 = at(near[0]);
  double exponent = server::kSizeExponent;
  if (near.size() >= 2 && y0 > 0 && at(near[1]) > 0) {
    exponent = std::clamp((std::log(at(near[1])) - std::log(y0)) / (std::log(static_cast<double>(near[1])) - x0),
                          0.3, 2.5);
  }
  return y0 * std::exp(exponent * (x - x0));
}

// Built in: SD 1.5 architecture, fp16, NVIDIA H200, from docs/benchmarks.md "GPU: NVIDIA H200", run 1
// (2026-11-30, commit c72669c). Every number is a measured cell or derived from two, as noted.
ProfileData H200Sd15Fp16() {
  ProfileData d{.name = "h200-sd15-fp16",
                .device = "cuda (NVIDIA H200, 143771 MiB), torch 2.11.0+cu130, fp16",
                .source = "docs/benchmarks.md, GPU: NVIDIA H200, run 1 (2026-11-30, commit c72669c)"};
  // The worker's derived CUDA budget: 0.8 x (free memory after the fp16 weights, ~141 GB) / 256 KiB per row x
  // latent pixel (worker.cpp); it binds only past 8 images at 1024².
  d.batch_cost_budget = 430000;
  // Served minus benchmarked step: the served sd15 512² 25-step calls took 43 ms per step (1 image; 58 ms for
  // 4) against 13.9 ms (28.6 ms) for the same UNet call in tomeserve-bench: 29 ms of host work per step.
  d.step_overhead_seconds = 0.029;
  // UNet call medians, tomeserve column: "sd15 UNet batch 1" (rows 2: one image with CFG) and "sd15 UNet batch
  // 4" (rows 8). Rows between and beyond are interpolated linearly (CostProfile).
  d.steps = {{512, 512, 2, 0.0, 0.0139},    {512, 512, 2, 0.5, 0.0244},    {768, 768, 2, 0.0, 0.0240},
             {768, 768, 2, 0.5, 0.0265},    {1024, 1024, 2, 0.0, 0.0407},  {1024, 1024, 2, 0.5, 0.0369},
             {512, 512, 8, 0.0, 0.0286},    {512, 512, 8, 0.5, 0.0311},    {768, 768, 8, 0.0, 0.0669},
             {768, 768, 8, 0.5, 0.0613},    {1024, 1024, 8, 0.0, 0.1378},  {1024, 1024, 8, 0.5, 0.1092}};
  // Fixed costs. 512²: the served calls' end to end minus denoising, 0.059 s (1 image) and 0.090 s (4 images):
  // 0.0487 s per call + 0.0103 s per image. 1024²: "sd15 ToMe end to end 1024" (1.1776 s, 25 steps) minus 25 x
  // 40.7 ms is 0.160 s outside the steps, against 0.032 s at 512² ("sd15 end to end", 0.7271 s - 50 x 13.9 ms):
  // the 0.128 s difference is taken as per-image decode (the VAE's mid-block attention is quadratic), 0.138 s.
  // 768² is interpolated as a power law between them (not measured).
  d.fixed = {{512, 512, 0.0487, 0.0103}, {1024, 1024, 0.0487, 0.138}};
  return d;
}

}  // namespace

std::vector<std::string> BuiltinProfiles() { return {"h200-sd15-fp16"}; }

absl::StatusOr<ProfileData> ParseProfile(const std::string& text, const std::string& origin) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(origin, ": not a JSON object"));
  ProfileData d;
  try {
    d.name = j.value("name", origin);
    d.device = j.value("device", "");
    d.source = j.value("source", "");
    if (j.contains("native")) {
      d.native_width = j["native"].at("width").get<int>();
      d.native_height = j["native"].at("height").get<int>();
    }
    d.batch_cost_budget = j.value("batch_cost_budget", d.batch_cost_budget);
    d.step_overhead_seconds = j.value("step_overhead_seconds", 0.0);
    for (const auto& s : j.at("step")) {
      d.steps.push_back({s.at("width").get<int>(), s.at("height").get<int>(), s.at("rows").get<int>(),
                         s.value("ratio", 0.0), s.at("seconds").get<double>()});
    }
    for (const auto& f : j.value("fixed", nlohmann::json::array())) {
      d.fixed.push_back({f.at("width").get<int>(), f.at("height").get<int>(), f.value("call_seconds", 0.0),
                         f.value("image_seconds", 0.0)});
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": ", e.what()));
  }
  return d;
}

std::string ProfileJson(const ProfileData& d) {
  nlohmann::json j = {{"name", d.name},
                      {"device", d.device},
                      {"source", d.source},
                      {"native", {{"width", d.native_width}, {"height", d.native_height}}},
                      {"batch_cost_budget", d.batch_cost_budget},
                      {"step_overhead_seconds", d.step_overhead_seconds},
                      {"step", nlohmann::json::array()},
                      {"fixed", nlohmann::json::array()}};
  for (const StepPoint& s : d.steps) {
    j["step"].push_back(
        {{"width", s.width}, {"height", s.height}, {"rows", s.rows}, {"ratio", s.ratio}, {"seconds", s.seconds}});
  }
  for (const FixedPoint& f : d.fixed) {
    j["fixed"].push_back({{"width", f.width},
                          {"height", f.height},
                          {"call_seconds", f.call_seconds},
                          {"image_seconds", f.image_seconds}});
  }
  return j.dump(2) + "\n";
}

absl::StatusOr<CostProfile> CostProfile::Create(ProfileData data) {
  const std::string& n = data.name;
  if (data.steps.empty()) return absl::InvalidArgumentError(absl::StrCat("profile ", n, ": no \"step\" points"));
  for (const StepPoint& s : data.steps) {
    if (s.width <= 0 || s.height <= 0 || s.rows <= 0 || !(s.seconds > 0) || s.ratio < 0 || s.ratio >= 1) {
      return absl::InvalidArgumentError(absl::StrCat("profile ", n, ": step point ", s.width, "x", s.height,
                                                     " rows ", s.rows, " ratio ", s.ratio, ": needs width, "
                                                     "height, rows > 0, ratio in [0, 1) and seconds > 0"));
    }
  }
  if (data.batch_cost_budget <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("profile ", n, ": batch_cost_budget must be > 0"));
  }
  CostProfile p(std::move(data));
  for (const auto& [pixels, by_ratio] : p.steps_) {
    if (!by_ratio.contains(0.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("profile ", n, ": a size with ", pixels, " latent pixels has no step measured at ratio 0"));
    }
  }
  return p;
}

absl::StatusOr<CostProfile> CostProfile::Load(const std::string& file_or_name) {
  if (file_or_name == "h200-sd15-fp16") return Create(H200Sd15Fp16());
  std::ifstream in(file_or_name);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("--profile ", file_or_name, ": no such file and not a built-in "
                                            "profile (built in: h200-sd15-fp16)"));
  }
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<ProfileData> data = ParseProfile(text.str(), file_or_name);
  if (!data.ok()) return data.status();
  return Create(*std::move(data));
}

CostProfile::CostProfile(ProfileData data) : data_(std::move(data)) {
  for (const StepPoint& s : data_.steps) {
    steps_[LatentPixels(s.width, s.height)][s.ratio].emplace_back(s.rows, s.seconds);
  }
  for (auto& [pixels, by_ratio] : steps_) {
    for (auto& [ratio, curve] : by_ratio) std::sort(curve.begin(), curve.end());
  }
  for (const FixedPoint& f : data_.fixed) fixed_[LatentPixels(f.width, f.height)] = f;
}

double CostProfile::UNetSeconds(int64_t latent_pixels, int rows, double tome_rows) const {
  const double mean_ratio = rows > 0 ? tome_rows / rows : 0.0;
  std::vector<int64_t> sizes;
  for (const auto& [pixels, by_ratio] : steps_) sizes.push_back(pixels);
  return BySize(sizes, latent_pixels, [&](int64_t pixels) {
    const auto& by_ratio = steps_.at(pixels);
    std::vector<std::pair<double, double>> over_ratio;  // (ratio, seconds at these rows)
    for (const auto& [ratio, curve] : by_ratio) {
      std::vector<std::pair<double, double>> pts;
      for (const auto& [r, s] : curve) pts.emplace_back(r, s);
      over_ratio.emplace_back(ratio, Piecewise(pts, rows));
    }
    if (over_ratio.size() == 1) return over_ratio[0].second;  // no ToMe measured: merging changes nothing
    return Piecewise(over_ratio, mean_ratio);
  });
}

std::optional<double> CostProfile::StepSeconds(std::string_view, int64_t latent_pixels, int rows,
                                               double tome_rows) const {
  return UNetSeconds(latent_pixels, rows, tome_rows) + data_.step_overhead_seconds;
}

double CostProfile::CallSeconds(int64_t latent_pixels) const {
  if (fixed_.empty()) return 0;
  std::vector<int64_t> sizes;
  for (const auto& [pixels, f] : fixed_) sizes.push_back(pixels);
  return BySize(sizes, latent_pixels, [&](int64_t p) { return fixed_.at(p).call_seconds; });
}

double CostProfile::ImageSeconds(int64_t latent_pixels) const {
  if (fixed_.empty()) return 0;
  std::vector<int64_t> sizes;
  for (const auto& [pixels, f] : fixed_) sizes.push_back(pixels);
  return BySize(sizes, latent_pixels, [&](int64_t p) { return fixed_.at(p).image_seconds; });
}

double CostProfile::FixedSeconds(std::string_view, int64_t latent_pixels, int images) const {
  return CallSeconds(latent_pixels) + images * ImageSeconds(latent_pixels);
}

}  // namespace tomeserve::sim
