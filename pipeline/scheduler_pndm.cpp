// PNDMScheduler with skip_prk_steps (PLMS): a linear multistep method on the model outputs. The first
// timestep is evaluated twice: call 0 takes an Euler-like step, call 1 re-evaluates at the next timestep and
// restarts from the first sample with the average of both outputs (a Heun step). From call 2 on,
// Adams-Bashforth of growing order (2, 3, then 4) combines the newest model outputs.
#include <algorithm>
#include <deque>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pipeline/scheduler.h"

namespace tomeserve::pipeline::scheduler_internal {
namespace {

// Scalars of _get_prev_sample for one call, as float32 like diffusers' 0-dim tensors.
struct PrevSampleCoeffs {
  float sample_coeff;    // (a_prev / a_t)^0.5
  float alpha_diff;      // a_prev - a_t
  float denom;           // a_t * (1 - a_prev)^0.5 + (a_t * (1 - a_t) * a_prev)^0.5
  float sqrt_alpha;      // a_t^0.5      (v_prediction)
  float sqrt_one_minus;  // (1 - a_t)^0.5 (v_prediction)
};

class PndmSchedule final : public NoiseSchedule {
 public:
  PndmSchedule(const SchedulerParams& params, int steps) : NoiseSchedule(params, steps) {}

  absl::Status Build() {
    const int64_t n = num_inference_steps_, train = params_.num_train_timesteps;
    // Ascending inference timesteps (diffusers' _timesteps).
    std::vector<int64_t> ascending;
    switch (params_.timestep_spacing) {
      case TimestepSpacing::kLinspace:
        for (double t : NpLinspace(0, static_cast<double>(train - 1), n)) ascending.push_back(NpRound(t));
        break;
      case TimestepSpacing::kLeading:
        for (int64_t i = 0; i < n; ++i) ascending.push_back(i * (train / n) + params_.steps_offset);
        break;
      case TimestepSpacing::kTrailing: {
        std::vector<double> values = NpArange(static_cast<double>(train), 0, -static_cast<double>(train) / n);
        for (auto it = values.rbegin(); it != values.rend(); ++it) ascending.push_back(NpRound(*it) - 1);
        break;
      }
    }
    // PLMS order: all but the last, the second-to-last again, the last; then reversed.
    std::vector<int64_t> calls(ascending.begin(), ascending.end() - 1);
    if (ascending.size() >= 2) calls.push_back(ascending[ascending.size() - 2]);
    calls.push_back(ascending.back());
    std::reverse(calls.begin(), calls.end());
    for (int64_t t : calls) timesteps_.push_back(static_cast<float>(t));

    const at::Tensor alphas_cumprod = AlphasCumprod(params_);
    const at::Tensor final_alpha = params_.set_alpha_to_one ? F32(1.0) : alphas_cumprod[0];
    const int64_t ratio = train / n;
    for (size_t i = 0; i < calls.size(); ++i) {
      int64_t t = calls[i], prev = t - ratio;
      if (i == 1) {  // the repeated first timestep: step from the first timestep to this one
        prev = t;
        t = t + ratio;
      }
      if (t < 0 || t >= train || prev >= train) {
        return absl::InvalidArgumentError(absl::StrCat("pndm: timestep ", t, " is outside the ", train,
                                                       " training timesteps (steps_offset ",
                                                       params_.steps_offset, ", ", n, " steps)"));
      }
      const at::Tensor a_t = alphas_cumprod[t];
      const at::Tensor a_prev = prev >= 0 ? alphas_cumprod[prev] : final_alpha;
      const at::Tensor b_t = 1 - a_t, b_prev = 1 - a_prev;
      coeffs_.push_back(PrevSampleCoeffs{
          .sample_coeff = at::pow(a_prev / a_t, 0.5).item<float>(),
          .alpha_diff = (a_prev - a_t).item<float>(),
          .denom = (a_t * at::pow(b_prev, 0.5) + at::pow(a_t * b_t * a_prev, 0.5)).item<float>(),
          .sqrt_alpha = at::pow(a_t, 0.5).item<float>(),
          .sqrt_one_minus = at::pow(b_t, 0.5).item<float>(),
      });
    }
    return absl::OkStatus();
  }

  const PrevSampleCoeffs& coeffs(int call) const { return coeffs_[call]; }

 protected:
  std::unique_ptr<SamplerState> NewState(std::shared_ptr<const NoiseSchedule> self) const override;

 private:
  std::vector<PrevSampleCoeffs> coeffs_;
};

class PndmState final : public SamplerState {
 public:
  explicit PndmState(std::shared_ptr<const NoiseSchedule> schedule)
      : SamplerState(schedule), pndm_(static_cast<const PndmSchedule&>(*schedule)) {}

 protected:
  at::Tensor StepImpl(const at::Tensor& model_output, const at::Tensor& sample, int call,
                      at::Generator*) override {
    if (call != 1) {
      if (ets_.size() > 3) ets_.pop_front();
      ets_.push_back(model_output);
    }
    at::Tensor combined;
    at::Tensor base = sample;
    if (call == 0) {
      combined = model_output;
      first_sample_ = sample;
    } else if (call == 1) {
      combined = (model_output + ets_.back()) / 2;
      base = first_sample_;
      first_sample_ = at::Tensor();
    } else if (ets_.size() == 2) {
      combined = (3 * ets_[1] - ets_[0]) / 2;
    } else if (ets_.size() == 3) {
      combined = (23 * ets_[2] - 16 * ets_[1] + 5 * ets_[0]) / 12;
    } else {
      combined = (55 * ets_[3] - 59 * ets_[2] + 37 * ets_[1] - 9 * ets_[0]) * (1.0 / 24);
    }
    return PrevSample(base, combined, pndm_.coeffs(call));
  }

  std::vector<at::Tensor*> History() override {
    std::vector<at::Tensor*> h;
    for (at::Tensor& e : ets_) h.push_back(&e);
    h.push_back(&first_sample_);
    return h;
  }
  void CopyHistoryFrom(const SamplerState& other) override {
    const auto& o = static_cast<const PndmState&>(other);
    ets_ = o.ets_;
    first_sample_ = o.first_sample_;
  }

 private:
  at::Tensor PrevSample(const at::Tensor& sample, at::Tensor model_output, const PrevSampleCoeffs& c) const {
    if (pndm_.params().prediction_type == PredictionType::kVPrediction) {
      model_output = F32(c.sqrt_alpha) * model_output + F32(c.sqrt_one_minus) * sample;
    }
    return F32(c.sample_coeff) * sample - F32(c.alpha_diff) * model_output / F32(c.denom);
  }

  const PndmSchedule& pndm_;
  std::deque<at::Tensor> ets_;  // the newest model outputs, oldest first (at most 4)
  at::Tensor first_sample_;     // the sample before call 0, restarted from at call 1
};

std::unique_ptr<SamplerState> PndmSchedule::NewState(std::shared_ptr<const NoiseSchedule> self) const {
  return std::make_unique<PndmState>(std::move(self));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreatePndm(const SchedulerParams& params, int steps) {
  auto schedule = std::make_shared<PndmSchedule>(params, steps);
  if (absl::Status s = schedule->Build(); !s.ok()) return s;
  return schedule;
}

}  // namespace tomeserve::pipeline::scheduler_internal
