// The UNet's down, mid and up blocks (diffusers' CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn,
// CrossAttnUpBlock2D / UpBlock2D) and their resamplers. Keys: resnets.M, attentions.M, downsamplers.0.conv,
// upsamplers.0.conv. A block's "kind" says whether a Transformer2DModel follows each resnet.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pipeline/layers.h"
#include "pipeline/resnet_block.h"
#include "pipeline/transformer_2d.h"
#include "pipeline/unet_config.h"

namespace tomeserve::pipeline {

struct UNetBlockSpec {
  UNetBlockKind kind = UNetBlockKind::kCrossAttn;
  int64_t in_channels = 0;  // down/mid: block input; up: the skip channels of the level below
  int64_t out_channels = 0;
  int64_t prev_output_channels = 0;  // up blocks: channels of the incoming hidden state
  int64_t temb_channels = 0;
  int64_t num_layers = 1;  // resnets (mid: attention + resnet pairs after the first resnet)
  int64_t groups = 32;
  double eps = 1e-5;
  double output_scale_factor = 1.0;  // mid block resnets (mid_block_scale_factor)
  bool add_sampler = false;          // downsamplers.0 / upsamplers.0
  int64_t downsample_padding = 1;
  Transformer2DSpec transformer{};  // channels = out_channels; used when kind == kCrossAttn
};

// Conv 3x3 with stride 2 (padding 0 pads right/bottom by one first, as diffusers' Downsample2D does).
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t padding, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  int64_t padding_;
  Conv2d conv_{nullptr};
};
TORCH_MODULE(Downsample2D);

// Nearest 2x upsampling (or to `size` when given, as for latents not divisible by 2^levels), then conv 3x3.
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x, const std::vector<int64_t>& size) const;  // size: {} or {h, w}

 private:
  Conv2d conv_{nullptr};
};
TORCH_MODULE(Upsample2D);

class UNetDownBlockImpl : public torch::nn::Module {
 public:
  UNetDownBlockImpl(const UNetBlockSpec& spec, const std::string& path, const at::TensorOptions& options);
  // Appends the block's skip outputs (one per resnet, plus the downsampled output) to `skips`.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const TransformerCall& call,
                     std::vector<at::Tensor>& skips) const;

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;  // empty for DownBlock2D
  Downsample2D downsampler_{nullptr};
};
TORCH_MODULE(UNetDownBlock);

class UNetMidBlockImpl : public torch::nn::Module {
 public:
  UNetMidBlockImpl(const UNetBlockSpec& spec, const std::string& path, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const TransformerCall& call) const;

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;
};
TORCH_MODULE(UNetMidBlock);

class UNetUpBlockImpl : public torch::nn::Module {
 public:
  UNetUpBlockImpl(const UNetBlockSpec& spec, const std::string& path, const at::TensorOptions& options);
  int64_t num_resnets() const { return static_cast<int64_t>(resnets_.size()); }
  // Consumes num_resnets() skips from the back of `skips`. upsample_size: {} (2x) or the {h, w} to upsample
  // to.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const TransformerCall& call,
                     std::vector<at::Tensor>& skips, const std::vector<int64_t>& upsample_size) const;

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;  // empty for UpBlock2D
  Upsample2D upsampler_{nullptr};
};
TORCH_MODULE(UNetUpBlock);

}  // namespace tomeserve::pipeline
