#include "pipeline/denoise_batch.h"

#include "absl/strings/str_cat.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"

namespace tomeserve::pipeline {

DenoiseBatch::DenoiseBatch(const StableDiffusion& model, BatchSpec spec, std::shared_ptr<const NoiseSchedule> schedule,
                           std::vector<Sample> samples)
    : model_(model), spec_(std::move(spec)), schedule_(std::move(schedule)), samples_(std::move(samples)) {}

bool DenoiseBatch::Done() const {
  for (const Sample& s : samples_) {
    if (!s.cancelled && !s.state->done()) return false;
  }
  return true;
}

int DenoiseBatch::latent_height() const { return spec_.height / model_.vae_scale(); }
int DenoiseBatch::latent_width() const { return spec_.width / model_.vae_scale(); }

absl::Status DenoiseBatch::Step() {
  return GuardTorch(absl::StrCat("denoising step ", calls_done_ + 1, "/", num_calls()), [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    std::vector<int> active;
    for (int i = 0; i < num_samples(); ++i) {
      if (!samples_[i].cancelled && !samples_[i].state->done()) active.push_back(i);
    }
    if (active.empty()) return absl::OkStatus();

    // Rows as diffusers lays them out: every unconditional half first, then every conditional one.
    std::vector<at::Tensor> scaled(samples_.size()), inputs, embeddings;
    for (int i : active) scaled[i] = samples_[i].state->ScaleModelInput(samples_[i].latents);
    UNetCallInfo call{.call_index = calls_done_};
    for (bool uncond_pass : {true, false}) {
      for (int i : active) {
        Sample& s = samples_[i];
        if (uncond_pass && !s.uncond.defined()) continue;
        inputs.push_back(scaled[i]);
        embeddings.push_back(uncond_pass ? s.uncond : s.cond);
        call.row_seeds.push_back(s.spec.seed);
        call.row_is_uncond.push_back(uncond_pass);
        call.row_sample.push_back(i);
      }
    }
    // All active samples are at the same call of the same schedule, so one timestep serves every row.
    const float t = samples_[active.front()].state->timestep();
    std::unique_ptr<TransformerBlockHook> hook = spec_.hooks ? spec_.hooks->ForCall(call) : nullptr;
    at::Tensor out = model_.unet().forward(at::cat(inputs), at::scalar_tensor(t, at::kFloat),
                                           at::cat(embeddings), hook.get());

    int uncond_rows = 0;
    for (int i : active) uncond_rows += samples_[i].uncond.defined() ? 1 : 0;
    int uncond_row = 0, cond_row = uncond_rows;
    for (int i : active) {
      Sample& s = samples_[i];
      at::Tensor eps = out.narrow(0, cond_row++, 1);
      if (s.uncond.defined()) {
        at::Tensor eps_uncond = out.narrow(0, uncond_row++, 1);
        eps = eps_uncond + s.spec.guidance_scale * (eps - eps_uncond);
      }
      absl::StatusOr<at::Tensor> next = s.state->Step(eps, s.latents, &s.generator);
      if (!next.ok()) return next.status();
      s.latents = *std::move(next);
    }
    ++calls_done_;
    return absl::OkStatus();
  });
}

bool DenoiseBatch::Cancel(int sample) {
  if (sample < 0 || sample >= num_samples()) return false;
  samples_[sample].cancelled = true;
  return true;
}

absl::StatusOr<at::Tensor> DenoiseBatch::ActiveLatents() const {
  return GuardTorch("collecting latents", [&]() -> absl::StatusOr<at::Tensor> {
    std::vector<at::Tensor> rows;
    for (const Sample& s : samples_) {
      if (!s.cancelled) rows.push_back(s.latents);
    }
    return rows.empty() ? at::Tensor() : at::cat(rows);
  });
}

}  // namespace tomeserve::pipeline
