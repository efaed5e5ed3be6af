// The step-wise state of one running batch: samples of one model and one latent size, each with its own
// latents, schedule (step count, scheduler kind) and step index, noise generator, text embeddings, guidance and
// hook factory (Token Merging settings). This is the one denoising driver: StableDiffusion::Generate runs a
// fixed set of samples through it, the server's worker re-forms it at every step boundary (Add / Remove).
//
// Owned by one thread (the worker that created it) and only touched by it; the StableDiffusion it came from
// must outlive it. Samples are kept by id (ascending = admission order); a sample's result never depends on its
// batch-mates or on when they join or leave: every per-sample quantity (noise, timestep, guidance, scheduler
// state, ToMe partition) is the sample's own, and rows are independent in every UNet layer.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pipeline/generation.h"
#include "pipeline/scheduler.h"
#include "pipeline/text_conditioning.h"
#include "pipeline/unet.h"

namespace tomeserve::pipeline {

class StableDiffusion;
class UNetGraphs;

class DenoiseBatch {
 public:
  // One sample's whole denoising state; movable between batches of the same model and latent size (the
  // server parks a sample evicted after an out-of-memory error and adds it back later, state intact).
  struct Sample {
    SampleSpec spec;     // resolved: num_inference_steps and scheduler set, hooks the sample's own (or null)
    TextConditioning cond;    // the prompt's: embeds [1, 77, D] (+ SDXL's pooled [1, P])
    TextConditioning uncond;  // the negative prompt's; undefined when guidance <= 1
    at::Tensor time_ids;      // [1, 6]: SDXL's add_time_ids (both halves); undefined on SD 1.x
    at::Tensor latents;  // [1, 4, h, w] on the model's device, model dtype
    std::unique_ptr<SamplerState> state;
    at::Generator generator;  // CPU, seeded with spec.seed: initial noise and ancestral noise
    bool cancelled = false;
    int64_t unet_rows = 0;  // UNet input rows computed for this sample so far (1 or 2 per call)

    int rows_per_call() const { return uncond.defined() ? 2 : 1; }
    bool done() const { return state->done(); }
    bool active() const { return !cancelled && !state->done(); }
  };

  // An empty batch for latents of `latent_height` x `latent_width`.
  DenoiseBatch(const StableDiffusion& model, int64_t latent_height, int64_t latent_width);

  // Adds a prepared sample (StableDiffusion::PrepareSamples) whose latents have this batch's size; it takes
  // part from the next Step(). Returns its id.
  absl::StatusOr<int> Add(Sample sample);
  // Takes a sample out (done, cancelled or evicted), with its state. nullopt for an unknown id.
  std::optional<Sample> Remove(int id);

  // One UNet call for every active sample (each at its own step, with its own timestep row), its rows in the
  // canonical order of pipeline/graph_layout.h (grouped by hook settings, a guided sample's two halves side by
  // side) so CUDA graphs see one layout per shape, then classifier-free guidance and one scheduler step each.
  // All-or-nothing for the UNet call: when it fails (out of memory, say) no sample has changed, and the caller
  // may remove samples and call Step() again. A failure after it (in a scheduler step) is reported as INTERNAL
  // and leaves the batch unusable.
  absl::Status Step();
  // True when no sample is active (including an empty batch).
  bool Done() const;
  int calls_done() const { return calls_done_; }
  // The most UNet calls any sample needs (its schedule's num_calls).
  int num_calls() const;
  int64_t latent_height() const { return latent_height_; }
  int64_t latent_width() const { return latent_width_; }
  // UNet input rows the next Step() computes: 2 per active sample with guidance, 1 without.
  int active_rows() const;
  int active_samples() const;

  int num_samples() const { return static_cast<int>(samples_.size()); }
  // Ids in admission order.
  std::vector<int> ids() const;
  // Stops `id` at the next step boundary (it stays in the batch, frozen). Returns false for an unknown id.
  bool Cancel(int id);
  bool cancelled(int id) const { return samples_.at(id).cancelled; }
  bool contains(int id) const { return samples_.contains(id); }
  const Sample& sample(int id) const { return samples_.at(id); }

  // Runs the UNet calls through `graphs` (CUDA graphs; not owned; same model and thread, outlives the batch),
  // or eagerly when null (the default).
  void set_graphs(UNetGraphs* graphs) { graphs_ = graphs; }

  // Final latents of the samples that were not cancelled, in id order: [B', C, h, w]; an undefined tensor
  // when every sample was cancelled.
  absl::StatusOr<at::Tensor> ActiveLatents() const;

 private:
  const StableDiffusion& model_;
  int64_t latent_height_, latent_width_;
  std::map<int, Sample> samples_;
  int next_id_ = 0;
  int calls_done_ = 0;
  UNetGraphs* graphs_ = nullptr;
  // The UNet's text-embedding rows (and SDXL's added conditions) for the active samples `embedding_ids_`
  // (Step's row layout).
  std::vector<int> embedding_ids_;
  at::Tensor embeddings_;
  UNetAddedConditions added_;
};

}  // namespace tomeserve::pipeline
