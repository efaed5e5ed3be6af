// The step-wise state of one running batch: per-sample latents, scheduler state, noise generator and text
// embeddings. Owned by the worker thread that created it (via StableDiffusion::StartBatch) and only touched by
// it; the StableDiffusion it came from must outlive it. Between Step() calls the caller may report progress,
// check deadlines and Cancel() samples: a cancelled sample leaves the UNet batch from the next step on and the
// others continue. Per-sample state is kept per sample (not per batch) so that samples can later join and leave
// at step boundaries.
#pragma once

#include <memory>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pipeline/generation.h"
#include "pipeline/scheduler.h"

namespace tomeserve::pipeline {

class StableDiffusion;

class DenoiseBatch {
 public:
  struct Sample {
    SampleSpec spec;
    at::Tensor cond;    // [1, 77, D] prompt embedding
    at::Tensor uncond;  // [1, 77, D] negative-prompt embedding; undefined when guidance <= 1
    at::Tensor latents; // [1, 4, h, w] on the model's device, model dtype
    std::unique_ptr<SamplerState> state;
    at::Generator generator;  // CPU, seeded with spec.seed: initial noise and ancestral noise
    bool cancelled = false;
  };

  DenoiseBatch(const StableDiffusion& model, BatchSpec spec, std::shared_ptr<const NoiseSchedule> schedule,
               std::vector<Sample> samples);

  // One UNet call for every active sample, then one scheduler step each. After an error the batch is unusable
  // (some samples may have advanced and others not): the caller fails or retries the whole batch.
  absl::Status Step();
  bool Done() const;
  int calls_done() const { return calls_done_; }
  int num_calls() const { return schedule_->num_calls(); }
  const BatchSpec& spec() const { return spec_; }
  int latent_height() const;
  int latent_width() const;

  int num_samples() const { return static_cast<int>(samples_.size()); }
  // Stops `sample` at the next step boundary. Returns false (and does nothing) for an index out of range.
  bool Cancel(int sample);
  bool cancelled(int sample) const { return samples_.at(sample).cancelled; }
  const Sample& sample(int i) const { return samples_.at(i); }

  // Final latents of the samples that were not cancelled, in sample order: [B', C, h, w]; an undefined tensor
  // when every sample was cancelled.
  absl::StatusOr<at::Tensor> ActiveLatents() const;

 private:
  const StableDiffusion& model_;
  BatchSpec spec_;
  std::shared_ptr<const NoiseSchedule> schedule_;
  std::vector<Sample> samples_;
  int calls_done_ = 0;
};

}  // namespace tomeserve::pipeline
