// Samplers for the denoising loop: PNDM (PLMS), DDIM, Euler, Euler ancestral, DPM-Solver++ 2M (+ Karras),
// with results equal to diffusers' schedulers (same float32 tables, same tensor operations in the same order
// and dtype).
//
// Split in two so a sample's result never depends on its batch, and samples can join or leave a running
// batch:
//   NoiseSchedule  immutable, shared: timesteps and coefficient tables for (config, kind, step count).
//   SamplerState   one per sample, mutable: step counter and multistep history. Step() advances it.
//
// Driving one sample (the pipeline does this for every sample of a batch, at the same or different steps):
//   auto schedule = NoiseSchedule::Create(config, kind, steps);   // once per batch
//   auto state = NewSamplerState(*schedule);                      // once per sample
//   latents = (*schedule)->ScaleInitialNoise(noise);              // noise: randn from the sample's generator
//   while (!state->done()) {
//     unet_in = state->ScaleModelInput(latents);                  // (with CFG: for both halves)
//     eps = unet(unet_in, state->timestep(), ...);                // + classifier-free guidance
//     latents = *state->Step(eps, latents, &sample_generator);    // the generator is only used by euler_a
//   }
// Tensors may have any shape ([1,4,h,w] or [4,h,w]), live on any device and be float32/float16/bfloat16; the
// math runs in the dtype diffusers uses (Euler, Euler ancestral and DPM-Solver upcast the sample to float32
// and return the model output's dtype). Scalars are CPU float32 values, as diffusers' tables are.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "pipeline/scheduler_config.h"

namespace tomeserve::pipeline {

class SamplerState;

// Thread-safe to share: every method is const and touches no mutable state.
class NoiseSchedule {
 public:
  // num_inference_steps in [1, num_train_timesteps]. Errors: unsupported config values, steps out of range.
  static absl::StatusOr<std::shared_ptr<const NoiseSchedule>> Create(const SchedulerConfig& config,
                                                                     SchedulerKind kind,
                                                                     int num_inference_steps);
  static absl::StatusOr<std::shared_ptr<const NoiseSchedule>> Create(const SchedulerParams& params,
                                                                     int num_inference_steps);
  virtual ~NoiseSchedule() = default;

  SchedulerKind kind() const { return params_.kind; }
  const SchedulerParams& params() const { return params_; }
  int num_inference_steps() const { return num_inference_steps_; }

  // One entry per UNet call, in call order: the timestep to give the UNet for that call. Values are
  // diffusers' scheduler.timesteps as float32 (integers except for Euler, whose timesteps can be fractional).
  // PNDM repeats its first timestep, so it makes num_inference_steps + 1 calls (1 call for a single step);
  // the others make num_inference_steps.
  const std::vector<float>& timesteps() const { return timesteps_; }
  // Whether `other` is this schedule or one built from equal parameters and step count (so with equal tables).
  bool SameAs(const NoiseSchedule& other) const {
    return this == &other || (num_inference_steps_ == other.num_inference_steps_ && params_ == other.params_);
  }
  int num_calls() const { return static_cast<int>(timesteps_.size()); }

  // diffusers' init_noise_sigma (a float32 value): 1 except for the Euler schedulers.
  double init_noise_sigma() const { return init_noise_sigma_; }
  // The initial latents from unit-variance noise: noise * init_noise_sigma, as the pipeline's
  // prepare_latents.
  at::Tensor ScaleInitialNoise(const at::Tensor& noise) const;

  // The UNet input for call `call_index` (scale_model_input): the sample itself, or sample / sqrt(sigma^2 +
  // 1) for the Euler schedulers. Throws c10::Error on torch failures (run it under GuardTorch).
  virtual at::Tensor ScaleModelInput(const at::Tensor& sample, int call_index) const { return sample; }

  // Whether Step() draws noise, so that it needs the sample's generator (Euler ancestral).
  bool stochastic() const { return stochastic_; }

 protected:
  NoiseSchedule(const SchedulerParams& params, int num_inference_steps)
      : params_(params), num_inference_steps_(num_inference_steps) {}
  // A fresh state for one sample; `self` is this schedule.
  virtual std::unique_ptr<SamplerState> NewState(std::shared_ptr<const NoiseSchedule> self) const = 0;
  friend std::unique_ptr<SamplerState> NewSamplerState(std::shared_ptr<const NoiseSchedule> schedule);

  SchedulerParams params_;
  int num_inference_steps_;
  std::vector<float> timesteps_;
  double init_noise_sigma_ = 1.0;
  bool stochastic_ = false;
};

// The per-sample part. Owned by one sample; not thread-safe (one thread steps it). Keeps the schedule alive.
class SamplerState {
 public:
  virtual ~SamplerState() = default;

  const NoiseSchedule& schedule() const { return *schedule_; }
  // The next UNet call (0-based); equals the number of Step() calls so far.
  int step_index() const { return step_index_; }
  bool done() const { return step_index_ >= schedule_->num_calls(); }
  // The UNet timestep and input for the next call. Only valid while !done().
  float timestep() const { return schedule_->timesteps()[step_index_]; }
  at::Tensor ScaleModelInput(const at::Tensor& sample) const {
    return schedule_->ScaleModelInput(sample, step_index_);
  }

  // One scheduler step: `model_output` is the (guided) UNet output for ScaleModelInput(sample) at timestep(),
  // `sample` the current latents (same shape). Returns the latents for the next call, in model_output's dtype
  // and on its device. `noise_gen` is the sample's CPU generator (the one that drew its initial noise);
  // required when schedule().stochastic(), unused otherwise. Multistep schedulers keep references to
  // `model_output` (and PNDM to `sample`): do not modify them in place afterwards. After an error the state
  // is unusable.
  absl::StatusOr<at::Tensor> Step(const at::Tensor& model_output, const at::Tensor& sample,
                                  at::Generator* noise_gen = nullptr);

  // One scheduler step for several samples at once (DenoiseBatch steps samples on equal schedules together):
  // `states` share one schedule (NoiseSchedule::SameAs) and step index; `model_output` and `sample` are their rows stacked in
  // order ([n, ...], one row each), `noise_gens` their generators (read when the schedule is stochastic). Row for
  // row equal to Step() on each state — the same element-wise arithmetic, and Euler ancestral draws each row's
  // noise from its own generator — with one set of kernels instead of n. Afterwards every state holds its own
  // rows of the history. Errors as Step(); after one, every state is unusable.
  static absl::StatusOr<at::Tensor> StepTogether(const std::vector<SamplerState*>& states,
                                                 const at::Tensor& model_output, const at::Tensor& sample,
                                                 const std::vector<at::Generator*>& noise_gens);

 protected:
  explicit SamplerState(std::shared_ptr<const NoiseSchedule> schedule) : schedule_(std::move(schedule)) {}
  // The scheduler's math for call `call_index`; may throw c10::Error.
  virtual at::Tensor StepImpl(const at::Tensor& model_output, const at::Tensor& sample, int call_index,
                              at::Generator* noise_gen) = 0;
  // The multistep history StepImpl reads and writes, as pointers to its tensors in a fixed order (undefined ones
  // included); states of one schedule at one step index have the same number, defined alike. None by default.
  virtual std::vector<at::Tensor*> History() { return {}; }
  // Takes `other`'s history (a state of the same kind and schedule), shape and all.
  virtual void CopyHistoryFrom(const SamplerState& other) {}
  // Noise shaped like `like` from `gen`, in like's dtype on the CPU (diffusers' randn_tensor with a CPU
  // generator); in a stacked state (StepTogether), one row from each member's own generator.
  at::Tensor Noise(const at::Tensor& like, at::Generator* gen) const;

 private:
  std::shared_ptr<const NoiseSchedule> schedule_;
  int step_index_ = 0;
  bool failed_ = false;
  std::vector<at::Generator*> row_gens_;  // StepTogether's stacked state only
};

std::unique_ptr<SamplerState> NewSamplerState(std::shared_ptr<const NoiseSchedule> schedule);

// Shared by the scheduler implementations (scheduler_*.cpp); not for the pipeline.
namespace scheduler_internal {

// A 0-dim CPU float32 tensor: how diffusers' scalars (entries of its float32 tables) enter tensor operations.
at::Tensor F32(double value);
// diffusers' alphas_cumprod: CPU float32 [num_train_timesteps], computed with the same torch operations.
at::Tensor AlphasCumprod(const SchedulerParams& params);
// numpy's linspace / arange (float64) and round (half to even).
std::vector<double> NpLinspace(double start, double stop, int64_t num);
std::vector<double> NpArange(double start, double stop, double step);
double NpRound(double x);
// numpy's interp(x, arange(len(fp)), fp) in float64.
double NpInterp(double x, const std::vector<float>& fp);
// diffusers' train sigmas ((1 - alphas_cumprod) / alphas_cumprod)^0.5, float32, ascending in t.
std::vector<float> TrainSigmas(const at::Tensor& alphas_cumprod);
// The schedulers' Karras sigmas (rho = 7) from sigma_max down to sigma_min, float64.
std::vector<double> KarrasSigmas(double sigma_min, double sigma_max, int64_t num);
// diffusers' _sigma_to_t: the fractional train timestep of `sigma` by interpolating log-sigmas (float32
// table).
double SigmaToT(double sigma, const std::vector<float>& log_sigmas);

absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreatePndm(const SchedulerParams& params, int steps);
absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreateDdim(const SchedulerParams& params, int steps);
absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreateEuler(const SchedulerParams& params, int steps);
absl::StatusOr<std::shared_ptr<const NoiseSchedule>> CreateDpmpp(const SchedulerParams& params, int steps);

}  // namespace scheduler_internal
}  // namespace tomeserve::pipeline
