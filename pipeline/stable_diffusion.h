// A loaded Stable Diffusion model of either family model_index.json names: SD 1.x (StableDiffusionPipeline: one
// CLIP tokenizer and text encoder) or SDXL (StableDiffusionXLPipeline: two towers, SdxlTextEncoder, and a UNet
// with "text_time" added conditions), with its UNet, VAE decoder and scheduler config, on one device and dtype.
// Both families run the same denoising driver (DenoiseBatch); what differs is the text path (TextConditioning
// with or without a pooled embedding), SDXL's micro-conditioning time ids per sample, and the VAE's decode
// dtype (SDXL's force_upcast). Immutable after Create() but for its text-embedding cache (internally locked): one instance serves
// batch after batch with different sizes, schedulers and Token Merging settings, and concurrent calls are safe
// (the components' forward passes are const); the server still gives each device one worker thread, because
// batches on one device only compete for it.
//
//
// A request's journey through it: EncodePrompts -> StartBatch -> DenoiseBatch::Step() x num_calls -> Decode.
// Generate() strings these together for offline use (tomeserve-gen, tests, benchmarks).
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "pipeline/clip_text_model.h"
#include "pipeline/denoise_batch.h"
#include "pipeline/clip_tokenizer.h"
#include "pipeline/device.h"
#include "pipeline/generation.h"
#include "pipeline/scheduler_config.h"
#include "pipeline/sdxl_text_encoder.h"
#include "pipeline/text_conditioning.h"
#include "pipeline/text_embedding_cache.h"
#include "pipeline/unet.h"
#include "pipeline/unet_graphs.h"
#include "pipeline/vae.h"

namespace tomeserve::pipeline {

enum class ModelFamily {
  kSd1,   // StableDiffusionPipeline (SD 1.x, and 2.x-style configs with the same blocks)
  kSdxl,  // StableDiffusionXLPipeline
};
// "sd1" / "sdxl": log lines, model descriptions.
const char* ModelFamilyName(ModelFamily family);

struct PipelineOptions {
  std::filesystem::path model_dir;  // a diffusers folder: model_index.json, tokenizer/, text_encoder/, unet/, ...
  ComputeTarget target;
  // diffusers' `variant=`: load <stem>.<variant>.safetensors (or its sharded index) in every component; empty:
  // the plain weights, or the only variant present (WeightStore::OpenComponent).
  std::string variant;
  // Text embeddings kept across calls (TextEmbeddingCache), most recently used first; 0 = none. An SD 1.x entry
  // is 77 x 768 values (118 KB in fp16).
  size_t text_cache_entries = 256;
};

// What StableDiffusion::Generate reports to and takes from its caller (a namespace-scope type: a nested one with
// default member initializers could not be a default argument of the class's own functions).
struct GenerateCallbacks {
  std::function<void(int, int)> progress;
  std::function<bool(int)> cancelled;
  UNetGraphs* graphs = nullptr;  // not owned: run the UNet calls through these (DenoiseBatch::set_graphs)
};

class StableDiffusion {
 public:
  static absl::StatusOr<std::unique_ptr<StableDiffusion>> Create(const PipelineOptions& options);

  const ComputeTarget& target() const { return options_.target; }
  const std::filesystem::path& model_dir() const { return options_.model_dir; }
  // diffusers' default size: unet.sample_size * vae upscale factor (512x512 for SD 1.5; 512 when unset).
  int native_height() const;
  int native_width() const;
  int vae_scale() const { return static_cast<int>(vae_->upscale_factor()); }
  SchedulerKind default_scheduler() const { return default_scheduler_; }
  const SchedulerConfig& scheduler_config() const { return scheduler_config_; }
  ModelFamily family() const { return family_; }
  // The (first) tokenizer: prompt token counts for validation.
  const ClipTokenizer& tokenizer() const;
  // Width of the UNet's text conditioning (SD 1.5: 768; SDXL: 768 + 1280).
  int64_t text_embed_dim() const;

  // Token ids, padded to 77, for each text, then one call of each text encoder: embeds [N, 77, D] (and SDXL's
  // pooled [N, P]) on the model's device.
  absl::StatusOr<TextConditioning> EncodePrompts(const std::vector<std::string>& texts) const;

  // Largest width or height accepted (the PNG limit).
  static constexpr int kMaxSide = 16384;

  // Validates the batch, draws initial noise per sample, encodes the prompts and returns the step-wise state.
  // `spec.width/height` of 0 become native_width()/native_height().
  absl::StatusOr<std::unique_ptr<DenoiseBatch>> StartBatch(BatchSpec spec, std::vector<SampleSpec> samples,
                                                           PhaseTimings* timings = nullptr) const;

  // The samples' starting states without a batch: validation, text encoding (each distinct text once, from the
  // text-embedding cache or encoded alone),
  // initial noise, each sample's schedule (its own steps/scheduler/hooks, or `spec`'s as defaults). The server
  // adds them to its running DenoiseBatch.
  absl::StatusOr<std::vector<DenoiseBatch::Sample>> PrepareSamples(BatchSpec spec, std::vector<SampleSpec> samples,
                                                                   PhaseTimings* timings = nullptr) const;

  // Decodes the given final latents [B, 4, h, w] to RGB8 images (one batched VAE call). `tiled`: through
  // diffusers' tiled decode (VaeDecoderImpl::DecodeTiled), for sizes whose whole decode does not fit in memory.
  absl::StatusOr<std::vector<at::Tensor>> Decode(const at::Tensor& latents, bool tiled = false) const;

  // The whole thing: StartBatch, every step (calling `progress(done_calls, num_calls)` after each), Decode.
  // `cancelled(i)`, when given, is polled between steps; a cancelled sample stops denoising and gets no image
  // (its GeneratedImage has an undefined rgb8).
  using GenerateCallbacks = pipeline::GenerateCallbacks;
  absl::StatusOr<std::vector<GeneratedImage>> Generate(const BatchSpec& spec, std::vector<SampleSpec> samples,
                                                       const GenerateCallbacks& callbacks = {},
                                                       PhaseTimings* timings = nullptr) const;

  const UNet2DConditionModelImpl& unet() const { return *unet_; }
  const VaeDecoderImpl& vae() const { return *vae_; }
  TextEmbeddingCache::Stats text_cache_stats() const { return text_cache_->stats(); }

 private:
  explicit StableDiffusion(PipelineOptions options) : options_(std::move(options)) {}
  // The components were loaded from separate configs: check that their shapes agree (latent channels, text
  // embedding width, token ids and positions), so a mismatched folder fails at load, not on the first request.
  absl::Status CheckComponentsFit() const;

  // One text path, by family: tokenizer_ + text_encoder_ (SD 1.x) or sdxl_text_ (SDXL).
  absl::Status LoadSd1Text();
  absl::Status LoadSdxlText();
  // SDXL's add_time_ids for a `height` x `width` image as diffusers builds them by default: original size,
  // crop top-left (0, 0), target size. [1, 6] in the model's dtype and device.
  at::Tensor TimeIds(int height, int width) const;

  PipelineOptions options_;
  ModelFamily family_ = ModelFamily::kSd1;
  std::unique_ptr<ClipTokenizer> tokenizer_;
  std::shared_ptr<ClipTextModelImpl> text_encoder_;
  std::unique_ptr<SdxlTextEncoder> sdxl_text_;
  bool force_zeros_for_empty_prompt_ = false;
  // An empty negative prompt's conditioning when force_zeros_for_empty_prompt (SDXL): one row of zeros, made at
  // load and shared read-only; undefined otherwise.
  TextConditioning zero_negative_;
  std::shared_ptr<UNet2DConditionModelImpl> unet_;
  std::shared_ptr<VaeDecoderImpl> vae_;
  std::unique_ptr<TextEmbeddingCache> text_cache_;
  SchedulerConfig scheduler_config_;
  SchedulerKind default_scheduler_ = SchedulerKind::kPndm;
};

}  // namespace tomeserve::pipeline
