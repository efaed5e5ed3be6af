#include "pipeline/denoise_batch.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "pipeline/device.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"

namespace tomeserve::pipeline {

DenoiseBatch::DenoiseBatch(const StableDiffusion& model, int64_t latent_height, int64_t latent_width)
    : model_(model), latent_height_(latent_height), latent_width_(latent_width) {}

absl::StatusOr<int> DenoiseBatch::Add(Sample sample) {
  if (!sample.latents.defined() || sample.latents.dim() != 4 || sample.latents.size(2) != latent_height_ ||
      sample.latents.size(3) != latent_width_ || sample.state == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("a sample joining a ", latent_height_, "x", latent_width_,
                                                   " latent batch must have latents of that size"));
  }
  const int id = next_id_++;
  samples_.emplace(id, std::move(sample));
  return id;
}

std::optional<DenoiseBatch::Sample> DenoiseBatch::Remove(int id) {
  auto it = samples_.find(id);
  if (it == samples_.end()) return std::nullopt;
  Sample s = std::move(it->second);
  samples_.erase(it);
  return s;
}

bool DenoiseBatch::Done() const {
  return std::none_of(samples_.begin(), samples_.end(), [](const auto& e) { return e.second.active(); });
}

int DenoiseBatch::num_calls() const {
  int n = 0;
  for (const auto& [id, s] : samples_) n = std::max(n, s.state->schedule().num_calls());
  return n;
}

int DenoiseBatch::active_rows() const {
  int rows = 0;
  for (const auto& [id, s] : samples_) rows += s.active() ? s.rows_per_call() : 0;
  return rows;
}

int DenoiseBatch::active_samples() const {
  return static_cast<int>(std::count_if(samples_.begin(), samples_.end(), [](const auto& e) { return e.second.active(); }));
}

std::vector<int> DenoiseBatch::ids() const {
  std::vector<int> out;
  out.reserve(samples_.size());
  for (const auto& [id, s] : samples_) out.push_back(id);
  return out;
}

bool DenoiseBatch::Cancel(int id) {
  auto it = samples_.find(id);
  if (it == samples_.end()) return false;
  it->second.cancelled = true;
  return true;
}

absl::Status DenoiseBatch::Step() {
  std::vector<Sample*> active;
  std::vector<int> active_ids;
  for (auto& [id, s] : samples_) {
    if (!s.active()) continue;
    active.push_back(&s);
    active_ids.push_back(id);
  }
  if (active.empty()) return absl::OkStatus();

  at::Tensor out;
  absl::Status unet = GuardTorch(absl::StrCat("denoising step (UNet call ", calls_done_ + 1, ")"), [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    // Rows as diffusers lays them out: every unconditional half first, then every conditional one.
    std::vector<at::Tensor> scaled(active.size()), inputs, embeddings;
    std::vector<float> timesteps;
    std::vector<const HookFactory*> row_factory;
    std::vector<int> row_of_sample;  // index into `active`
    std::vector<bool> row_uncond;
    for (size_t i = 0; i < active.size(); ++i) scaled[i] = active[i]->state->ScaleModelInput(active[i]->latents);
    for (bool uncond_pass : {true, false}) {
      for (size_t i = 0; i < active.size(); ++i) {
        Sample& s = *active[i];
        if (uncond_pass && !s.uncond.defined()) continue;
        inputs.push_back(scaled[i]);
        embeddings.push_back(uncond_pass ? s.uncond : s.cond);
        timesteps.push_back(s.state->timestep());
        row_factory.push_back(s.spec.hooks.get());
        row_of_sample.push_back(static_cast<int>(i));
        row_uncond.push_back(uncond_pass);
      }
    }
    // Rows grouped by hook factory, groups in order of first appearance, rows ascending within a group.
    std::vector<const HookFactory*> group_factory;
    std::vector<std::vector<int64_t>> group_rows;
    for (size_t r = 0; r < row_factory.size(); ++r) {
      auto it = std::find(group_factory.begin(), group_factory.end(), row_factory[r]);
      if (it == group_factory.end()) {
        group_factory.push_back(row_factory[r]);
        group_rows.emplace_back();
        it = group_factory.end() - 1;
      }
      group_rows[it - group_factory.begin()].push_back(static_cast<int64_t>(r));
    }
    std::vector<std::unique_ptr<TransformerBlockHook>> hooks;
    std::vector<HookGroup> groups;
    const c10::Device device = active.front()->latents.device();
    for (size_t g = 0; g < group_factory.size(); ++g) {
      HookGroup group;
      if (group_factory.size() > 1) {
        group.rows = ToDeviceAsync(at::tensor(group_rows[g], at::TensorOptions().dtype(at::kLong)), device);
      }
      if (group_factory[g] != nullptr) {
        UNetCallInfo call{.call_index = calls_done_};
        for (int64_t r : group_rows[g]) {
          const Sample& s = *active[row_of_sample[r]];
          call.row_seeds.push_back(s.spec.seed);
          call.row_is_uncond.push_back(row_uncond[r]);
          call.row_sample.push_back(active_ids[row_of_sample[r]]);
          call.row_call_index.push_back(s.state->step_index());
          call.row_hook_seeds.push_back(s.spec.hook_seed);
        }
        hooks.push_back(group_factory[g]->ForCall(call));
        group.hook = hooks.back().get();
      }
      groups.push_back(std::move(group));
    }
    out = model_.unet().forward(at::cat(inputs), at::tensor(timesteps, at::kFloat), at::cat(embeddings), groups);
    return absl::OkStatus();
  });
  if (!unet.ok()) return unet;

  absl::Status stepped = GuardTorch("scheduler step", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    int uncond_rows = 0;
    for (Sample* s : active) uncond_rows += s->uncond.defined() ? 1 : 0;
    int uncond_row = 0, cond_row = uncond_rows;
    for (Sample* s : active) {
      at::Tensor eps = out.narrow(0, cond_row++, 1);
      if (s->uncond.defined()) {
        at::Tensor eps_uncond = out.narrow(0, uncond_row++, 1);
        eps = eps_uncond + s->spec.guidance_scale * (eps - eps_uncond);
      }
      absl::StatusOr<at::Tensor> next = s->state->Step(eps, s->latents, &s->generator);
      if (!next.ok()) return next.status();
      s->latents = *std::move(next);
      s->unet_rows += s->rows_per_call();
    }
    return absl::OkStatus();
  });
  ++calls_done_;
  if (!stepped.ok()) {
    return absl::InternalError(absl::StrCat("scheduler step failed after the UNet call: ", stepped.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> DenoiseBatch::ActiveLatents() const {
  return GuardTorch("collecting latents", [&]() -> absl::StatusOr<at::Tensor> {
    std::vector<at::Tensor> rows;
    for (const auto& [id, s] : samples_) {
      if (!s.cancelled) rows.push_back(s.latents);
    }
    return rows.empty() ? at::Tensor() : at::cat(rows);
  });
}

}  // namespace tomeserve::pipeline
