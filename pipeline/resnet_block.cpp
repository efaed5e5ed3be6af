#include "pipeline/resnet_block.h"

namespace tomeserve::pipeline {

ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetSpec& s, const at::TensorOptions& o) : spec_(s) {
  norm1_ = register_module("norm1", GroupNorm(s.groups, s.in_channels, s.eps, o));
  conv1_ = register_module("conv1", Conv2d(Conv2dSpec{s.in_channels, s.out_channels, 3, 1, 1}, o));
  if (s.temb_channels > 0) {
    time_emb_proj_ = register_module("time_emb_proj", Linear(s.temb_channels, s.out_channels, true, o));
  }
  norm2_ = register_module("norm2", GroupNorm(s.groups, s.out_channels, s.eps, o));
  conv2_ = register_module("conv2", Conv2d(Conv2dSpec{s.out_channels, s.out_channels, 3, 1, 1}, o));
  if (s.in_channels != s.out_channels) {
    conv_shortcut_ = register_module("conv_shortcut", Conv2d(Conv2dSpec{s.in_channels, s.out_channels, 1, 1, 0}, o));
  }
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) const {
  at::Tensor h = conv1_->forward(at::silu(norm1_->forward(x)));
  if (time_emb_proj_ && temb.defined()) {
    h = h + time_emb_proj_->forward(at::silu(temb)).unsqueeze(-1).unsqueeze(-1);
  }
  h = conv2_->forward(at::silu(norm2_->forward(h)));
  at::Tensor shortcut = conv_shortcut_ ? conv_shortcut_->forward(x) : x;
  at::Tensor out = shortcut + h;
  return spec_.output_scale_factor == 1.0 ? out : out / spec_.output_scale_factor;
}

}  // namespace tomeserve::pipeline
