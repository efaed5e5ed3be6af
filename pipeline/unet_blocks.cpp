#include "pipeline/unet_blocks.h"

#include <torch/nn/modules/container/modulelist.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace tomeserve::pipeline {
namespace {

ResnetSpec Resnet(const UNetBlockSpec& s, int64_t in_channels, int64_t out_channels) {
  return ResnetSpec{.in_channels = in_channels,
                    .out_channels = out_channels,
                    .temb_channels = s.temb_channels,
                    .groups = s.groups,
                    .eps = s.eps,
                    .output_scale_factor = s.output_scale_factor};
}

// Registers `holder` as element `index` of the ModuleList `list` (so its keys read "<list>.<index>.*") and
// keeps a typed handle in `typed`.
template <typename Holder>
void Append(const std::shared_ptr<torch::nn::ModuleListImpl>& list, std::vector<Holder>& typed,
            Holder holder) {
  typed.push_back(holder);
  list->push_back(holder);
}

Transformer2DSpec TransformerFor(const UNetBlockSpec& s) {
  Transformer2DSpec t = s.transformer;
  t.channels = s.out_channels;
  return t;
}

}  // namespace

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t padding, const at::TensorOptions& o)
    : padding_(padding) {
  conv_ = register_module("conv", Conv2d(Conv2dSpec{channels, channels, 3, /*stride=*/2, padding}, o));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) const {
  return conv_->forward(padding_ == 0 ? at::constant_pad_nd(x, {0, 1, 0, 1}, 0) : x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, const at::TensorOptions& o) {
  conv_ = register_module("conv", Conv2d(Conv2dSpec{channels, channels, 3, 1, 1}, o));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x, const std::vector<int64_t>& size) const {
  // The same aten overload F.interpolate(mode="nearest") calls, with scale factors or with an output size.
  at::Tensor up = size.empty() ? at::upsample_nearest2d(x, std::nullopt, std::vector<double>{2.0, 2.0})
                               : at::upsample_nearest2d(x, at::IntArrayRef(size), std::nullopt);
  return conv_->forward(up);
}

UNetDownBlockImpl::UNetDownBlockImpl(const UNetBlockSpec& s, const std::string& path,
                                     const at::TensorOptions& o) {
  auto resnets = register_module("resnets", torch::nn::ModuleList());
  std::shared_ptr<torch::nn::ModuleListImpl> attentions;
  if (s.kind == UNetBlockKind::kCrossAttn)
    attentions = register_module("attentions", torch::nn::ModuleList());
  for (int64_t i = 0; i < s.num_layers; ++i) {
    Append(resnets, resnets_,
           ResnetBlock2D(Resnet(s, i == 0 ? s.in_channels : s.out_channels, s.out_channels), o));
    if (attentions) {
      Append(attentions, attentions_,
             Transformer2DModel(TransformerFor(s), absl::StrCat(path, ".attentions.", i), o));
    }
  }
  if (s.add_sampler) {
    auto samplers = register_module("downsamplers", torch::nn::ModuleList());
    downsampler_ = Downsample2D(s.out_channels, s.downsample_padding, o);
    samplers->push_back(downsampler_);
  }
}

at::Tensor UNetDownBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb,
                                      const TransformerCall& call, std::vector<at::Tensor>& skips) const {
  at::Tensor h = x;
  for (size_t i = 0; i < resnets_.size(); ++i) {
    h = resnets_[i]->forward(h, temb);
    if (!attentions_.empty()) h = attentions_[i]->forward(h, call);
    skips.push_back(h);
  }
  if (downsampler_) {
    h = downsampler_->forward(h);
    skips.push_back(h);
  }
  return h;
}

UNetMidBlockImpl::UNetMidBlockImpl(const UNetBlockSpec& s, const std::string& path,
                                   const at::TensorOptions& o) {
  auto attentions = register_module("attentions", torch::nn::ModuleList());
  auto resnets = register_module("resnets", torch::nn::ModuleList());
  Append(resnets, resnets_, ResnetBlock2D(Resnet(s, s.in_channels, s.out_channels), o));
  for (int64_t i = 0; i < s.num_layers; ++i) {
    Append(attentions, attentions_,
           Transformer2DModel(TransformerFor(s), absl::StrCat(path, ".attentions.", i), o));
    Append(resnets, resnets_, ResnetBlock2D(Resnet(s, s.out_channels, s.out_channels), o));
  }
}

at::Tensor UNetMidBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb,
                                     const TransformerCall& call) const {
  at::Tensor h = resnets_[0]->forward(x, temb);
  for (size_t i = 0; i < attentions_.size(); ++i) {
    h = attentions_[i]->forward(h, call);
    h = resnets_[i + 1]->forward(h, temb);
  }
  return h;
}

UNetUpBlockImpl::UNetUpBlockImpl(const UNetBlockSpec& s, const std::string& path,
                                 const at::TensorOptions& o) {
  auto resnets = register_module("resnets", torch::nn::ModuleList());
  std::shared_ptr<torch::nn::ModuleListImpl> attentions;
  if (s.kind == UNetBlockKind::kCrossAttn)
    attentions = register_module("attentions", torch::nn::ModuleList());
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const int64_t skip_channels = i == s.num_layers - 1 ? s.in_channels : s.out_channels;
    const int64_t in_channels = i == 0 ? s.prev_output_channels : s.out_channels;
    Append(resnets, resnets_, ResnetBlock2D(Resnet(s, in_channels + skip_channels, s.out_channels), o));
    if (attentions) {
      Append(attentions, attentions_,
             Transformer2DModel(TransformerFor(s), absl::StrCat(path, ".attentions.", i), o));
    }
  }
  if (s.add_sampler) {
    auto samplers = register_module("upsamplers", torch::nn::ModuleList());
    upsampler_ = Upsample2D(s.out_channels, o);
    samplers->push_back(upsampler_);
  }
}

at::Tensor UNetUpBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb, const TransformerCall& call,
                                    std::vector<at::Tensor>& skips,
                                    const std::vector<int64_t>& upsample_size) const {
  at::Tensor h = x;
  for (size_t i = 0; i < resnets_.size(); ++i) {
    TORCH_CHECK(!skips.empty(), "UNet up block: ran out of skip connections");
    h = resnets_[i]->forward(at::cat({h, skips.back()}, 1), temb);
    skips.pop_back();
    if (!attentions_.empty()) h = attentions_[i]->forward(h, call);
  }
  return upsampler_ ? upsampler_->forward(h, upsample_size) : h;
}

}  // namespace tomeserve::pipeline
