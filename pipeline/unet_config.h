// diffusers' UNet2DConditionModel config (unet/config.json), limited to what Stable Diffusion 1.x/2.x and SDXL
// UNets use: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D,
// positional time embedding, "default" ResNet time conditioning, SDXL's "text_time" added conditions. Torch-free.
//
// Keys that would change the math of the model (class/addition embeddings, scale-shift ResNets, dual or
// cross-only attention, GLIGEN, other block types, ...) are rejected with an error naming the key, so an
// unsupported checkpoint fails at load instead of producing different images. Keys diffusers ignores for
// these block types (dropout, resnet_skip_time_act, resnet_out_scale_factor, cross_attention_norm, ...) and
// unknown keys are ignored here too. Scalars that diffusers accepts per level (int or list) are resolved to
// one value per level, in down-block order.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {

enum class UNetBlockKind {
  kCrossAttn,  // CrossAttnDownBlock2D / CrossAttnUpBlock2D: resnets + Transformer2DModel after each
  kPlain,      // DownBlock2D / UpBlock2D: resnets only
};

struct UNet2DConditionConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  int64_t sample_height = 0;  // "sample_size" (int or [h, w]); 0 when null. Informational: any size runs.
  int64_t sample_width = 0;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;

  // Per level (down-block order). Up block i mirrors level n-1-i.
  std::vector<UNetBlockKind> down_block_types = {UNetBlockKind::kCrossAttn, UNetBlockKind::kCrossAttn,
                                                 UNetBlockKind::kCrossAttn, UNetBlockKind::kPlain};
  std::vector<UNetBlockKind> up_block_types = {UNetBlockKind::kPlain, UNetBlockKind::kCrossAttn,
                                               UNetBlockKind::kCrossAttn, UNetBlockKind::kCrossAttn};
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  std::vector<int64_t> layers_per_block = {2, 2, 2, 2};
  // Attention heads per level. diffusers' naming quirk: the config key "attention_head_dim" holds the NUMBER
  // of heads (SD 1.x: 8), and "num_attention_heads" must be null. Head size = channels / heads.
  std::vector<int64_t> num_attention_heads = {8, 8, 8, 8};
  std::vector<int64_t> cross_attention_dim = {1280, 1280, 1280, 1280};
  std::vector<int64_t> transformer_layers_per_block = {1, 1, 1, 1};

  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  bool use_linear_projection = false;  // Transformer2DModel proj_in/proj_out: Linear instead of 1x1 Conv2d
  bool upcast_attention = false;       // attention computed in fp32 when the model runs in fp16/bf16
  int64_t time_embedding_dim = 0;      // 0 (null): 4 * block_out_channels[0]
  // addition_embed_type "text_time" (SDXL) when addition_time_embed_dim > 0: add_embedding takes the pooled
  // text embedding (added_cond_dim - 6 x addition_time_embed_dim values) and the six time ids' features.
  int64_t addition_time_embed_dim = 0;
  int64_t added_cond_dim = 0;  // "projection_class_embeddings_input_dim"
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;

  int64_t num_levels() const { return static_cast<int64_t>(block_out_channels.size()); }
  bool text_time() const { return addition_time_embed_dim > 0; }
  int64_t pooled_text_dim() const { return added_cond_dim - 6 * addition_time_embed_dim; }
  // How far the token grid is downsampled (1, 2, 4, ...) at each level that has transformer blocks (cross-
  // attention down or up blocks, and the mid block at the coarsest level), ascending, without repeats: SD 1.5
  // {1, 2, 4, 8}, SDXL {2, 4}. Token Merging's max_downsample patches the blocks at levels <= it, so the
  // first entry is the smallest setting that merges anything.
  std::vector<int> AttentionDownsamples() const;
  int64_t time_embed_dim() const {
    return time_embedding_dim > 0 ? time_embedding_dim : 4 * block_out_channels[0];
  }

  // `where` prefixes error messages (the file name).
  static absl::StatusOr<UNet2DConditionConfig> FromJson(const nlohmann::json& j, const std::string& where);
  static absl::StatusOr<UNet2DConditionConfig> Load(const std::filesystem::path& config_json);
};

}  // namespace tomeserve::pipeline
