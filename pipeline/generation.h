// What a caller asks the pipeline for. BatchSpec holds what must be equal across a batch (it fixes tensor shapes
// and the schedule); SampleSpec what may differ per sample. Plain values: built on any thread, moved to the
// worker that runs the batch.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "pipeline/scheduler_config.h"
#include "pipeline/transformer_hook.h"

namespace tomeserve::pipeline {

// One UNet call of a batch, as a hook factory sees it: the rows of one HookGroup (every row of the call when
// the batch has one group), in the group's row order.
struct UNetCallInfo {
  int call_index;                       // the batch's 0-based UNet call (callers outside DenoiseBatch)
  std::vector<uint64_t> row_seeds;      // seed of the sample each UNet input row belongs to
  std::vector<bool> row_is_uncond;      // row is the unconditional (negative-prompt) half of its sample
  std::vector<int> row_sample;          // id of the sample (within the batch) each row belongs to
  std::vector<int> row_call_index;      // the row's sample's own 0-based UNet call (samples join at any step)
  std::vector<uint64_t> row_hook_seeds; // the row's sample's SampleSpec::hook_seed
};

// Makes the per-call TransformerBlockHook (Token Merging attaches here). Shared; its const interface is
// thread-safe. The pipeline calls ForCall on the worker thread once per UNet call; the returned hook lives for
// that call.
class HookFactory {
 public:
  virtual ~HookFactory() = default;
  virtual std::unique_ptr<TransformerBlockHook> ForCall(const UNetCallInfo& call) const = 0;
};

// The size fixes the tensor shapes of a batch. The schedule and hooks are the defaults for samples that do not
// set their own (StartBatch / Generate); a running DenoiseBatch mixes samples with any of them.
struct BatchSpec {
  int width = 0;   // pixels; 0 = the model's native size. Multiple of the VAE's upscale factor (8).
  int height = 0;
  int num_inference_steps = 50;
  SchedulerKind scheduler = SchedulerKind::kPndm;
  std::shared_ptr<const HookFactory> hooks;  // null: plain UNet
};

struct SampleSpec {
  std::string prompt;
  std::string negative_prompt;
  uint64_t seed = 0;
  // Classifier-free guidance scale; <= 1 skips the unconditional half (as diffusers does).
  double guidance_scale = 7.5;
  // Optional initial latents [4, h, w] or [1, 4, h, w] (any float dtype, any device) used instead of noise drawn
  // from `seed`; like drawn noise (and like diffusers' `latents=`) they are multiplied by the scheduler's
  // init_noise_sigma.
  at::Tensor init_latents;
  // This sample's schedule; unset: the BatchSpec's.
  std::optional<int> num_inference_steps;
  std::optional<SchedulerKind> scheduler;
  // This sample's hook factory (Token Merging); null: the BatchSpec's. Samples whose factory is the same object
  // share one HookGroup in a UNet call, so callers reuse one factory per setting.
  std::shared_ptr<const HookFactory> hooks;
  // Mixed into the hook's per-sample random draws (the ToMe seed), so that settings differing only in their
  // seed can share a factory (and a group).
  uint64_t hook_seed = 0;
};

// Wall-clock seconds spent in each phase of a batch.
struct PhaseTimings {
  double text_encoding = 0, denoising = 0, decoding = 0;
};

struct GeneratedImage {
  at::Tensor rgb8;     // uint8 [H, W, 3], CPU, contiguous
  at::Tensor latents;  // final latents [1, 4, h, w] before decoding, CPU float32
  uint64_t seed = 0;
};

}  // namespace tomeserve::pipeline
