#include "pipeline/unet.h"

#include <torch/nn/modules/container/modulelist.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "pipeline/device.h"
#include "pipeline/load_weights.h"
#include "pipeline/torch_status.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {
namespace {

Conv2dSpec SameConv(int64_t in_channels, int64_t out_channels, int64_t kernel) {
  return Conv2dSpec{in_channels, out_channels, kernel, /*stride=*/1, /*padding=*/(kernel - 1) / 2};
}

Transformer2DSpec TransformerAt(const UNet2DConditionConfig& c, size_t level) {
  return Transformer2DSpec{.channels = c.block_out_channels[level],
                           .heads = c.num_attention_heads[level],
                           .num_layers = c.transformer_layers_per_block[level],
                           .cross_attention_dim = c.cross_attention_dim[level],
                           .norm_groups = c.norm_num_groups,
                           .use_linear_projection = c.use_linear_projection,
                           .upcast_attention = c.upcast_attention};
}

}  // namespace

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNet2DConditionConfig& c, const at::TensorOptions& o)
    : config_(c) {
  const size_t n = c.block_out_channels.size();
  const int64_t temb = c.time_embed_dim();
  conv_in_ = register_module("conv_in",
                             Conv2d(SameConv(c.in_channels, c.block_out_channels[0], c.conv_in_kernel), o));
  auto time_embedding = register_module("time_embedding", std::make_shared<torch::nn::Module>());
  time_linear_1_ =
      time_embedding->register_module("linear_1", Linear(c.block_out_channels[0], temb, true, o));
  time_linear_2_ = time_embedding->register_module("linear_2", Linear(temb, temb, true, o));
  if (c.text_time()) {
    auto add_embedding = register_module("add_embedding", std::make_shared<torch::nn::Module>());
    add_linear_1_ = add_embedding->register_module("linear_1", Linear(c.added_cond_dim, temb, true, o));
    add_linear_2_ = add_embedding->register_module("linear_2", Linear(temb, temb, true, o));
  }

  UNetBlockSpec base{.temb_channels = temb, .groups = c.norm_num_groups, .eps = c.norm_eps};
  auto downs = register_module("down_blocks", torch::nn::ModuleList());
  for (size_t i = 0; i < n; ++i) {
    UNetBlockSpec s = base;
    s.kind = c.down_block_types[i];
    s.in_channels = c.block_out_channels[i == 0 ? 0 : i - 1];
    s.out_channels = c.block_out_channels[i];
    s.num_layers = c.layers_per_block[i];
    s.add_sampler = i + 1 != n;
    s.downsample_padding = c.downsample_padding;
    s.transformer = TransformerAt(c, i);
    down_blocks_.push_back(UNetDownBlock(s, absl::StrCat("down_blocks.", i), o));
    downs->push_back(down_blocks_.back());
  }

  UNetBlockSpec mid = base;
  mid.in_channels = mid.out_channels = c.block_out_channels[n - 1];
  mid.output_scale_factor = c.mid_block_scale_factor;
  mid.transformer = TransformerAt(c, n - 1);
  mid_block_ = register_module("mid_block", UNetMidBlock(mid, "mid_block", o));

  // Up block i mirrors level n-1-i; its last resnet also takes the skip of the level below (diffusers'
  // in_channels).
  auto ups = register_module("up_blocks", torch::nn::ModuleList());
  for (size_t i = 0; i < n; ++i) {
    const size_t level = n - 1 - i;
    UNetBlockSpec s = base;
    s.kind = c.up_block_types[i];
    s.prev_output_channels = c.block_out_channels[i == 0 ? level : level + 1];
    s.out_channels = c.block_out_channels[level];
    s.in_channels = c.block_out_channels[level == 0 ? 0 : level - 1];
    s.num_layers = c.layers_per_block[level] + 1;
    s.add_sampler = i + 1 != n;
    s.transformer = TransformerAt(c, level);
    up_blocks_.push_back(UNetUpBlock(s, absl::StrCat("up_blocks.", i), o));
    ups->push_back(up_blocks_.back());
  }

  conv_norm_out_ =
      register_module("conv_norm_out", GroupNorm(c.norm_num_groups, c.block_out_channels[0], c.norm_eps, o));
  conv_out_ = register_module(
      "conv_out", Conv2d(SameConv(c.block_out_channels[0], c.out_channels, c.conv_out_kernel), o));
}

at::Tensor UNet2DConditionModelImpl::TimestepFeatures(const at::Tensor& timesteps, int64_t batch,
                                                      const at::Device& device) const {
  at::Tensor t = timesteps.dim() == 0 ? timesteps.unsqueeze(0) : timesteps;
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == batch),
              "UNet: timesteps must be 0-dim, [1] or [", batch, "], got ", t.sizes());
  t = ToDeviceAsync(t, device).expand({batch});
  return Sinusoidal(t, config_.block_out_channels[0]);
}

at::Tensor UNet2DConditionModelImpl::Sinusoidal(const at::Tensor& t, int64_t dim) const {
  // diffusers' get_timestep_embedding, op for op (fp32, max_period 10000, scale 1).
  const int64_t half = dim / 2;
  at::Tensor exponent =
      at::arange(0, half, at::TensorOptions().dtype(at::kFloat).device(t.device())) * -std::log(10000.0);
  exponent = exponent / (static_cast<double>(half) - config_.freq_shift);
  at::Tensor emb = t.unsqueeze(1).to(at::kFloat) * at::exp(exponent).unsqueeze(0);
  emb = at::cat({at::sin(emb), at::cos(emb)}, -1);
  if (config_.flip_sin_to_cos) emb = at::cat({emb.slice(1, half), emb.slice(1, 0, half)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0}, 0);
  return emb;
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timesteps,
                                             const at::Tensor& encoder_hidden_states, TransformerBlockHook* hook,
                                             const UNetAddedConditions* added) const {
  return forward(sample, timesteps, encoder_hidden_states, std::vector<HookGroup>{HookGroup{.hook = hook}}, added);
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timesteps,
                                             const at::Tensor& encoder_hidden_states,
                                             const std::vector<HookGroup>& groups,
                                             const UNetAddedConditions* added) const {
  TORCH_CHECK(sample.dim() == 4 && sample.size(1) == config_.in_channels, "UNet: sample must be [B, ",
              config_.in_channels, ", h, w], got ", sample.sizes());
  const int64_t batch = sample.size(0), height = sample.size(2), width = sample.size(3);
  TORCH_CHECK(encoder_hidden_states.dim() == 3 && encoder_hidden_states.size(0) == batch,
              "UNet: encoder_hidden_states must be [", batch, ", L, D], got ", encoder_hidden_states.sizes());

  // With 2^upsamplers not dividing the size, each upsampler targets its skip connection's size instead of 2x
  // (diffusers' forward_upsample_size).
  const int64_t overall_up_factor = int64_t{1} << (up_blocks_.size() - 1);
  const bool forward_upsample_size = height % overall_up_factor != 0 || width % overall_up_factor != 0;

  at::Tensor x = config_.center_input_sample ? 2 * sample - 1.0 : sample;
  at::Tensor temb = TimestepFeatures(timesteps, batch, sample.device()).to(sample.scalar_type());
  temb = time_linear_2_->forward(at::silu(time_linear_1_->forward(temb)));
  if (config_.text_time()) {
    TORCH_CHECK(added != nullptr && added->text_embeds.defined() && added->time_ids.defined(),
                "UNet: this model (addition_embed_type \"text_time\") needs text_embeds and time_ids");
    TORCH_CHECK(added->text_embeds.dim() == 2 && added->text_embeds.size(0) == batch &&
                    added->text_embeds.size(1) == config_.pooled_text_dim(),
                "UNet: text_embeds must be [", batch, ", ", config_.pooled_text_dim(), "], got ",
                added->text_embeds.sizes());
    TORCH_CHECK(added->time_ids.dim() == 2 && added->time_ids.size(0) == batch && added->time_ids.size(1) == 6,
                "UNet: time_ids must be [", batch, ", 6], got ", added->time_ids.sizes());
    // diffusers: add_time_proj(time_ids.flatten()) reshaped per row, after the pooled text embedding.
    const at::Tensor time_ids = ToDeviceAsync(added->time_ids, sample.device()).flatten();
    const at::Tensor time_features = Sinusoidal(time_ids, config_.addition_time_embed_dim).reshape({batch, -1});
    const at::Tensor add_embeds =
        at::cat({added->text_embeds.to(at::kFloat), time_features}, -1).to(sample.scalar_type());
    temb = temb + add_linear_2_->forward(at::silu(add_linear_1_->forward(add_embeds)));
  }

  const TransformerCall call{encoder_hidden_states, groups, height, width};
  x = conv_in_->forward(x);
  std::vector<at::Tensor> skips{x};
  for (const UNetDownBlock& block : down_blocks_) x = block->forward(x, temb, call, skips);
  x = mid_block_->forward(x, temb, call);
  for (size_t i = 0; i < up_blocks_.size(); ++i) {
    const UNetUpBlock& block = up_blocks_[i];
    std::vector<int64_t> upsample_size;
    const size_t consumed = static_cast<size_t>(block->num_resnets());
    if (i + 1 != up_blocks_.size() && forward_upsample_size && skips.size() > consumed) {
      const at::Tensor& next_skip = skips[skips.size() - consumed - 1];
      upsample_size = {next_skip.size(2), next_skip.size(3)};
    }
    x = block->forward(x, temb, call, skips, upsample_size);
  }
  return conv_out_->forward(at::silu(conv_norm_out_->forward(x)));
}

absl::StatusOr<std::shared_ptr<UNet2DConditionModelImpl>> UNet2DConditionModelImpl::Load(
    const std::filesystem::path& unet_dir, const ComputeTarget& target, absl::string_view variant) {
  absl::StatusOr<UNet2DConditionConfig> config = UNet2DConditionConfig::Load(unet_dir / "config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<WeightStore> weights = WeightStore::OpenComponent(unet_dir, "diffusion_pytorch_model", variant);
  if (!weights.ok()) return weights.status();
  return GuardTorch(absl::StrCat("building the UNet from ", unet_dir.string()),
                    [&]() -> absl::StatusOr<std::shared_ptr<UNet2DConditionModelImpl>> {
                      auto model = std::make_shared<UNet2DConditionModelImpl>(
                          *config, at::TensorOptions().dtype(target.dtype).device(target.device));
                      const LoadOptions load{.channels_last_4d = target.use_channels_last()};
                      if (absl::Status s = LoadWeights(*model, *weights, load); !s.ok()) return s;
                      model->eval();
                      return model;
                    });
}

}  // namespace tomeserve::pipeline
