// The scheduler factory, SamplerState::Step's checks, and the tables and numpy-equivalent helpers the
// schedulers share.
#include "pipeline/scheduler.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pipeline/torch_status.h"

namespace tomeserve::pipeline {

absl::StatusOr<std::shared_ptr<const NoiseSchedule>> NoiseSchedule::Create(const SchedulerConfig& config,
                                                                           SchedulerKind kind,
                                                                           int num_inference_steps) {
  absl::StatusOr<SchedulerParams> params = ResolveSchedulerParams(config, kind);
  if (!params.ok()) return params.status();
  return Create(*params, num_inference_steps);
}

absl::StatusOr<std::shared_ptr<const NoiseSchedule>> NoiseSchedule::Create(const SchedulerParams& params,
                                                                           int num_inference_steps) {
  if (num_inference_steps < 1 || num_inference_steps > params.num_train_timesteps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_inference_steps must be in [1, ", params.num_train_timesteps, "], got ", num_inference_steps));
  }
  return GuardTorch("scheduler setup", [&]() -> absl::StatusOr<std::shared_ptr<const NoiseSchedule>> {
    switch (params.kind) {
      case SchedulerKind::kPndm:
        return scheduler_internal::CreatePndm(params, num_inference_steps);
      case SchedulerKind::kDdim:
        return scheduler_internal::CreateDdim(params, num_inference_steps);
      case SchedulerKind::kEuler:
      case SchedulerKind::kEulerAncestral:
        return scheduler_internal::CreateEuler(params, num_inference_steps);
      case SchedulerKind::kDpmpp2m:
      case SchedulerKind::kDpmpp2mKarras:
        return scheduler_internal::CreateDpmpp(params, num_inference_steps);
    }
    return absl::InvalidArgumentError("unknown scheduler kind");
  });
}

at::Tensor NoiseSchedule::ScaleInitialNoise(const at::Tensor& noise) const {
  // diffusers multiplies by a float32 0-dim tensor (Euler) or the float 1.0 (the others); both give this.
  return noise * scheduler_internal::F32(init_noise_sigma_);
}

std::unique_ptr<SamplerState> NewSamplerState(std::shared_ptr<const NoiseSchedule> schedule) {
  const NoiseSchedule* raw = schedule.get();
  return raw->NewState(std::move(schedule));
}

absl::StatusOr<at::Tensor> SamplerState::Step(const at::Tensor& model_output, const at::Tensor& sample,
                                              at::Generator* noise_gen) {
  if (failed_) return absl::FailedPreconditionError("scheduler step: an earlier step of this sample failed");
  if (done()) {
    return absl::FailedPreconditionError(
        absl::StrCat("scheduler step: all ", schedule_->num_calls(), " steps are done"));
  }
  if (!model_output.defined() || !sample.defined() || model_output.sizes() != sample.sizes()) {
    return absl::InvalidArgumentError(
        "scheduler step: model_output and sample must be tensors of the same shape");
  }
  if (!at::isFloatingType(model_output.scalar_type()) || !at::isFloatingType(sample.scalar_type())) {
    return absl::InvalidArgumentError("scheduler step: model_output and sample must be floating point");
  }
  if (schedule_->stochastic()) {
    if (noise_gen == nullptr || !noise_gen->defined() || noise_gen->device().type() != c10::kCPU) {
      return absl::InvalidArgumentError(absl::StrCat("scheduler step: ", SchedulerKindName(schedule_->kind()),
                                                     " draws noise and needs the sample's CPU generator"));
    }
  }
  absl::StatusOr<at::Tensor> next = GuardTorch("scheduler step", [&]() -> absl::StatusOr<at::Tensor> {
    return StepImpl(model_output, sample, step_index_, noise_gen);
  });
  if (!next.ok()) {
    failed_ = true;
    return next.status();
  }
  ++step_index_;
  return next;
}

absl::StatusOr<at::Tensor> SamplerState::StepTogether(const std::vector<SamplerState*>& states,
                                                      const at::Tensor& model_output, const at::Tensor& sample,
                                                      const std::vector<at::Generator*>& noise_gens) {
  const auto n = static_cast<int64_t>(states.size());
  if (n == 0 || static_cast<int64_t>(noise_gens.size()) != n) {
    return absl::InvalidArgumentError("scheduler step: one generator per state, and at least one state");
  }
  if (n == 1) return states[0]->Step(model_output, sample, noise_gens[0]);
  SamplerState& first = *states[0];
  const std::vector<at::Tensor*> first_history = first.History();
  for (SamplerState* s : states) {
    const std::vector<at::Tensor*> h = s->History();
    bool alike = s->schedule_->SameAs(*first.schedule_) && s->step_index_ == first.step_index_ &&
                 !s->failed_ && h.size() == first_history.size();
    for (size_t i = 0; alike && i < h.size(); ++i) alike = h[i]->defined() == first_history[i]->defined();
    if (!alike) {
      return absl::InvalidArgumentError(
          "scheduler step: states stepped together must share their schedule, step index and history layout");
    }
  }
  if (!model_output.defined() || model_output.dim() == 0 || model_output.size(0) != n) {
    return absl::InvalidArgumentError(absl::StrCat("scheduler step: ", n, " states need ", n, " stacked rows"));
  }
  if (first.schedule_->stochastic()) {
    for (at::Generator* g : noise_gens) {
      if (g == nullptr || !g->defined() || g->device().type() != c10::kCPU) {
        return absl::InvalidArgumentError(absl::StrCat("scheduler step: ", SchedulerKindName(first.schedule_->kind()),
                                                       " draws noise and needs each sample's CPU generator"));
      }
    }
  }
  // A state holding every member's history stacked in order; it takes the step, then each member takes its rows.
  std::unique_ptr<SamplerState> stacked = NewSamplerState(first.schedule_);
  absl::Status stacking = GuardTorch("stacking scheduler states", [&]() -> absl::Status {
    stacked->step_index_ = first.step_index_;
    stacked->CopyHistoryFrom(first);
    const std::vector<at::Tensor*> h = stacked->History();
    for (size_t i = 0; i < h.size(); ++i) {
      if (!h[i]->defined()) continue;
      std::vector<at::Tensor> rows;
      for (SamplerState* s : states) rows.push_back(*s->History()[i]);
      *h[i] = at::cat(rows);
    }
    stacked->row_gens_ = noise_gens;
    return absl::OkStatus();
  });
  absl::StatusOr<at::Tensor> next =
      stacking.ok() ? stacked->Step(model_output, sample, noise_gens[0]) : absl::StatusOr<at::Tensor>(stacking);
  absl::Status split = next.status();
  if (split.ok()) {
    split = GuardTorch("splitting scheduler states", [&]() -> absl::Status {
      for (int64_t j = 0; j < n; ++j) {
        SamplerState& s = *states[j];
        s.CopyHistoryFrom(*stacked);
        for (at::Tensor* t : s.History()) {
          if (t->defined()) *t = t->narrow(0, j, 1);
        }
        s.step_index_ = stacked->step_index_;
      }
      return absl::OkStatus();
    });
  }
  if (!split.ok()) {
    for (SamplerState* s : states) s->failed_ = true;
    return split;
  }
  return next;
}

at::Tensor SamplerState::Noise(const at::Tensor& like, at::Generator* gen) const {
  const auto options = at::TensorOptions().dtype(like.scalar_type());
  if (row_gens_.empty()) return at::randn(like.sizes(), *gen, options);
  std::vector<int64_t> row = like.sizes().vec();
  row[0] = 1;
  std::vector<at::Tensor> rows;
  for (at::Generator* g : row_gens_) rows.push_back(at::randn(row, *g, options));
  return at::cat(rows);
}

namespace scheduler_internal {

at::Tensor F32(double value) { return at::scalar_tensor(value, at::TensorOptions().dtype(at::kFloat)); }

at::Tensor AlphasCumprod(const SchedulerParams& p) {
  const int64_t n = p.num_train_timesteps;
  at::Tensor betas;
  switch (p.beta_schedule) {
    case BetaSchedule::kTrained:
      betas = at::tensor(p.trained_betas, at::kDouble).to(at::kFloat);
      break;
    case BetaSchedule::kLinear:
      betas = at::linspace(p.beta_start, p.beta_end, n, at::kFloat);
      break;
    case BetaSchedule::kScaledLinear:
      betas = at::pow(at::linspace(std::pow(p.beta_start, 0.5), std::pow(p.beta_end, 0.5), n, at::kFloat), 2);
      break;
    case BetaSchedule::kSquaredCosCapV2: {
      // betas_for_alpha_bar with the cosine transform, in float64 like diffusers' Python loop.
      auto alpha_bar = [](double t) {
        return std::pow(std::cos((t + 0.008) / 1.008 * std::numbers::pi / 2), 2.0);
      };
      std::vector<double> values(n);
      for (int64_t i = 0; i < n; ++i) {
        const double t1 = static_cast<double>(i) / n, t2 = static_cast<double>(i + 1) / n;
        values[i] = std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999);
      }
      betas = at::tensor(values, at::kDouble).to(at::kFloat);
      break;
    }
  }
  return at::cumprod(1.0 - betas, 0);
}

std::vector<double> NpLinspace(double start, double stop, int64_t num) {
  std::vector<double> y(std::max<int64_t>(num, 0));
  const double delta = stop - start;
  const int64_t div = num - 1;
  const double step = div > 0 ? delta / div : 0.0;
  for (int64_t i = 0; i < num; ++i) {
    double v = static_cast<double>(i);
    if (div <= 0) {
      v = v * delta;
    } else if (step == 0) {
      v = v / div * delta;
    } else {
      v = v * step;
    }
    y[i] = v + start;
  }
  if (num > 1) y[num - 1] = stop;
  return y;
}

std::vector<double> NpArange(double start, double stop, double step) {
  const double len = std::ceil((stop - start) / step);
  std::vector<double> y;
  if (!(len > 0)) return y;
  y.resize(static_cast<size_t>(len));
  // numpy writes start and start + step, then fills the rest from their difference.
  y[0] = start;
  if (y.size() > 1) {
    const double second = start + step;
    const double delta = second - start;
    y[1] = second;
    for (size_t i = 2; i < y.size(); ++i) y[i] = start + static_cast<double>(i) * delta;
  }
  return y;
}

double NpRound(double x) { return std::nearbyint(x); }

double NpInterp(double x, const std::vector<float>& fp) {
  const int64_t n = static_cast<int64_t>(fp.size());
  if (std::isnan(x)) return x;
  if (x < 0) return fp.front();
  if (x >= static_cast<double>(n - 1)) return fp.back();
  const int64_t j = static_cast<int64_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  const double slope = (static_cast<double>(fp[j + 1]) - static_cast<double>(fp[j])) / 1.0;
  double result = slope * (x - static_cast<double>(j)) + static_cast<double>(fp[j]);
  if (std::isnan(result)) {
    result = slope * (x - static_cast<double>(j + 1)) + static_cast<double>(fp[j + 1]);
    if (std::isnan(result) && fp[j] == fp[j + 1]) result = fp[j];
  }
  return result;
}

std::vector<float> TrainSigmas(const at::Tensor& alphas_cumprod) {
  const at::Tensor sigmas = at::pow((1 - alphas_cumprod) / alphas_cumprod, 0.5).contiguous();
  return std::vector<float>(sigmas.data_ptr<float>(), sigmas.data_ptr<float>() + sigmas.numel());
}

std::vector<double> KarrasSigmas(double sigma_min, double sigma_max, int64_t num) {
  constexpr double kRho = 7.0;
  const double min_inv_rho = std::pow(sigma_min, 1 / kRho);
  const double max_inv_rho = std::pow(sigma_max, 1 / kRho);
  std::vector<double> sigmas = NpLinspace(0, 1, num);
  for (double& s : sigmas) s = std::pow(max_inv_rho + s * (min_inv_rho - max_inv_rho), kRho);
  return sigmas;
}

double SigmaToT(double sigma, const std::vector<float>& log_sigmas) {
  const double log_sigma = std::log(std::max(sigma, 1e-10));
  const int64_t n = static_cast<int64_t>(log_sigmas.size());
  // The last index whose log-sigma is <= log_sigma (0 if none), at most n - 2.
  int64_t low_idx = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (log_sigma - static_cast<double>(log_sigmas[i]) >= 0) low_idx = i;
  }
  low_idx = std::min(low_idx, n - 2);
  const int64_t high_idx = low_idx + 1;
  const float low = log_sigmas[low_idx], high = log_sigmas[high_idx];
  const float low_minus_high = low - high;  // float32 in numpy too
  double w = (static_cast<double>(low) - log_sigma) / static_cast<double>(low_minus_high);
  w = std::clamp(w, 0.0, 1.0);
  return (1 - w) * static_cast<double>(low_idx) + w * static_cast<double>(high_idx);
}

}  // namespace scheduler_internal
}  // namespace tomeserve::pipeline
