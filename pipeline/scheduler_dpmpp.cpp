// DPMSolverMultistepScheduler as DPM-Solver++ 2M: the model output is converted to a data prediction x0; the
// first step (and, by lower_order_final, the last) is first order, the others second order on the two newest
// x0 predictions (midpoint or heun solver_type). Optionally on Karras sigmas.
#include "absl/status/status.h"
#include "pipeline/scheduler.h"

namespace tomeserve::pipeline::scheduler_internal {
namespace {

// Per-call scalars, float32 like diffusers' 0-dim tensors.
struct DpmCoeffs {
  float alpha;         // alpha_t of sigmas[i]: 1 / (sigma^2 + 1)^0.5 (for the x0 conversion)
  float sigma;         // sigma_t of sigmas[i]: sigma * alpha_t
  bool second_order;   // else first order
  float sample_coeff;  // sigma_t / sigma_s0
  float d0_coeff;      // alpha_t * (exp(-h) - 1)
  float r0_inverse;    // 1 / r0                                        (second order)
  float d1_coeff;      // midpoint: 0.5 * d0_coeff; heun: alpha_t * ((exp(-h) - 1) / h + 1)
};

class DpmSchedule final : public NoiseSchedule {
 public:
  DpmSchedule(const SchedulerParams& params, int steps) : NoiseSchedule(params, steps) {}

  void Build() {
    const int64_t n = num_inference_steps_, train = params_.num_train_timesteps;
    const at::Tensor alphas_cumprod = AlphasCumprod(params_);
    const at::Tensor lambdas = at::log(at::sqrt(alphas_cumprod)) - at::log(at::sqrt(1 - alphas_cumprod));
    const int64_t clipped_idx =
        at::searchsorted(at::flip(lambdas, {0}), at::Scalar(params_.lambda_min_clipped)).item<int64_t>();
    const int64_t last_timestep = train - clipped_idx;

    std::vector<int64_t> timesteps;
    switch (params_.timestep_spacing) {
      case TimestepSpacing::kLinspace: {
        std::vector<double> values = NpLinspace(0, static_cast<double>(last_timestep - 1), n + 1);
        for (int64_t i = n; i >= 1; --i) timesteps.push_back(static_cast<int64_t>(NpRound(values[i])));
        break;
      }
      case TimestepSpacing::kLeading:
        for (int64_t i = n; i >= 1; --i)
          timesteps.push_back(i * (last_timestep / (n + 1)) + params_.steps_offset);
        break;
      case TimestepSpacing::kTrailing:
        for (double t : NpArange(static_cast<double>(last_timestep), 0, -static_cast<double>(train) / n)) {
          timesteps.push_back(static_cast<int64_t>(NpRound(t)) - 1);
        }
        break;
    }

    const std::vector<float> train_sigmas = TrainSigmas(alphas_cumprod);
    std::vector<double> sigmas;
    if (params_.use_karras_sigmas) {
      sigmas = KarrasSigmas(params_.sigma_min.value_or(train_sigmas.front()),
                            params_.sigma_max.value_or(train_sigmas.back()), n);
      std::vector<float> log_sigmas;
      for (float s : train_sigmas) log_sigmas.push_back(std::log(s));
      timesteps.clear();
      for (double s : sigmas) {
        double t = SigmaToT(s, log_sigmas);
        if (params_.beta_schedule != BetaSchedule::kSquaredCosCapV2) t = NpRound(t);
        timesteps.push_back(static_cast<int64_t>(t));  // torch's float -> int64 truncates
      }
    } else {
      for (int64_t t : timesteps) sigmas.push_back(NpInterp(static_cast<double>(t), train_sigmas));
    }
    sigmas.push_back(params_.final_sigma_min ? train_sigmas.front() : 0.0);
    const std::vector<float> sigmas32(sigmas.begin(), sigmas.end());
    for (int64_t t : timesteps) timesteps_.push_back(static_cast<float>(t));

    // alpha_t, sigma_t and lambda of one sigma, as _sigma_to_alpha_sigma_t and the update functions.
    struct Point {
      at::Tensor alpha, sigma, lambda;
    };
    auto point = [](float s) {
      const at::Tensor sig = F32(s);
      const at::Tensor alpha = at::reciprocal(at::pow(at::pow(sig, 2) + 1, 0.5)) * 1;
      const at::Tensor sigma = sig * alpha;
      return Point{alpha, sigma, at::log(alpha) - at::log(sigma)};
    };
    const int64_t calls = static_cast<int64_t>(timesteps_.size());
    for (int64_t i = 0; i < calls; ++i) {
      const bool last = i == calls - 1;
      const bool lower_order_final =
          last &&
          (params_.euler_at_final || (params_.lower_order_final && calls < 15) || !params_.final_sigma_min);
      const Point s0 = point(sigmas32[i]), t = point(sigmas32[i + 1]);
      const at::Tensor h = t.lambda - s0.lambda;
      const at::Tensor d0 = t.alpha * (at::exp(-h) - 1.0);
      DpmCoeffs c{.alpha = s0.alpha.item<float>(),
                  .sigma = s0.sigma.item<float>(),
                  .second_order = i > 0 && !lower_order_final,
                  .sample_coeff = (t.sigma / s0.sigma).item<float>(),
                  .d0_coeff = d0.item<float>(),
                  .r0_inverse = 0,
                  .d1_coeff = 0};
      if (c.second_order) {
        const Point s1 = point(sigmas32[i - 1]);
        const at::Tensor r0 = (s0.lambda - s1.lambda) / h;
        c.r0_inverse = (at::reciprocal(r0) * 1.0).item<float>();
        c.d1_coeff = params_.solver_heun ? (t.alpha * ((at::exp(-h) - 1.0) / h + 1.0)).item<float>()
                                         : (d0 * 0.5).item<float>();
      }
      coeffs_.push_back(c);
    }
  }

  const DpmCoeffs& coeffs(int call) const { return coeffs_[call]; }

 protected:
  std::unique_ptr<SamplerState> NewState(std::shared_ptr<const NoiseSchedule> self) const override;

 private:
  std::vector<DpmCoeffs> coeffs_;
};

class DpmState final : public SamplerState {
 public:
  explicit DpmState(std::shared_ptr<const NoiseSchedule> schedule)
      : SamplerState(schedule), dpm_(static_cast<const DpmSchedule&>(*schedule)) {}

 protected:
  at::Tensor StepImpl(const at::Tensor& model_output, const at::Tensor& sample, int call,
                      at::Generator*) override {
    const DpmCoeffs& c = dpm_.coeffs(call);
    // The data prediction, in the input dtype (diffusers converts before upcasting the sample).
    const at::Tensor x0 = dpm_.params().prediction_type == PredictionType::kEpsilon
                              ? (sample - F32(c.sigma) * model_output) / F32(c.alpha)
                              : F32(c.alpha) * sample - F32(c.sigma) * model_output;
    const at::Tensor sample32 = sample.to(at::kFloat);
    at::Tensor prev;
    if (!c.second_order) {
      prev = F32(c.sample_coeff) * sample32 - F32(c.d0_coeff) * x0;
    } else {
      const at::Tensor d1 = F32(c.r0_inverse) * (x0 - previous_x0_);
      prev = dpm_.params().solver_heun
                 ? F32(c.sample_coeff) * sample32 - F32(c.d0_coeff) * x0 + F32(c.d1_coeff) * d1
                 : F32(c.sample_coeff) * sample32 - F32(c.d0_coeff) * x0 - F32(c.d1_coeff) * d1;
    }
    previous_x0_ = x0;
    return prev.to(x0.scalar_type());
  }

  std::vector<at::Tensor*> History() override { return {&previous_x0_}; }
  void CopyHistoryFrom(const SamplerState& other) override {
    previous_x0_ = static_cast<const DpmState&>(other).previous_x0_;
  }

 private:
  const DpmSchedule& dpm_;
  at::Tensor previous_x0_;  // the data prediction of the previous call
};

std::unique_ptr<SamplerState> DpmSchedule::NewState(std::shared_ptr<const NoiseSchedule> self) const {
  return std::make_unique<DpmState>(std::move(self));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreateDpmpp(const SchedulerParams& params, int steps) {
  auto schedule = std::make_shared<DpmSchedule>(params, steps);
  schedule->Build();
  return schedule;
}

}  // namespace tomeserve::pipeline::scheduler_internal
