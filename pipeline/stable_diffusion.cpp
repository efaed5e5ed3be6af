#include "pipeline/stable_diffusion.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <optional>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "pipeline/denoise_batch.h"
#include "pipeline/model_config.h"
#include "pipeline/torch_status.h"

namespace tomeserve::pipeline {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

absl::StatusOr<std::unique_ptr<StableDiffusion>> StableDiffusion::Create(const PipelineOptions& options) {
  const std::filesystem::path& dir = options.model_dir;
  if (std::filesystem::is_regular_file(dir)) {
    // What A1111 and Civitai users have: one .safetensors/.ckpt with every component in the original layout.
    return absl::InvalidArgumentError(absl::StrCat(
        dir.string(), " is a single-file checkpoint; tomeserve serves diffusers model folders (model_index.json, "
        "unet/, vae/, text_encoder/, tokenizer/, scheduler/): convert it once, offline, with "
        ".venv/bin/python scripts/convert_single_file.py ", dir.string(), " OUT_DIR --config-dir <a diffusers SD 1.5 "
        "folder> (diffusers' from_single_file) and serve OUT_DIR"));
  }
  absl::StatusOr<nlohmann::json> index = ReadJsonFile(dir / "model_index.json");
  if (!index.ok()) {
    return absl::Status(index.status().code(),
                        absl::StrCat(index.status().message(), " (is ", dir.string(), " a diffusers model folder?)"));
  }
  // The model family comes from model_index.json; a class of neither family loads as SD 1.x, whose component
  // checks (CheckComponentsFit) name what does not fit.
  std::unique_ptr<StableDiffusion> sd(new StableDiffusion(options));
  if (const auto cls = index->find("_class_name"); cls != index->end() && cls->is_string() &&
                                                   cls->get<std::string>() == "StableDiffusionXLPipeline") {
    sd->family_ = ModelFamily::kSdxl;
    const auto zeros = index->find("force_zeros_for_empty_prompt");
    // StableDiffusionXLPipeline.__init__'s default is True.
    sd->force_zeros_for_empty_prompt_ = zeros == index->end() || !zeros->is_boolean() || zeros->get<bool>();
  }
  sd->text_cache_ = std::make_unique<TextEmbeddingCache>(options.text_cache_entries);
  absl::StatusOr<SchedulerConfig> scheduler = SchedulerConfig::Load(dir / "scheduler" / "scheduler_config.json");
  if (!scheduler.ok()) return scheduler.status();
  sd->scheduler_config_ = *std::move(scheduler);
  absl::StatusOr<SchedulerKind> kind = sd->scheduler_config_.DefaultKind();
  if (!kind.ok()) return kind.status();
  sd->default_scheduler_ = *kind;

  if (absl::Status s = sd->family_ == ModelFamily::kSdxl ? sd->LoadSdxlText() : sd->LoadSd1Text(); !s.ok()) return s;
  absl::StatusOr<std::shared_ptr<UNet2DConditionModelImpl>> unet =
      UNet2DConditionModelImpl::Load(dir / "unet", options.target, options.variant);
  if (!unet.ok()) return unet.status();
  sd->unet_ = *std::move(unet);
  // StableDiffusionXLPipeline decodes an fp16 VAE in fp32 when its config says force_upcast (SDXL's original VAE
  // overflows in fp16); a fp16-safe VAE's config clears it. SD 1.x's pipeline never upcasts (see vae.h).
  ComputeTarget vae_target = options.target;
  if (sd->family_ == ModelFamily::kSdxl && vae_target.dtype == at::kHalf) {
    absl::StatusOr<VaeConfig> vae_config = VaeConfig::Load(dir / "vae" / "config.json");
    if (!vae_config.ok()) return vae_config.status();
    if (vae_config->force_upcast) vae_target.dtype = at::kFloat;
  }
  absl::StatusOr<std::shared_ptr<VaeDecoderImpl>> vae = VaeDecoderImpl::Load(dir / "vae", vae_target, options.variant);
  if (!vae.ok()) return vae.status();
  sd->vae_ = *std::move(vae);
  if (absl::Status s = sd->CheckComponentsFit(); !s.ok()) return s;
  return sd;
}

absl::Status StableDiffusion::LoadSd1Text() {
  const std::filesystem::path& dir = options_.model_dir;
  absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer = ClipTokenizer::Load(dir / "tokenizer");
  if (!tokenizer.ok()) return tokenizer.status();
  tokenizer_ = *std::move(tokenizer);
  absl::StatusOr<std::shared_ptr<ClipTextModelImpl>> text =
      ClipTextModelImpl::Load(dir / "text_encoder", options_.target, options_.variant);
  if (!text.ok()) return text.status();
  text_encoder_ = *std::move(text);
  return absl::OkStatus();
}

absl::Status StableDiffusion::LoadSdxlText() {
  absl::StatusOr<std::unique_ptr<SdxlTextEncoder>> text =
      SdxlTextEncoder::Load(options_.model_dir, options_.target, options_.variant);
  if (!text.ok()) return text.status();
  sdxl_text_ = *std::move(text);
  if (!force_zeros_for_empty_prompt_) return absl::OkStatus();
  absl::StatusOr<TextConditioning> zeros = GuardTorch(
      "allocating the empty prompt's zeros", [&]() -> absl::StatusOr<TextConditioning> { return sdxl_text_->Zeros(1); });
  if (!zeros.ok()) return zeros.status();
  zero_negative_ = *std::move(zeros);
  return absl::OkStatus();
}

absl::Status StableDiffusion::CheckComponentsFit() const {
  const std::string where = options_.model_dir.string();
  const UNet2DConditionConfig& unet = unet_->config();
  const int64_t latent = vae_->config().latent_channels;
  if (unet.in_channels != latent || unet.out_channels != latent) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": unet/config.json in_channels ", unet.in_channels, " / out_channels ", unet.out_channels,
        " must both equal vae/config.json latent_channels ", latent, " (inpainting and other variants are not "
        "text-to-image models)"));
  }
  const bool xl = family_ == ModelFamily::kSdxl;
  const char* text_files = xl ? "text_encoder/ + text_encoder_2/config.json hidden_size" : "text_encoder/config.json hidden_size";
  for (int64_t dim : unet.cross_attention_dim) {
    if (dim != text_embed_dim()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": unet/config.json cross_attention_dim ", dim,
                                                     " differs from ", text_files, " ", text_embed_dim()));
    }
  }
  if (unet.text_time() != xl) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": unet/config.json ", xl ? "has no" : "has", " addition_embed_type \"text_time\", which ",
        xl ? "StableDiffusionXLPipeline needs (model_index.json)" : "only StableDiffusionXLPipeline folders provide"));
  }
  if (xl && unet.pooled_text_dim() != sdxl_text_->pooled_dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": unet/config.json projection_class_embeddings_input_dim ", unet.added_cond_dim, " must be 6 x "
        "addition_time_embed_dim (", 6 * unet.addition_time_embed_dim, ") + text_encoder_2/config.json "
        "projection_dim (", sdxl_text_->pooled_dim(), ")"));
  }
  for (int tower = 1; tower <= (xl ? 2 : 1); ++tower) {
    const ClipTokenizer& tokenizer = xl ? sdxl_text_->tokenizer(tower) : *tokenizer_;
    const ClipTextConfig& text = xl ? sdxl_text_->config(tower) : text_encoder_->config();
    const char* folder = tower == 1 ? "text_encoder" : "text_encoder_2";
    if (static_cast<int64_t>(tokenizer.vocab_size()) > text.vocab_size ||
        text.max_position_embeddings < ClipTokenizer::kMaxLength) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": the tokenizer (", tokenizer.vocab_size(), " ids, ", ClipTokenizer::kMaxLength,
          " positions) does not fit ", folder, "/config.json (vocab_size ", text.vocab_size,
          ", max_position_embeddings ", text.max_position_embeddings, ")"));
    }
  }
  return absl::OkStatus();
}

const char* ModelFamilyName(ModelFamily family) { return family == ModelFamily::kSdxl ? "sdxl" : "sd1"; }

const ClipTokenizer& StableDiffusion::tokenizer() const {
  return family_ == ModelFamily::kSdxl ? sdxl_text_->tokenizer() : *tokenizer_;
}

int64_t StableDiffusion::text_embed_dim() const {
  return family_ == ModelFamily::kSdxl ? sdxl_text_->embed_dim() : text_encoder_->config().hidden_size;
}

at::Tensor StableDiffusion::TimeIds(int height, int width) const {
  const double h = height, w = width;
  return at::tensor({h, w, 0.0, 0.0, h, w}, at::TensorOptions().dtype(at::kDouble))
      .view({1, 6})
      .to(at::TensorOptions().dtype(options_.target.dtype).device(options_.target.device));
}

int StableDiffusion::native_height() const {
  const int64_t h = unet_->config().sample_height;
  return h > 0 ? static_cast<int>(h) * vae_scale() : 512;
}

int StableDiffusion::native_width() const {
  const int64_t w = unet_->config().sample_width;
  return w > 0 ? static_cast<int>(w) * vae_scale() : 512;
}

absl::StatusOr<TextConditioning> StableDiffusion::EncodePrompts(const std::vector<std::string>& texts) const {
  return GuardTorch("text encoding", [&]() -> absl::StatusOr<TextConditioning> {
    at::NoGradGuard no_grad;
    if (family_ == ModelFamily::kSdxl) return sdxl_text_->Encode(texts);
    return TextConditioning{.embeds = text_encoder_->forward(PaddedTokenIds(*tokenizer_, texts, options_.target.device))};
  });
}

absl::StatusOr<std::unique_ptr<DenoiseBatch>> StableDiffusion::StartBatch(BatchSpec spec,
                                                                         std::vector<SampleSpec> specs,
                                                                         PhaseTimings* timings) const {
  if (spec.width == 0) spec.width = native_width();
  if (spec.height == 0) spec.height = native_height();
  absl::StatusOr<std::vector<DenoiseBatch::Sample>> samples = PrepareSamples(spec, std::move(specs), timings);
  if (!samples.ok()) return samples.status();
  auto batch = std::make_unique<DenoiseBatch>(*this, spec.height / vae_scale(), spec.width / vae_scale());
  for (DenoiseBatch::Sample& s : *samples) {
    if (absl::StatusOr<int> id = batch->Add(std::move(s)); !id.ok()) return id.status();
  }
  return batch;
}

absl::StatusOr<std::vector<DenoiseBatch::Sample>> StableDiffusion::PrepareSamples(
    BatchSpec spec, std::vector<SampleSpec> specs, PhaseTimings* timings) const {
  const int scale = vae_scale();
  if (spec.width == 0) spec.width = native_width();
  if (spec.height == 0) spec.height = native_height();
  if (spec.width < scale || spec.height < scale || spec.width % scale != 0 || spec.height % scale != 0 ||
      spec.width > kMaxSide || spec.height > kMaxSide) {
    return absl::InvalidArgumentError(absl::StrCat("width and height must be multiples of ", scale, " in [", scale,
                                                   ", ", kMaxSide, "], got ", spec.width, "x", spec.height));
  }
  if (specs.empty()) return absl::InvalidArgumentError("a batch needs at least one sample");
  const int64_t h = spec.height / scale, w = spec.width / scale;
  const int64_t channels = vae_->config().latent_channels;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!std::isfinite(specs[i].guidance_scale)) {
      return absl::InvalidArgumentError(absl::StrCat("sample ", i, ": guidance_scale must be finite"));
    }
    const at::Tensor& init = specs[i].init_latents;
    if (init.defined() && !at::isFloatingType(init.scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat("sample ", i, ": init_latents must be a floating-point tensor"));
    }
    if (init.defined()) {
      const at::Tensor one = init.dim() == 3 ? init.unsqueeze(0) : init;
      if (one.dim() != 4 || one.size(0) != 1 || one.size(1) != channels || one.size(2) != h || one.size(3) != w) {
        return absl::InvalidArgumentError(absl::StrCat("sample ", i, ": init_latents must be [", channels, ", ", h,
                                                       ", ", w, "] for ", spec.width, "x", spec.height));
      }
    }
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const at::Tensor& init = specs[i].init_latents;
    absl::StatusOr<bool> finite = GuardTorch("checking init_latents", [&]() -> absl::StatusOr<bool> {
      return !init.defined() || at::isfinite(init).all().item<bool>();
    });
    if (!finite.ok()) return finite.status();
    if (!*finite) return absl::InvalidArgumentError(absl::StrCat("sample ", i, ": init_latents contain NaN or Inf"));
  }
  // Each sample's schedule (its own or the batch's defaults), one NoiseSchedule per distinct (kind, steps).
  std::vector<std::shared_ptr<const NoiseSchedule>> schedules;
  for (size_t i = 0; i < specs.size(); ++i) {
    SampleSpec& sp = specs[i];
    if (!sp.num_inference_steps) sp.num_inference_steps = spec.num_inference_steps;
    if (!sp.scheduler) sp.scheduler = spec.scheduler;
    if (!sp.hooks) sp.hooks = spec.hooks;
    std::shared_ptr<const NoiseSchedule> found;
    for (const auto& sch : schedules) {
      if (sch->kind() == *sp.scheduler && sch->num_inference_steps() == *sp.num_inference_steps) found = sch;
    }
    if (found == nullptr) {
      absl::StatusOr<std::shared_ptr<const NoiseSchedule>> created =
          NoiseSchedule::Create(scheduler_config_, *sp.scheduler, *sp.num_inference_steps);
      if (!created.ok()) {
        return absl::Status(created.status().code(), absl::StrCat("sample ", i, ": ", created.status().message()));
      }
      found = *created;
    }
    schedules.push_back(found);
  }

  // Every distinct text once: prompts first, then the negative prompts of the samples that use guidance. A request
  // for N images of one prompt (and the usual empty negative prompt) needs 2 texts, not 2N; samples with equal
  // texts share read-only rows of the result. Each text comes from the text-embedding cache or is encoded alone
  // (diffusers encodes a single prompt alone too), so its row never depends on the call's other texts or on
  // what the cache holds: same request, same bytes.
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> texts;
  absl::flat_hash_map<std::string, int64_t> row_of_text;
  const auto row_for = [&](const std::string& text) {
    auto [it, added] = row_of_text.try_emplace(text, static_cast<int64_t>(texts.size()));
    if (added) texts.push_back(text);
    return it->second;
  };
  std::vector<int64_t> cond_row(specs.size()), uncond_row(specs.size(), -1);
  for (size_t i = 0; i < specs.size(); ++i) cond_row[i] = row_for(specs[i].prompt);
  // SDXL's force_zeros_for_empty_prompt: an empty negative prompt is all zeros, a row after the texts.
  constexpr int64_t kZeroRow = -2;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].guidance_scale <= 1.0) continue;
    const bool zeros = zero_negative_.defined() && specs[i].negative_prompt.empty();
    uncond_row[i] = zeros ? kZeroRow : row_for(specs[i].negative_prompt);
  }
  std::vector<TextConditioning> rows(texts.size());
  for (size_t t = 0; t < texts.size(); ++t) {
    if (std::optional<TextConditioning> hit = text_cache_->Find(texts[t])) {
      rows[t] = *std::move(hit);
      continue;
    }
    absl::StatusOr<TextConditioning> encoded = EncodePrompts({texts[t]});
    if (!encoded.ok()) return encoded.status();
    text_cache_->Insert(texts[t], *encoded);
    rows[t] = *std::move(encoded);
  }
  if (std::find(uncond_row.begin(), uncond_row.end(), kZeroRow) != uncond_row.end()) {
    for (int64_t& r : uncond_row) r = r == kZeroRow ? static_cast<int64_t>(rows.size()) : r;
    rows.push_back(zero_negative_);
  }
  absl::StatusOr<TextConditioning> embeddings = GuardTorch("text encoding", [&]() -> absl::StatusOr<TextConditioning> {
    std::vector<at::Tensor> embeds, pooled;
    for (const TextConditioning& r : rows) {
      embeds.push_back(r.embeds);
      if (r.pooled.defined()) pooled.push_back(r.pooled);
    }
    return TextConditioning{.embeds = at::cat(embeds), .pooled = pooled.empty() ? at::Tensor() : at::cat(pooled)};
  });
  if (!embeddings.ok()) return embeddings.status();
  if (timings != nullptr) timings->text_encoding = SecondsSince(t0);
  const auto text_row = [&](int64_t row) {
    return TextConditioning{
        .embeds = embeddings->embeds.narrow(0, row, 1),
        .pooled = embeddings->pooled.defined() ? embeddings->pooled.narrow(0, row, 1) : at::Tensor()};
  };

  return GuardTorch("preparing latents", [&]() -> absl::StatusOr<std::vector<DenoiseBatch::Sample>> {
    std::vector<DenoiseBatch::Sample> samples;
    for (size_t i = 0; i < specs.size(); ++i) {
      DenoiseBatch::Sample s;
      s.cond = text_row(cond_row[i]);
      if (uncond_row[i] >= 0) s.uncond = text_row(uncond_row[i]);
      if (family_ == ModelFamily::kSdxl) s.time_ids = TimeIds(spec.height, spec.width);
      s.generator = at::make_generator<at::CPUGeneratorImpl>(specs[i].seed);
      const at::TensorOptions model_options = at::TensorOptions().dtype(options_.target.dtype).device(options_.target.device);
      at::Tensor initial;
      if (specs[i].init_latents.defined()) {
        const at::Tensor& given = specs[i].init_latents;
        initial = given.dim() == 3 ? given.unsqueeze(0) : given;
      } else {
        // Noise comes from the sample's own CPU generator, then moves to the device: CPU and GPU runs start from
        // the same latents and batch-mates never influence each other (diffusers with a list of CPU generators).
        // It is drawn in the compute dtype, as diffusers' randn_tensor does: a CPU fp16 randn is not an fp32
        // randn rounded to fp16.
        initial = at::randn({1, channels, h, w}, s.generator, at::TensorOptions().dtype(options_.target.dtype));
      }
      // Given latents are scaled by init_noise_sigma too, as diffusers' prepare_latents does.
      s.latents = schedules[i]->ScaleInitialNoise(initial.to(model_options));
      s.state = NewSamplerState(schedules[i]);
      s.spec = std::move(specs[i]);
      samples.push_back(std::move(s));
    }
    return samples;
  });
}

absl::StatusOr<std::vector<at::Tensor>> StableDiffusion::Decode(const at::Tensor& latents, bool tiled) const {
  return GuardTorch(tiled ? "tiled VAE decoding" : "VAE decoding", [&]() -> absl::StatusOr<std::vector<at::Tensor>> {
    at::NoGradGuard no_grad;
    at::Tensor rgb = ToRgb8(tiled ? vae_->DecodeTiled(latents) : vae_->Decode(latents));
    std::vector<at::Tensor> images;
    for (int64_t i = 0; i < rgb.size(0); ++i) images.push_back(rgb[i].contiguous());
    return images;
  });
}

absl::StatusOr<std::vector<GeneratedImage>> StableDiffusion::Generate(const BatchSpec& spec,
                                                                     std::vector<SampleSpec> samples,
                                                                     const GenerateCallbacks& callbacks,
                                                                     PhaseTimings* timings) const {
  PhaseTimings local;
  PhaseTimings* t = timings != nullptr ? timings : &local;
  absl::StatusOr<std::unique_ptr<DenoiseBatch>> batch = StartBatch(spec, std::move(samples), t);
  if (!batch.ok()) return batch.status();
  DenoiseBatch& b = **batch;
  b.set_graphs(callbacks.graphs);

  auto t0 = std::chrono::steady_clock::now();
  // StartBatch added the samples in order: their ids are 0..n-1.
  while (!b.Done()) {
    if (callbacks.cancelled) {
      for (int i = 0; i < b.num_samples(); ++i) {
        if (!b.cancelled(i) && callbacks.cancelled(i)) b.Cancel(i);
      }
      if (b.Done()) break;
    }
    if (absl::Status s = b.Step(); !s.ok()) return s;
    if (callbacks.progress) callbacks.progress(b.calls_done(), b.num_calls());
  }
  t->denoising = SecondsSince(t0);

  std::vector<GeneratedImage> out(b.num_samples());
  for (int i = 0; i < b.num_samples(); ++i) out[i].seed = b.sample(i).spec.seed;
  absl::StatusOr<at::Tensor> latents = b.ActiveLatents();
  if (!latents.ok()) return latents.status();
  if (!latents->defined()) return out;
  t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<at::Tensor>> images = Decode(*latents);
  if (!images.ok()) return images.status();
  t->decoding = SecondsSince(t0);
  absl::Status copied = GuardTorch("copying latents", [&]() -> absl::Status {
    size_t next = 0;
    for (int i = 0; i < b.num_samples(); ++i) {
      if (b.cancelled(i)) continue;
      out[i].rgb8 = (*images)[next++];
      out[i].latents = b.sample(i).latents.to(at::kCPU, at::kFloat);
    }
    return absl::OkStatus();
  });
  if (!copied.ok()) return copied;
  return out;
}

}  // namespace tomeserve::pipeline
