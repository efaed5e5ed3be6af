// diffusers' AutoencoderKL config (vae/config.json), the part the SD 1.x decode path needs. Torch-free.
// Missing keys take AutoencoderKL.__init__'s defaults (diffusers 0.42), so a config written by an older
// diffusers loads as diffusers loads it. Settings that would change the math in ways this port does not
// implement (SD3/Flux-style shift_factor, SDXL-style latents_mean/std, other up block types, a non-SiLU
// activation) are errors, never silently ignored.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {

struct VaeConfig {
  std::vector<int64_t> block_out_channels = {64};
  int64_t layers_per_block = 1;  // the decoder's up blocks hold layers_per_block + 1 resnets each
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  int64_t out_channels = 3;
  // Pixel-space size the VAE was trained at (a [h, w] list is read as h). Informational: no tiling here.
  int64_t sample_size = 32;
  // latents_for_unet = scaling_factor * vae_latents; Decode() divides by it.
  double scaling_factor = 0.18215;
  bool mid_block_add_attention = true;
  bool use_post_quant_conv = true;
  // diffusers' StableDiffusionPipeline (SD 1.x) ignores this; SDXL's pipeline decodes in fp32 when it is set
  // and the VAE is fp16. Kept so the caller can choose the decode dtype; see vae.h.
  bool force_upcast = true;
  // One per level, all "UpDecoderBlock2D" (checked); kept for error messages and symmetry with the file.
  std::vector<std::string> up_block_types = {"UpDecoderBlock2D"};

  static absl::StatusOr<VaeConfig> FromJson(const nlohmann::json& j, const std::string& where);
  static absl::StatusOr<VaeConfig> Load(const std::filesystem::path& config_json);
};

}  // namespace tomeserve::pipeline
