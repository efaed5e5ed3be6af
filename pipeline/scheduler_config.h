// Which sampler runs a request, and the scheduler/scheduler_config.json values it reads. Torch-free.
//
// Switching schedulers follows diffusers' `XScheduler.from_config(pipe.scheduler.config)`: a key written in
// the file is used by whichever scheduler runs; a key the file lacks takes the default of the scheduler that
// runs (not of the file's `_class_name`). So SchedulerConfig keeps every key optional, and
// ResolveSchedulerParams() fills the gaps with the chosen scheduler's defaults.
#pragma once

#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {

enum class SchedulerKind {
  kPndm,            // PNDMScheduler (PLMS, skip_prk_steps): the SD 1.x default
  kDdim,            // DDIMScheduler, eta = 0
  kEuler,           // EulerDiscreteScheduler
  kEulerAncestral,  // EulerAncestralDiscreteScheduler (stochastic: draws noise every step)
  kDpmpp2m,         // DPMSolverMultistepScheduler, dpmsolver++, solver_order 2
  kDpmpp2mKarras,   // the same with use_karras_sigmas
};

// "pndm" | "ddim" | "euler" | "euler_a" | "dpmpp_2m" | "dpmpp_2m_karras".
absl::StatusOr<SchedulerKind> ParseSchedulerKind(absl::string_view name);
// The inverse of ParseSchedulerKind.
absl::string_view SchedulerKindName(SchedulerKind kind);
// The sampler's name as AUTOMATIC1111 writes it in a PNG's "parameters" chunk ("PLMS" for diffusers' PNDM,
// "Euler a", "DPM++ 2M Karras", ...), so tools that read A1111 metadata recognise it.
absl::string_view A1111SamplerName(SchedulerKind kind);

// scheduler_config.json as written. Absent keys (and null, for non-boolean keys) stay unset; a null boolean
// reads as false, as Python's truth test does. Keys no supported scheduler reads are ignored.
struct SchedulerConfig {
  std::string class_name;  // "_class_name"

  std::optional<int64_t> num_train_timesteps;
  std::optional<double> beta_start;
  std::optional<double> beta_end;
  std::optional<std::string> beta_schedule;
  std::optional<std::vector<double>> trained_betas;
  std::optional<std::string> prediction_type;
  std::optional<std::string> timestep_spacing;
  std::optional<int64_t> steps_offset;
  std::optional<bool> rescale_betas_zero_snr;
  std::optional<bool> thresholding;
  // PNDM / DDIM
  std::optional<bool> skip_prk_steps;
  std::optional<bool> set_alpha_to_one;
  std::optional<bool> clip_sample;
  std::optional<double> clip_sample_range;
  // Euler / DPM-Solver
  std::optional<std::string> interpolation_type;
  std::optional<std::string> timestep_type;
  std::optional<std::string> final_sigmas_type;
  std::optional<bool> use_karras_sigmas;
  std::optional<bool> use_exponential_sigmas;
  std::optional<bool> use_beta_sigmas;
  std::optional<double> sigma_min;
  std::optional<double> sigma_max;
  // DPM-Solver
  std::optional<int64_t> solver_order;
  std::optional<std::string> algorithm_type;
  std::optional<std::string> solver_type;
  std::optional<std::string> variance_type;
  std::optional<bool> lower_order_final;
  std::optional<bool> euler_at_final;
  std::optional<bool> use_lu_lambdas;
  std::optional<bool> use_flow_sigmas;
  std::optional<double> lambda_min_clipped;

  // The kind that runs when a request names none: from `_class_name` (DPMSolverMultistepScheduler gives the
  // Karras variant when use_karras_sigmas is set). Other classes, and DPM-Solver configs that are not 2M
  // dpmsolver++, are an error that names them.
  absl::StatusOr<SchedulerKind> DefaultKind() const;

  // Type errors (a string where a number belongs, ...) name `where` and the key.
  static absl::StatusOr<SchedulerConfig> FromJson(const nlohmann::json& j, const std::string& where);
  static absl::StatusOr<SchedulerConfig> Load(const std::filesystem::path& config_json);
};

enum class BetaSchedule { kLinear, kScaledLinear, kSquaredCosCapV2, kTrained };
enum class PredictionType { kEpsilon, kVPrediction };
enum class TimestepSpacing { kLinspace, kLeading, kTrailing };

// The values one scheduler class runs with, after from_config: file values, else that class's __init__
// defaults, with the kind's own settings on top (DPM++ 2M fixes algorithm_type, solver_order and
// use_karras_sigmas).
struct SchedulerParams {
  SchedulerKind kind = SchedulerKind::kPndm;
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  BetaSchedule beta_schedule = BetaSchedule::kLinear;
  std::vector<double> trained_betas;  // kTrained only
  PredictionType prediction_type = PredictionType::kEpsilon;
  TimestepSpacing timestep_spacing = TimestepSpacing::kLeading;
  int64_t steps_offset = 0;
  bool set_alpha_to_one = false;    // PNDM, DDIM
  bool clip_sample = false;         // DDIM
  double clip_sample_range = 1.0;   // DDIM
  bool use_karras_sigmas = false;   // Euler, DPM
  std::optional<double> sigma_min;  // Karras sigma range; unset: the schedule's own
  std::optional<double> sigma_max;
  bool final_sigma_min = false;   // Euler, DPM: final_sigmas_type "sigma_min" (else "zero")
  bool solver_heun = false;       // DPM: solver_type "heun" (else "midpoint")
  bool lower_order_final = true;  // DPM
  bool euler_at_final = false;    // DPM
  double lambda_min_clipped = -std::numeric_limits<double>::infinity();  // DPM

  bool operator==(const SchedulerParams&) const = default;
};

// Fills defaults for `kind` and rejects what the C++ schedulers do not implement (PRK steps, thresholding,
// rescale_betas_zero_snr, exponential/beta/lu/flow sigmas, ...) with an error that names the key.
absl::StatusOr<SchedulerParams> ResolveSchedulerParams(const SchedulerConfig& config, SchedulerKind kind);

}  // namespace tomeserve::pipeline
