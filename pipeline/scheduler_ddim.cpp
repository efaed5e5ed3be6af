// DDIMScheduler with eta = 0 (deterministic): predict x0 from the model output, then move to the previous
// timestep along the predicted noise direction. No state besides the step counter.
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pipeline/scheduler.h"

namespace tomeserve::pipeline::scheduler_internal {
namespace {

// Per-call scalars, float32 like diffusers' 0-dim tensors.
struct DdimCoeffs {
  float sqrt_alpha;       // a_t^0.5
  float sqrt_beta;        // (1 - a_t)^0.5
  float sqrt_alpha_prev;  // a_prev^0.5
  float direction;        // (1 - a_prev - std_dev^2)^0.5 with std_dev = eta * variance^0.5 = 0
};

class DdimSchedule final : public NoiseSchedule {
 public:
  DdimSchedule(const SchedulerParams& params, int steps) : NoiseSchedule(params, steps) {}

  absl::Status Build() {
    const int64_t n = num_inference_steps_, train = params_.num_train_timesteps;
    std::vector<int64_t> calls;  // descending
    switch (params_.timestep_spacing) {
      case TimestepSpacing::kLinspace: {
        std::vector<double> values = NpLinspace(0, static_cast<double>(train - 1), n);
        for (auto it = values.rbegin(); it != values.rend(); ++it) calls.push_back(NpRound(*it));
        break;
      }
      case TimestepSpacing::kLeading:
        for (int64_t i = n - 1; i >= 0; --i) calls.push_back(i * (train / n) + params_.steps_offset);
        break;
      case TimestepSpacing::kTrailing:
        for (double t : NpArange(static_cast<double>(train), 0, -static_cast<double>(train) / n)) {
          calls.push_back(static_cast<int64_t>(NpRound(t)) - 1);
        }
        break;
    }
    const at::Tensor alphas_cumprod = AlphasCumprod(params_);
    const at::Tensor final_alpha = params_.set_alpha_to_one ? F32(1.0) : alphas_cumprod[0];
    for (int64_t t : calls) {
      if (t < 0 || t >= train) {
        return absl::InvalidArgumentError(absl::StrCat("ddim: timestep ", t, " is outside the ", train,
                                                       " training timesteps (steps_offset ",
                                                       params_.steps_offset, ", ", n, " steps)"));
      }
      timesteps_.push_back(static_cast<float>(t));
      const int64_t prev = t - train / n;
      const at::Tensor a_t = alphas_cumprod[t];
      const at::Tensor a_prev = prev >= 0 ? alphas_cumprod[prev] : final_alpha;
      const at::Tensor b_t = 1 - a_t, b_prev = 1 - a_prev;
      const at::Tensor variance = (b_prev / b_t) * (1 - a_t / a_prev);
      const at::Tensor std_dev = at::pow(variance, 0.5) * 0.0;  // eta = 0
      coeffs_.push_back(DdimCoeffs{
          .sqrt_alpha = at::pow(a_t, 0.5).item<float>(),
          .sqrt_beta = at::pow(b_t, 0.5).item<float>(),
          .sqrt_alpha_prev = at::pow(a_prev, 0.5).item<float>(),
          .direction = at::pow(1 - a_prev - at::pow(std_dev, 2), 0.5).item<float>(),
      });
    }
    return absl::OkStatus();
  }

  const DdimCoeffs& coeffs(int call) const { return coeffs_[call]; }

 protected:
  std::unique_ptr<SamplerState> NewState(std::shared_ptr<const NoiseSchedule> self) const override;

 private:
  std::vector<DdimCoeffs> coeffs_;
};

class DdimState final : public SamplerState {
 public:
  explicit DdimState(std::shared_ptr<const NoiseSchedule> schedule)
      : SamplerState(schedule), ddim_(static_cast<const DdimSchedule&>(*schedule)) {}

 protected:
  at::Tensor StepImpl(const at::Tensor& model_output, const at::Tensor& sample, int call,
                      at::Generator*) override {
    const DdimCoeffs& c = ddim_.coeffs(call);
    const SchedulerParams& p = ddim_.params();
    at::Tensor pred_original, pred_epsilon;
    if (p.prediction_type == PredictionType::kEpsilon) {
      pred_original = (sample - F32(c.sqrt_beta) * model_output) / F32(c.sqrt_alpha);
      pred_epsilon = model_output;
    } else {
      pred_original = F32(c.sqrt_alpha) * sample - F32(c.sqrt_beta) * model_output;
      pred_epsilon = F32(c.sqrt_alpha) * model_output + F32(c.sqrt_beta) * sample;
    }
    if (p.clip_sample) pred_original = pred_original.clamp(-p.clip_sample_range, p.clip_sample_range);
    return F32(c.sqrt_alpha_prev) * pred_original + F32(c.direction) * pred_epsilon;
  }

 private:
  const DdimSchedule& ddim_;
};

std::unique_ptr<SamplerState> DdimSchedule::NewState(std::shared_ptr<const NoiseSchedule> self) const {
  return std::make_unique<DdimState>(std::move(self));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreateDdim(const SchedulerParams& params, int steps) {
  auto schedule = std::make_shared<DdimSchedule>(params, steps);
  if (absl::Status s = schedule->Build(); !s.ok()) return s;
  return schedule;
}

}  // namespace tomeserve::pipeline::scheduler_internal
