// diffusers' UNet2DConditionModel for Stable Diffusion 1.x (and 2.x-style configs with the same block types),
// driven by unet/config.json. The module tree spells the checkpoint keys: conv_in,
// time_embedding.linear_{1,2}, add_embedding.linear_{1,2} (SDXL), down_blocks.N.{resnets.M, attentions.M, downsamplers.0.conv},
// mid_block.{resnets.0, attentions.0, resnets.1}, up_blocks.N.{resnets.M, attentions.M, upsamplers.0.conv},
// conv_norm_out, conv_out.
//
// Immutable after Load(): forward() is const, keeps no state between calls and may run concurrently (e.g. on
// different CUDA streams). Token Merging enters through the per-call TransformerBlockHook.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <filesystem>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "pipeline/device.h"
#include "pipeline/layers.h"
#include "pipeline/transformer_hook.h"
#include "pipeline/unet_blocks.h"
#include "pipeline/unet_config.h"

namespace tomeserve::pipeline {

// SDXL's added conditions (addition_embed_type "text_time"), one row per sample row.
struct UNetAddedConditions {
  at::Tensor text_embeds;  // [B, pooled_text_dim]: text_encoder_2's pooled, projected output
  at::Tensor time_ids;     // [B, 6]: original size (h, w), crop top-left (y, x), target size (h, w)
};

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  UNet2DConditionModelImpl(const UNet2DConditionConfig& config, const at::TensorOptions& options);

  // Loads unet/{config.json, diffusion_pytorch_model.safetensors (or its sharded index)} onto `target`;
  // `variant` as WeightStore::OpenComponent's.
  static absl::StatusOr<std::shared_ptr<UNet2DConditionModelImpl>> Load(const std::filesystem::path& unet_dir,
                                                                        const ComputeTarget& target,
                                                                        absl::string_view variant = "");

  // sample [B, in_channels, h, w] (any h, w >= 1) in the model's dtype and device; timesteps [B], [1] or
  // 0-dim of any numeric dtype (fractional values allowed), on any device; encoder_hidden_states [B, L,
  // cross_attention_dim]. Returns the predicted noise [B, out_channels, h, w]. Each BasicTransformerBlock
  // calls hook->ForBlock once (BlockContext: its checkpoint path and the sample's h, w); a null hook = plain
  // UNet.
  // A "text_time" model (SDXL) needs `added`; others ignore it.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, TransformerBlockHook* hook = nullptr,
                     const UNetAddedConditions* added = nullptr) const;
  // The same with rows grouped by hook (HookGroup): the groups partition the batch's rows; each transformer
  // block runs once per group. A row's output equals what forward() gives it with its group's hook.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const std::vector<HookGroup>& groups,
                     const UNetAddedConditions* added = nullptr) const;

  const UNet2DConditionConfig& config() const { return config_; }

 private:
  // Sinusoidal features [N, dim] in fp32 of `t` [N] (diffusers' get_timestep_embedding with this config's
  // flip_sin_to_cos and freq_shift).
  at::Tensor Sinusoidal(const at::Tensor& t, int64_t dim) const;
  // Timestep features [B, block_out_channels[0]] in fp32.
  at::Tensor TimestepFeatures(const at::Tensor& timesteps, int64_t batch, const at::Device& device) const;

  UNet2DConditionConfig config_;
  Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  Linear time_linear_1_{nullptr}, time_linear_2_{nullptr};
  Linear add_linear_1_{nullptr}, add_linear_2_{nullptr};  // add_embedding (text_time models)
  std::vector<UNetDownBlock> down_blocks_;
  UNetMidBlock mid_block_{nullptr};
  std::vector<UNetUpBlock> up_blocks_;
  GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

}  // namespace tomeserve::pipeline
