#include "pipeline/denoise_batch.h"

#include <algorithm>
#include <utility>

#include <c10/core/InferenceMode.h>

#include "absl/strings/str_cat.h"
#include "pipeline/device.h"
#include "pipeline/graph_layout.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"
#include "pipeline/unet_call.h"
#include "pipeline/unet_graphs.h"

namespace tomeserve::pipeline {

namespace {

// Classifier-free guidance for a whole UNet call: the guided noise prediction of each active sample ([1, C, h,
// w] each, in `active` order) from the call's rows, where sample i's halves are rows uncond_row[i] (-1 without
// guidance) and cond_row[i]. diffusers' uncond + scale * (cond - uncond) with the scale as a scalar, so it is
// computed once per distinct scale over all the rows that share it (one scale, the usual case, is one set of
// three kernels) rather than per sample, with the same per-element arithmetic.
std::vector<at::Tensor> Guide(const std::vector<DenoiseBatch::Sample*>& active, const std::vector<int64_t>& uncond_row,
                              const std::vector<int64_t>& cond_row, const at::Tensor& out) {
  const auto n = static_cast<int64_t>(active.size());
  std::vector<at::Tensor> eps(active.size());
  // Samples with guidance, by scale: their positions in `active`.
  struct ScaleGroup {
    double scale;
    std::vector<int64_t> samples;
  };
  std::vector<ScaleGroup> by_scale;
  for (int64_t i = 0; i < n; ++i) {
    if (uncond_row[i] < 0) {
      eps[i] = out.narrow(0, cond_row[i], 1);
      continue;
    }
    const double scale = active[i]->spec.guidance_scale;
    auto it = std::find_if(by_scale.begin(), by_scale.end(), [&](const ScaleGroup& g) { return g.scale == scale; });
    if (it == by_scale.end()) it = by_scale.insert(by_scale.end(), ScaleGroup{.scale = scale});
    it->samples.push_back(i);
  }
  for (const auto& [scale, samples] : by_scale) {
    const auto count = static_cast<int64_t>(samples.size());
    at::Tensor c, u;
    bool pairs = count == n && out.size(0) == 2 * n;  // every row one half of a pair, in sample order
    for (int64_t i = 0; pairs && i < n; ++i) pairs = uncond_row[i] == 2 * i && cond_row[i] == 2 * i + 1;
    if (pairs) {  // the halves are strided views: [n, 2, C, h, w]
      std::vector<int64_t> shape = out.sizes().vec();
      shape.insert(shape.begin() + 1, 2);
      shape[0] = n;
      const at::Tensor halves = out.view(shape);
      u = halves.select(1, 0);
      c = halves.select(1, 1);
    } else {
      std::vector<int64_t> u_idx, c_idx;
      for (int64_t i : samples) {
        u_idx.push_back(uncond_row[i]);
        c_idx.push_back(cond_row[i]);
      }
      const auto long_opts = at::TensorOptions().dtype(at::kLong);
      u = out.index_select(0, ToDeviceAsync(at::tensor(u_idx, long_opts), out.device()));
      c = out.index_select(0, ToDeviceAsync(at::tensor(c_idx, long_opts), out.device()));
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
  // The active samples in the canonical row order of pipeline/graph_layout.h (grouped by hook settings, guided
  // samples first), so that CUDA graphs see one layout per shape, whoever the samples are.
  std::vector<Sample*> active;
  std::vector<int> active_ids;
  {
    std::vector<Sample*> found;
    std::vector<int> found_ids;
    std::vector<LayoutSample> layout;
    // Each distinct factory's sort key, once: its capture key, then its first appearance (which tells apart
    // factories with equal keys, so each stays one contiguous group).
    std::vector<std::pair<const HookFactory*, std::string>> factories;
    for (auto& [id, s] : samples_) {
      if (!s.active()) continue;
      const HookFactory* f = s.spec.hooks.get();
      std::string settings;
      if (f != nullptr) {
        auto it = std::find_if(factories.begin(), factories.end(), [&](const auto& e) { return e.first == f; });
        if (it == factories.end()) {
          it = factories.insert(factories.end(), {f, absl::StrCat(f->CaptureKey().value_or("~"), "\x1f",
                                                                  factories.size())});
        }
        settings = it->second;
      }
      found.push_back(&s);
      found_ids.push_back(id);
      layout.push_back({.settings = std::move(settings), .guided = s.uncond.defined()});
    }
    for (size_t i : CanonicalOrder(layout)) {
      active.push_back(found[i]);
      active_ids.push_back(found_ids[i]);
    }
  }
  if (active.empty()) return absl::OkStatus();

  at::Tensor out;
  std::vector<int64_t> uncond_row(active.size(), -1), cond_row(active.size(), -1);
  absl::Status unet = GuardTorch(absl::StrCat("denoising step (UNet call ", calls_done_ + 1, ")"), [&]() -> absl::Status {
    c10::InferenceMode inference;
    std::vector<at::Tensor> inputs, embeddings, pooled, time_ids;
    std::vector<float> timesteps;
    UNetCall call;
    for (size_t i = 0; i < active.size(); ++i) {
      Sample& s = *active[i];
      const at::Tensor scaled = s.state->ScaleModelInput(s.latents);
      const HookFactory* factory = s.spec.hooks.get();
      if (call.groups.empty() || call.groups.back().factory != factory) {
        call.groups.push_back(UNetCall::Group{.factory = factory, .info = {.call_index = calls_done_}});
      }
      UNetCall::Group& g = call.groups.back();
      for (bool uncond : {true, false}) {  // a guided sample's halves side by side
        if (uncond && !s.uncond.defined()) continue;
        const auto row = static_cast<int64_t>(inputs.size());
        (uncond ? uncond_row : cond_row)[i] = row;
        inputs.push_back(scaled);
        const TextConditioning& text = uncond ? s.uncond : s.cond;
        embeddings.push_back(text.embeds);
        if (text.pooled.defined()) pooled.push_back(text.pooled);
        if (s.time_ids.defined()) time_ids.push_back(s.time_ids);
        timesteps.push_back(s.state->timestep());
        g.rows.push_back(row);
        g.info.row_seeds.push_back(s.spec.seed);
        g.info.row_is_uncond.push_back(uncond);
        g.info.row_sample.push_back(active_ids[i]);
        g.info.row_call_index.push_back(s.state->step_index());
        g.info.row_hook_seeds.push_back(s.spec.hook_seed);
      }
    }
    // The text embeddings change only with the batch's composition (ids are never reused, and the order is a
    // function of the composition): concatenated once per composition.
    if (active_ids != embedding_ids_) {
      embeddings_ = at::cat(embeddings);
      added_ = {};
      if (!pooled.empty()) added_ = {.text_embeds = at::cat(pooled), .time_ids = at::cat(time_ids)};
      embedding_ids_ = active_ids;
    }
    call.sample = at::cat(inputs);
    call.timesteps = at::tensor(timesteps, at::kFloat);
    call.encoder_hidden_states = embeddings_;
    call.added = added_;
    out = graphs_ != nullptr ? graphs_->Run(model_.unet(), call) : RunUNetCall(model_.unet(), call);
    return absl::OkStatus();
  });
  if (!unet.ok()) return unet;

  absl::Status stepped = GuardTorch("scheduler step", [&]() -> absl::Status {
    c10::InferenceMode inference;
    const std::vector<at::Tensor> eps = Guide(active, uncond_row, cond_row, out);
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
