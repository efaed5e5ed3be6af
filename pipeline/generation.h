// What a caller asks the pipeline for. BatchSpec holds what must be equal across a batch (it fixes tensor shapes
// and the schedule); SampleSpec what may differ per sample. Plain values: built on any thread, moved to the
// worker that runs the batch.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "pipeline/scheduler_config.h"
#include "pipeline/transformer_hook.h"

namespace tomeserve::pipeline {

class HookFactory;
struct UNetCallInfo;

// How a hook's per-call device inputs get to the device (Token Merging's random partitions). The runner of a
// UNet call provides it; without one (UNetCallInfo::inputs null) hooks copy with ToDeviceAsync. Under a CUDA
// graph (UNetGraphs) the capture records each upload as a static device tensor plus the recipe that recomputes
// it, and every replay refills it for its own call. Used on the thread that runs the call.
class HookInputs {
 public:
  // Recomputes an input for another call of the same layout (same groups, rows and sizes): a CPU tensor of the
  // same shape and dtype. Depends on the call only, never on device data.
  using Redraw = std::function<at::Tensor(const UNetCallInfo& call)>;

  virtual ~HookInputs() = default;
  // `host` (a CPU tensor, the value for this call) on the device.
  virtual at::Tensor Upload(const at::Tensor& host, Redraw redraw) = 0;
  // A device tensor the call reads but does not own (an entry of a shared cache): kept alive as long as a
  // recording of the call may read it.
  virtual void Retain(const at::Tensor& device) = 0;
  // Host bookkeeping the hook did for this call besides uploads (Token Merging's merge counts), to be done again
  // on the factory of each call that replays a recording of it (a replay runs no hook code).
  using Effect = std::function<void(const HookFactory& factory)>;
  virtual void OnReplay(Effect effect) = 0;
};

// One UNet call of a batch, as a hook factory sees it: the rows of one HookGroup (every row of the call when
// the batch has one group), in the group's row order.
struct UNetCallInfo {
  int call_index;                       // the batch's 0-based UNet call (callers outside DenoiseBatch)
  std::vector<uint64_t> row_seeds;      // seed of the sample each UNet input row belongs to
  std::vector<bool> row_is_uncond;      // row is the unconditional (negative-prompt) half of its sample
  std::vector<int> row_sample;          // id of the sample (within the batch) each row belongs to
  std::vector<int> row_call_index;      // the row's sample's own 0-based UNet call (samples join at any step)
  std::vector<uint64_t> row_hook_seeds; // the row's sample's SampleSpec::hook_seed
  HookInputs* inputs = nullptr;         // not owned; null: upload with ToDeviceAsync
};

// Makes the per-call TransformerBlockHook (Token Merging attaches here). Shared; its const interface is
// thread-safe. The pipeline calls ForCall on the worker thread once per UNet call; the returned hook lives for
// that call.
class HookFactory {
 public:
  virtual ~HookFactory() = default;
  virtual std::unique_ptr<TransformerBlockHook> ForCall(const UNetCallInfo& call) const = 0;
  // Equal for factories whose hooks launch the same device work for calls of the same layout, differing only in
  // what they upload through HookInputs (so a CUDA graph captured with one replays for the other); nullopt when
  // the hooks cannot be captured (the call then runs eagerly).
  virtual std::optional<std::string> CaptureKey() const { return std::nullopt; }
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
