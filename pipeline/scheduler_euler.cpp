// EulerDiscreteScheduler and EulerAncestralDiscreteScheduler: Euler steps of the probability-flow ODE in
// sigma space (x0 predicted from the model output, derivative (x - x0) / sigma). The ancestral variant steps
// down to sigma_down and adds fresh noise of scale sigma_up, drawn from the sample's own generator.
#include <algorithm>

#include "absl/status/status.h"
#include "pipeline/device.h"
#include "pipeline/scheduler.h"

namespace tomeserve::pipeline::scheduler_internal {
namespace {

// Per-call scalars, float32 like diffusers' 0-dim tensors.
struct EulerCoeffs {
  float sigma;        // sigmas[i] (= sigma_hat: s_churn is 0)
  float input_scale;  // (sigma^2 + 1)^0.5, the divisor of scale_model_input
  float v_out;        // -sigma / (sigma^2 + 1)^0.5   (v_prediction)
  float v_in;         // sigma^2 + 1                  (v_prediction)
  float dt;           // sigma_next - sigma (Euler) or sigma_down - sigma (ancestral)
  float sigma_up;     // ancestral noise scale
};

class EulerSchedule final : public NoiseSchedule {
 public:
  EulerSchedule(const SchedulerParams& params, int steps) : NoiseSchedule(params, steps) {}

  void Build() {
    const bool ancestral = params_.kind == SchedulerKind::kEulerAncestral;
    stochastic_ = ancestral;
    const int64_t n = num_inference_steps_, train = params_.num_train_timesteps;
    std::vector<float> timesteps;  // float32 like diffusers'
    switch (params_.timestep_spacing) {
      case TimestepSpacing::kLinspace: {
        std::vector<double> values = NpLinspace(0, static_cast<double>(train - 1), n);
        for (auto it = values.rbegin(); it != values.rend(); ++it)
          timesteps.push_back(static_cast<float>(*it));
        break;
      }
      case TimestepSpacing::kLeading:
        for (int64_t i = n - 1; i >= 0; --i) {
          timesteps.push_back(static_cast<float>(i * (train / n)) + static_cast<float>(params_.steps_offset));
        }
        break;
      case TimestepSpacing::kTrailing:
        for (double t : NpArange(static_cast<double>(train), 0, -static_cast<double>(train) / n)) {
          timesteps.push_back(static_cast<float>(NpRound(t)) - 1.0f);
        }
        break;
    }
    const at::Tensor alphas_cumprod = AlphasCumprod(params_);
    const std::vector<float> train_sigmas = TrainSigmas(alphas_cumprod);
    std::vector<double> sigmas;
    for (float t : timesteps) sigmas.push_back(NpInterp(t, train_sigmas));
    if (!ancestral && params_.use_karras_sigmas) {
      sigmas = KarrasSigmas(params_.sigma_min.value_or(sigmas.back()),
                            params_.sigma_max.value_or(sigmas.front()), n);
      std::vector<float> log_sigmas;
      for (float s : train_sigmas) log_sigmas.push_back(std::log(s));
      timesteps.clear();
      for (double s : sigmas) timesteps.push_back(static_cast<float>(SigmaToT(s, log_sigmas)));
    }
    const bool sigma_min_last = !ancestral && params_.final_sigma_min;
    sigmas.push_back(sigma_min_last ? train_sigmas.front() : 0.0);
    std::vector<float> sigmas32(sigmas.begin(), sigmas.end());
    timesteps_ = timesteps;

    const at::Tensor max_sigma = F32(*std::max_element(sigmas32.begin(), sigmas32.end()));
    init_noise_sigma_ = params_.timestep_spacing == TimestepSpacing::kLeading
                            ? at::pow(at::pow(max_sigma, 2) + 1, 0.5).item<float>()
                            : max_sigma.item<float>();
    for (int64_t i = 0; i < static_cast<int64_t>(timesteps_.size()); ++i) {
      const at::Tensor sigma = F32(sigmas32[i]), next = F32(sigmas32[i + 1]);
      const at::Tensor v_in = at::pow(sigma, 2) + 1;
      EulerCoeffs c{.sigma = sigmas32[i],
                    .input_scale = at::pow(v_in, 0.5).item<float>(),
                    .v_out = (-sigma / at::pow(at::pow(sigma, 2) + 1, 0.5)).item<float>(),
                    .v_in = v_in.item<float>()};
      if (ancestral) {
        const at::Tensor up =
            at::pow(at::pow(next, 2) * (at::pow(sigma, 2) - at::pow(next, 2)) / at::pow(sigma, 2), 0.5);
        const at::Tensor down = at::pow(at::pow(next, 2) - at::pow(up, 2), 0.5);
        c.sigma_up = up.item<float>();
        c.dt = (down - sigma).item<float>();
      } else {
        c.sigma_up = 0;
        c.dt = (next - sigma * 1.0).item<float>();  // sigma_hat = sigma * (gamma + 1), gamma = 0
      }
      coeffs_.push_back(c);
    }
  }

  at::Tensor ScaleModelInput(const at::Tensor& sample, int call) const override {
    return sample / F32(coeffs_[call].input_scale);
  }
  const EulerCoeffs& coeffs(int call) const { return coeffs_[call]; }

 protected:
  std::unique_ptr<SamplerState> NewState(std::shared_ptr<const NoiseSchedule> self) const override;

 private:
  std::vector<EulerCoeffs> coeffs_;
};

class EulerState final : public SamplerState {
 public:
  explicit EulerState(std::shared_ptr<const NoiseSchedule> schedule)
      : SamplerState(schedule), euler_(static_cast<const EulerSchedule&>(*schedule)) {}

 protected:
  at::Tensor StepImpl(const at::Tensor& model_output, const at::Tensor& sample_in, int call,
                      at::Generator* noise_gen) override {
    const EulerCoeffs& c = euler_.coeffs(call);
    const at::Tensor sample = sample_in.to(at::kFloat);
    at::Tensor pred_original;
    if (euler_.params().prediction_type == PredictionType::kEpsilon) {
      pred_original = sample - F32(c.sigma) * model_output;
    } else {
      pred_original = model_output * F32(c.v_out) + (sample / F32(c.v_in));
    }
    const at::Tensor derivative = (sample - pred_original) / F32(c.sigma);
    at::Tensor prev = sample + derivative * F32(c.dt);
    if (euler_.stochastic()) {
      // diffusers' randn_tensor with a CPU generator: drawn on the CPU in the model output's dtype, then
      // moved (without waiting for the stream).
      const at::Tensor noise = ToDeviceAsync(Noise(model_output, noise_gen), model_output.device());
      prev = prev + noise * F32(c.sigma_up);
    }
    return prev.to(model_output.scalar_type());
  }

 private:
  const EulerSchedule& euler_;
};

std::unique_ptr<SamplerState> EulerSchedule::NewState(std::shared_ptr<const NoiseSchedule> self) const {
  return std::make_unique<EulerState>(std::move(self));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreateEuler(const SchedulerParams& params, int steps) {
  auto schedule = std::make_shared<EulerSchedule>(params, steps);
  schedule->Build();
  return schedule;
}

}  // namespace tomeserve::pipeline::scheduler_internal
