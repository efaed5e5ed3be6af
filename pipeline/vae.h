// The decode half of diffusers' AutoencoderKL (SD 1.x): latents -> image in [-1, 1], plus diffusers'
// postprocess to 8-bit RGB. The module tree spells the checkpoint keys:
//   post_quant_conv,
//   decoder.conv_in,
//   decoder.mid_block.{resnets.0, attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}, resnets.1},
//   decoder.up_blocks.N.{resnets.M, upsamplers.0.conv},
//   decoder.conv_norm_out, decoder.conv_out.
// The encoder (encoder.*, quant_conv.*) is not built; its tensors are skipped at load.
//
// Precision: the decoder runs in the dtype it was loaded with, exactly like diffusers, which decodes in the
// VAE's dtype. diffusers' StableDiffusionPipeline (SD 1.x) does NOT upcast an fp16 VAE (only the SDXL and
// upscale pipelines honour config.force_upcast), so fp16 parity with diffusers means loading the VAE in fp16;
// loading it in fp32 while the UNet runs in fp16 (what force_upcast asks for) is more robust against fp16
// overflow and costs little, since decode runs once per image. bf16 has fp32's range and needs no upcast. The
// parity tests hold the fp32 path to 1e-5.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <filesystem>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "pipeline/device.h"
#include "pipeline/layers.h"
#include "pipeline/resnet_block.h"
#include "pipeline/vae_config.h"

namespace tomeserve::pipeline {

// diffusers' Attention as built for the VAE mid block (_from_deprecated_attn_block): GroupNorm over channels,
// one head of width C over the h*w positions, output projection, residual. Keys: group_norm, to_q, to_k,
// to_v, to_out.0 (legacy checkpoints: query, key, value, proj_attn; renamed at load as diffusers does).
class VaeAttentionImpl : public torch::nn::Module {
 public:
  VaeAttentionImpl(int64_t channels, int64_t groups, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;  // [B, C, H, W] -> same

 private:
  GroupNorm group_norm_{nullptr};
  Linear to_q_{nullptr}, to_k_{nullptr}, to_v_{nullptr}, to_out_{nullptr};
};
TORCH_MODULE(VaeAttention);

// UNetMidBlock2D with temb=None: resnets.0, then (attentions.0 when enabled) and resnets.1.
class VaeMidBlockImpl : public torch::nn::Module {
 public:
  VaeMidBlockImpl(int64_t channels, int64_t groups, bool add_attention, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  torch::nn::ModuleList resnets_, attentions_;
};
TORCH_MODULE(VaeMidBlock);

// UpDecoderBlock2D: `layers` resnets, then (unless last) nearest 2x upsampling + 3x3 conv
// (upsamplers.0.conv).
class UpDecoderBlockImpl : public torch::nn::Module {
 public:
  UpDecoderBlockImpl(int64_t in_channels, int64_t out_channels, int64_t layers, int64_t groups, bool upsample,
                     const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  torch::nn::ModuleList resnets_;
  Conv2d upsample_conv_{nullptr};  // null on the last block
};
TORCH_MODULE(UpDecoderBlock);

class VaeDecoderImpl : public torch::nn::Module {
 public:
  VaeDecoderImpl(const VaeConfig& config, const at::TensorOptions& options);

  // Loads vae/{config.json, diffusion_pytorch_model.safetensors} onto `target`, in target.dtype (see the note
  // on precision above; the caller picks the dtype); `variant` as WeightStore::OpenComponent's.
  static absl::StatusOr<std::shared_ptr<VaeDecoderImpl>> Load(const std::filesystem::path& vae_dir,
                                                              const ComputeTarget& target,
                                                              absl::string_view variant = "");

  // latents: [B, latent_channels, h, w], as the denoiser leaves them (still multiplied by scaling_factor),
  // any floating dtype, any device. Divides by scaling_factor in the latents' own dtype (as diffusers'
  // `latents / scaling_factor` does), then runs in this module's dtype on its device.
  // Returns the image [B, out_channels, 8h, 8w] (for 4 levels) in [-1, 1] (not clamped), on this module's
  // device and in its dtype. Throws c10::Error on a bad shape (callers convert at the pipeline boundary).
  at::Tensor Decode(const at::Tensor& latents) const;
  // The same through diffusers' tiled decode (AutoencoderKL.enable_tiling): latents larger than the tile
  // (sample_size / upscale_factor latent pixels, 64 for SD 1.5) are decoded in tiles that overlap by a quarter,
  // and the seams are blended linearly over a quarter tile, so peak memory is one tile's whatever the size. Equal
  // to diffusers' tiled decode; not to Decode() (the blend changes the seams). Smaller latents: Decode().
  at::Tensor DecodeTiled(const at::Tensor& latents) const;
  int64_t tile_latent_size() const { return config_.sample_size / upscale_factor(); }

  const VaeConfig& config() const { return config_; }
  // Output pixels per latent pixel: 2^(levels - 1), 8 for SD 1.x.
  int64_t upscale_factor() const { return int64_t{1} << (config_.block_out_channels.size() - 1); }

 private:
  // Checks the latents and divides by scaling_factor in their dtype, then moves them to this module's device and
  // dtype.
  at::Tensor Unscale(const at::Tensor& latents) const;
  // post_quant_conv and the decoder on unscaled latents.
  at::Tensor Forward(const at::Tensor& z) const;

  VaeConfig config_;
  Conv2d post_quant_conv_{nullptr};  // null when config.use_post_quant_conv is false
  Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  VaeMidBlock mid_block_{nullptr};
  torch::nn::ModuleList up_blocks_;
  GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(VaeDecoder);

// diffusers' VaeImageProcessor.postprocess(output_type="pil") pixel math, step for step so that equal inputs
// give equal bytes: (x * 0.5 + 0.5).clamp(0, 1) in the image's dtype, then float32, * 255, round half to even
// (numpy's round), cast to uint8, all on the image's device (IEEE float32 gives the same bytes as numpy on the
// CPU); only the uint8 pixels are copied to the host. NaN (an fp16 overflow upstream) becomes 0.
// image: [B, 3, H, W] -> uint8 [B, H, W, 3], CPU, contiguous.
at::Tensor ToRgb8(const at::Tensor& image);

}  // namespace tomeserve::pipeline
