// diffusers' ResnetBlock2D ("default" time-embedding mode), shared by the UNet and the VAE. Keys: norm1, conv1,
// time_emb_proj (UNet only), norm2, conv2, conv_shortcut (when in != out channels).
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "pipeline/layers.h"

namespace tomeserve::pipeline {

struct ResnetSpec {
  int64_t in_channels, out_channels;
  int64_t temb_channels = 0;  // 0: no time embedding (VAE)
  int64_t groups = 32;
  double eps = 1e-5;
  double output_scale_factor = 1.0;
};

class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  ResnetBlock2DImpl(const ResnetSpec& spec, const at::TensorOptions& options);
  // temb: [B, temb_channels] or undefined when the block has none.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {}) const;

 private:
  ResnetSpec spec_;
  GroupNorm norm1_{nullptr}, norm2_{nullptr};
  Conv2d conv1_{nullptr}, conv2_{nullptr}, conv_shortcut_{nullptr};
  Linear time_emb_proj_{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

}  // namespace tomeserve::pipeline
