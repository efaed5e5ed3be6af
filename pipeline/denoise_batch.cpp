#include "pipeline/denoise_batch.h"

#include <algorithm>
#include <utility>

#include <c10/core/InferenceMode.h>

#include "absl/strings/str_cat.h"
#include "pipeline/device.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"
#include "pipeline/unet_call.h"
#include "pipeline/unet_graphs.h"

namespace tomeserve::pipeline {

namespace {

// Classifier-free guidance for a whole UNet call: the guided noise prediction of each active sample ([1, C, h,
// w] each, in `active` order) from the call's rows (every unconditional half first, then every conditional
// one). diffusers' uncond + scale * (cond - uncond) with the scale as a scalar, so it is computed once per
// distinct scale over all the rows that share it (one scale, the usual case, is one set of three kernels)
// rather than per sample, with the same per-element arithmetic.
std::vector<at::Tensor> Guide(const std::vector<DenoiseBatch::Sample*>& active, const at::Tensor& out) {
  int64_t uncond_rows = 0;
  for (const DenoiseBatch::Sample* s : active) uncond_rows += s->uncond.defined() ? 1 : 0;
  const auto n = static_cast<int64_t>(active.size());
  const at::Tensor cond = out.narrow(0, uncond_rows, n);
  std::vector<at::Tensor> eps(active.size());
  // Samples with guidance, by scale: their positions in `active` and their unconditional rows.
  struct ScaleGroup {
    double scale;
    std::vector<int64_t> samples, uncond_rows;
  };
  std::vector<ScaleGroup> by_scale;
  int64_t uncond_row = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!active[i]->uncond.defined()) {
      eps[i] = cond.narrow(0, i, 1);
      continue;
    }
    const double scale = active[i]->spec.guidance_scale;
    auto it = std::find_if(by_scale.begin(), by_scale.end(), [&](const ScaleGroup& g) { return g.scale == scale; });
    if (it == by_scale.end()) it = by_scale.insert(by_scale.end(), ScaleGroup{.scale = scale});
    it->samples.push_back(i);
    it->uncond_rows.push_back(uncond_row++);
  }
  for (const auto& [scale, samples, uncond_idx] : by_scale) {
    const auto count = static_cast<int64_t>(samples.size());
    at::Tensor c, u;
    if (count == n) {  // every sample guided with this scale: the halves are whole slices
      c = cond;
      u = out.narrow(0, 0, n);
    } else {
      const auto long_opts = at::TensorOptions().dtype(at::kLong);
      c = cond.index_select(0, ToDeviceAsync(at::tensor(samples, long_opts), out.device()));
      u = out.index_select(0, ToDeviceAsync(at::tensor(uncond_idx, long_opts), out.device()));
    }
    const at::Tensor guided = u + scale * (c - u);
    for (int64_t k = 0; k < count; ++k) eps[samples[k]] = guided.narrow(0, k, 1);
  }
  return eps;
}

}  // namespace

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
    c10::InferenceMode inference;
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
    // The text embeddings change only with the batch's composition (ids are never reused): concatenated once
    // per composition.
    if (active_ids != embedding_ids_) {
      embeddings_ = at::cat(embeddings);
      embedding_ids_ = active_ids;
    }
    UNetCall call{.sample = at::cat(inputs),
                  .timesteps = at::tensor(timesteps, at::kFloat),
                  .encoder_hidden_states = embeddings_};
    // Rows grouped by hook factory, groups in order of first appearance, rows ascending within a group.
    for (size_t r = 0; r < row_factory.size(); ++r) {
      auto it = std::find_if(call.groups.begin(), call.groups.end(),
                             [&](const UNetCall::Group& g) { return g.factory == row_factory[r]; });
      if (it == call.groups.end()) {
        call.groups.push_back(UNetCall::Group{.factory = row_factory[r], .info = {.call_index = calls_done_}});
        it = call.groups.end() - 1;
      }
      const Sample& s = *active[row_of_sample[r]];
      it->rows.push_back(static_cast<int64_t>(r));
      it->info.row_seeds.push_back(s.spec.seed);
      it->info.row_is_uncond.push_back(row_uncond[r]);
      it->info.row_sample.push_back(active_ids[row_of_sample[r]]);
      it->info.row_call_index.push_back(s.state->step_index());
      it->info.row_hook_seeds.push_back(s.spec.hook_seed);
    }
    out = graphs_ != nullptr ? graphs_->Run(model_.unet(), call) : RunUNetCall(model_.unet(), call);
    return absl::OkStatus();
  });
  if (!unet.ok()) return unet;

  absl::Status stepped = GuardTorch("scheduler step", [&]() -> absl::Status {
    c10::InferenceMode inference;
    const std::vector<at::Tensor> eps = Guide(active, out);
    // Samples on equal schedules at one step index (a request's images; requests with the same scheduler and
    // step count admitted together) take one scheduler step together (SamplerState::StepTogether: the same
    // arithmetic row for row); others alone.
    std::vector<std::vector<size_t>> together;
    for (size_t i = 0; i < active.size(); ++i) {
      auto it = std::find_if(together.begin(), together.end(), [&](const std::vector<size_t>& g) {
        const SamplerState& other = *active[g.front()]->state;
        return other.schedule().SameAs(active[i]->state->schedule()) &&
               other.step_index() == active[i]->state->step_index();
      });
      if (it == together.end()) {
        together.push_back({i});
      } else {
        it->push_back(i);
      }
    }
    for (const std::vector<size_t>& group : together) {
      std::vector<SamplerState*> states;
      std::vector<at::Tensor> group_eps, group_latents;
      std::vector<at::Generator*> generators;
      for (size_t i : group) {
        states.push_back(active[i]->state.get());
        group_eps.push_back(eps[i]);
        group_latents.push_back(active[i]->latents);
        generators.push_back(&active[i]->generator);
      }
      absl::StatusOr<at::Tensor> next =
          group.size() == 1 ? states[0]->Step(eps[group[0]], active[group[0]]->latents, generators[0])
                            : SamplerState::StepTogether(states, at::cat(group_eps), at::cat(group_latents),
                                                         generators);
      if (!next.ok()) return next.status();
      for (size_t k = 0; k < group.size(); ++k) {
        Sample* s = active[group[k]];
        s->latents = group.size() == 1 ? *next : next->narrow(0, static_cast<int64_t>(k), 1);
        s->unet_rows += s->rows_per_call();
      }
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
