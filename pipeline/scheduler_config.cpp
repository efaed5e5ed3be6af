#include "pipeline/scheduler_config.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pipeline/model_config.h"

namespace tomeserve::pipeline {
namespace {

using json = nlohmann::json;

constexpr std::pair<SchedulerKind, const char*> kKindNames[] = {
    {SchedulerKind::kPndm, "pndm"},        {SchedulerKind::kDdim, "ddim"},
    {SchedulerKind::kEuler, "euler"},      {SchedulerKind::kEulerAncestral, "euler_a"},
    {SchedulerKind::kDpmpp2m, "dpmpp_2m"}, {SchedulerKind::kDpmpp2mKarras, "dpmpp_2m_karras"},
};

absl::Status TypeError(const std::string& where, const char* key, const char* want) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": \"", key, "\" must be ", want));
}

// Optional readers: an absent key leaves `out` unset; null does too, except for booleans (null is falsy).
absl::Status Read(const json& j, const char* key, const std::string& where, std::optional<bool>* out) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  if (it->is_null()) {
    *out = false;
  } else if (it->is_boolean()) {
    *out = it->get<bool>();
  } else {
    return TypeError(where, key, "a boolean");
  }
  return absl::OkStatus();
}

absl::Status Read(const json& j, const char* key, const std::string& where, std::optional<int64_t>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number_integer()) return TypeError(where, key, "an integer");
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::Status Read(const json& j, const char* key, const std::string& where, std::optional<double>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return TypeError(where, key, "a number");
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status Read(const json& j, const char* key, const std::string& where, std::optional<std::string>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_string()) return TypeError(where, key, "a string");
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status Read(const json& j, const char* key, const std::string& where,
                  std::optional<std::vector<double>>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_array()) return TypeError(where, key, "a list of numbers");
  std::vector<double> values;
  for (const json& v : *it) {
    if (!v.is_number()) return TypeError(where, key, "a list of numbers");
    values.push_back(v.get<double>());
  }
  *out = std::move(values);
  return absl::OkStatus();
}

absl::Status Unsupported(SchedulerKind kind, absl::string_view key, absl::string_view value) {
  return absl::UnimplementedError(absl::StrCat("scheduler config: ", key, " = ", value,
                                               " is not supported by the ", SchedulerKindName(kind),
                                               " scheduler"));
}

// A boolean option the C++ schedulers only implement as false.
absl::Status RequireOff(SchedulerKind kind, const std::optional<bool>& value, absl::string_view key) {
  return value.value_or(false) ? Unsupported(kind, key, "true") : absl::OkStatus();
}

}  // namespace

absl::StatusOr<SchedulerKind> ParseSchedulerKind(absl::string_view name) {
  std::vector<std::string> known;
  for (const auto& [kind, text] : kKindNames) {
    if (name == text) return kind;
    known.push_back(text);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown scheduler \"", name, "\" (expected one of ", absl::StrJoin(known, ", "), ")"));
}

absl::string_view SchedulerKindName(SchedulerKind kind) {
  for (const auto& [k, text] : kKindNames) {
    if (k == kind) return text;
  }
  return "unknown";
}

absl::string_view A1111SamplerName(SchedulerKind kind) {
  switch (kind) {
    case SchedulerKind::kPndm: return "PLMS";
    case SchedulerKind::kDdim: return "DDIM";
    case SchedulerKind::kEuler: return "Euler";
    case SchedulerKind::kEulerAncestral: return "Euler a";
    case SchedulerKind::kDpmpp2m: return "DPM++ 2M";
    case SchedulerKind::kDpmpp2mKarras: return "DPM++ 2M Karras";
  }
  return "";
}

absl::StatusOr<SchedulerKind> SchedulerConfig::DefaultKind() const {
  if (class_name == "PNDMScheduler") return SchedulerKind::kPndm;
  if (class_name == "DDIMScheduler") return SchedulerKind::kDdim;
  if (class_name == "EulerDiscreteScheduler") return SchedulerKind::kEuler;
  if (class_name == "EulerAncestralDiscreteScheduler") return SchedulerKind::kEulerAncestral;
  if (class_name == "DPMSolverMultistepScheduler") {
    if (algorithm_type.value_or("dpmsolver++") != "dpmsolver++" || solver_order.value_or(2) != 2) {
      return absl::UnimplementedError(
          absl::StrCat("scheduler config: DPMSolverMultistepScheduler with algorithm_type ",
                       algorithm_type.value_or("dpmsolver++"), ", solver_order ", solver_order.value_or(2),
                       " is not supported (only dpmsolver++ order 2); name a scheduler"));
    }
    return use_karras_sigmas.value_or(false) ? SchedulerKind::kDpmpp2mKarras : SchedulerKind::kDpmpp2m;
  }
  return absl::UnimplementedError(
      absl::StrCat("scheduler config: _class_name \"", class_name,
                   "\" is not a supported scheduler; name one of pndm, ddim, euler, "
                   "euler_a, dpmpp_2m, dpmpp_2m_karras"));
}

absl::StatusOr<SchedulerConfig> SchedulerConfig::FromJson(const json& j, const std::string& where) {
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": expected a JSON object"));
  SchedulerConfig c;
  if (auto it = j.find("_class_name"); it != j.end() && it->is_string())
    c.class_name = it->get<std::string>();
  for (absl::Status s : {
           Read(j, "num_train_timesteps", where, &c.num_train_timesteps),
           Read(j, "beta_start", where, &c.beta_start),
           Read(j, "beta_end", where, &c.beta_end),
           Read(j, "beta_schedule", where, &c.beta_schedule),
           Read(j, "trained_betas", where, &c.trained_betas),
           Read(j, "prediction_type", where, &c.prediction_type),
           Read(j, "timestep_spacing", where, &c.timestep_spacing),
           Read(j, "steps_offset", where, &c.steps_offset),
           Read(j, "rescale_betas_zero_snr", where, &c.rescale_betas_zero_snr),
           Read(j, "thresholding", where, &c.thresholding),
           Read(j, "skip_prk_steps", where, &c.skip_prk_steps),
           Read(j, "set_alpha_to_one", where, &c.set_alpha_to_one),
           Read(j, "clip_sample", where, &c.clip_sample),
           Read(j, "clip_sample_range", where, &c.clip_sample_range),
           Read(j, "interpolation_type", where, &c.interpolation_type),
           Read(j, "timestep_type", where, &c.timestep_type),
           Read(j, "final_sigmas_type", where, &c.final_sigmas_type),
           Read(j, "use_karras_sigmas", where, &c.use_karras_sigmas),
           Read(j, "use_exponential_sigmas", where, &c.use_exponential_sigmas),
           Read(j, "use_beta_sigmas", where, &c.use_beta_sigmas),
           Read(j, "sigma_min", where, &c.sigma_min),
           Read(j, "sigma_max", where, &c.sigma_max),
           Read(j, "solver_order", where, &c.solver_order),
           Read(j, "algorithm_type", where, &c.algorithm_type),
           Read(j, "solver_type", where, &c.solver_type),
           Read(j, "variance_type", where, &c.variance_type),
           Read(j, "lower_order_final", where, &c.lower_order_final),
           Read(j, "euler_at_final", where, &c.euler_at_final),
           Read(j, "use_lu_lambdas", where, &c.use_lu_lambdas),
           Read(j, "use_flow_sigmas", where, &c.use_flow_sigmas),
           Read(j, "lambda_min_clipped", where, &c.lambda_min_clipped),
       }) {
    if (!s.ok()) return s;
  }
  return c;
}

absl::StatusOr<SchedulerConfig> SchedulerConfig::Load(const std::filesystem::path& config_json) {
  return LoadJsonConfig<SchedulerConfig>(config_json);
}

absl::StatusOr<SchedulerParams> ResolveSchedulerParams(const SchedulerConfig& c, SchedulerKind kind) {
  const bool pndm = kind == SchedulerKind::kPndm, ddim = kind == SchedulerKind::kDdim;
  const bool euler = kind == SchedulerKind::kEuler, euler_a = kind == SchedulerKind::kEulerAncestral;
  const bool dpm = kind == SchedulerKind::kDpmpp2m || kind == SchedulerKind::kDpmpp2mKarras;
  SchedulerParams p;
  p.kind = kind;
  p.num_train_timesteps = c.num_train_timesteps.value_or(1000);
  if (p.num_train_timesteps < 2) {
    return absl::InvalidArgumentError("scheduler config: num_train_timesteps must be at least 2");
  }
  p.beta_start = c.beta_start.value_or(0.0001);
  p.beta_end = c.beta_end.value_or(0.02);
  const std::string beta_schedule = c.beta_schedule.value_or("linear");
  if (c.trained_betas.has_value()) {
    if (static_cast<int64_t>(c.trained_betas->size()) != p.num_train_timesteps) {
      return absl::InvalidArgumentError(
          absl::StrCat("scheduler config: trained_betas has ", c.trained_betas->size(),
                       " values, num_train_timesteps is ", p.num_train_timesteps));
    }
    p.beta_schedule = BetaSchedule::kTrained;
    p.trained_betas = *c.trained_betas;
  } else if (beta_schedule == "linear") {
    p.beta_schedule = BetaSchedule::kLinear;
  } else if (beta_schedule == "scaled_linear") {
    p.beta_schedule = BetaSchedule::kScaledLinear;
  } else if (beta_schedule == "squaredcos_cap_v2") {
    p.beta_schedule = BetaSchedule::kSquaredCosCapV2;
  } else {
    return Unsupported(kind, "beta_schedule", beta_schedule);
  }

  const std::string prediction = c.prediction_type.value_or("epsilon");
  if (prediction == "epsilon") {
    p.prediction_type = PredictionType::kEpsilon;
  } else if (prediction == "v_prediction") {
    p.prediction_type = PredictionType::kVPrediction;
  } else {
    return Unsupported(kind, "prediction_type", prediction);
  }

  const std::string spacing = c.timestep_spacing.value_or(pndm || ddim ? "leading" : "linspace");
  if (spacing == "linspace") {
    p.timestep_spacing = TimestepSpacing::kLinspace;
  } else if (spacing == "leading") {
    p.timestep_spacing = TimestepSpacing::kLeading;
  } else if (spacing == "trailing") {
    p.timestep_spacing = TimestepSpacing::kTrailing;
  } else {
    return Unsupported(kind, "timestep_spacing", spacing);
  }
  p.steps_offset = c.steps_offset.value_or(0);
  if (p.steps_offset < 0)
    return absl::InvalidArgumentError("scheduler config: steps_offset must not be negative");

  // PNDM has no rescale_betas_zero_snr and ignores the key; every other scheduler here implements it as off
  // only.
  if (!pndm) {
    if (absl::Status s = RequireOff(kind, c.rescale_betas_zero_snr, "rescale_betas_zero_snr"); !s.ok())
      return s;
  }
  if (ddim || dpm) {
    if (absl::Status s = RequireOff(kind, c.thresholding, "thresholding"); !s.ok()) return s;
  }
  if (pndm) {
    if (!c.skip_prk_steps.value_or(false))
      return Unsupported(kind, "skip_prk_steps", "false (PRK warm-up steps)");
    p.set_alpha_to_one = c.set_alpha_to_one.value_or(false);
  }
  if (ddim) {
    p.set_alpha_to_one = c.set_alpha_to_one.value_or(true);
    p.clip_sample = c.clip_sample.value_or(true);
    p.clip_sample_range = c.clip_sample_range.value_or(1.0);
  }
  if (euler || dpm) {
    for (auto [key, value] : {std::pair{"use_exponential_sigmas", &c.use_exponential_sigmas},
                              std::pair{"use_beta_sigmas", &c.use_beta_sigmas}}) {
      if (absl::Status s = RequireOff(kind, *value, key); !s.ok()) return s;
    }
    p.sigma_min = c.sigma_min;
    p.sigma_max = c.sigma_max;
    const std::string final_sigmas = c.final_sigmas_type.value_or("zero");
    if (final_sigmas != "zero" && final_sigmas != "sigma_min")
      return Unsupported(kind, "final_sigmas_type", final_sigmas);
    p.final_sigma_min = final_sigmas == "sigma_min";
  }
  if (euler) {
    p.use_karras_sigmas = c.use_karras_sigmas.value_or(false);
    const std::string interpolation = c.interpolation_type.value_or("linear");
    if (interpolation != "linear") return Unsupported(kind, "interpolation_type", interpolation);
    const std::string timestep_type = c.timestep_type.value_or("discrete");
    if (timestep_type != "discrete" && p.prediction_type == PredictionType::kVPrediction) {
      return Unsupported(kind, "timestep_type", timestep_type);
    }
  }
  if (dpm) {
    p.use_karras_sigmas = kind == SchedulerKind::kDpmpp2mKarras;
    for (auto [key, value] :
         {std::pair{"use_lu_lambdas", &c.use_lu_lambdas}, std::pair{"use_flow_sigmas", &c.use_flow_sigmas}}) {
      if (absl::Status s = RequireOff(kind, *value, key); !s.ok()) return s;
    }
    // diffusers maps the UniPC/DEIS solver types onto midpoint.
    const std::string solver_type = c.solver_type.value_or("midpoint");
    if (solver_type == "heun") {
      p.solver_heun = true;
    } else if (solver_type != "midpoint" && solver_type != "logrho" && solver_type != "bh1" &&
               solver_type != "bh2") {
      return Unsupported(kind, "solver_type", solver_type);
    }
    if (c.variance_type == "learned" || c.variance_type == "learned_range") {
      return Unsupported(kind, "variance_type", *c.variance_type);
    }
    p.lower_order_final = c.lower_order_final.value_or(true);
    p.euler_at_final = c.euler_at_final.value_or(false);
    if (c.lambda_min_clipped.has_value()) p.lambda_min_clipped = *c.lambda_min_clipped;
  }
  return p;
}

}  // namespace tomeserve::pipeline
