#include "pipeline/layers.h"

namespace tomeserve::pipeline {
namespace {

at::Tensor Param(torch::nn::Module& m, const char* name, at::IntArrayRef shape, const at::TensorOptions& options) {
  return m.register_parameter(name, at::empty(shape, options), /*requires_grad=*/false);
}

}  // namespace

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool with_bias, const at::TensorOptions& options) {
  weight = Param(*this, "weight", {out_features, in_features}, options);
  if (with_bias) bias = Param(*this, "bias", {out_features}, options);
}

at::Tensor LinearImpl::forward(const at::Tensor& x) const { return at::linear(x, weight, bias); }

LayerNormImpl::LayerNormImpl(int64_t d, double e, const at::TensorOptions& options) : dim(d), eps(e) {
  weight = Param(*this, "weight", {d}, options);
  bias = Param(*this, "bias", {d}, options);
}

at::Tensor LayerNormImpl::forward(const at::Tensor& x) const { return at::layer_norm(x, {dim}, weight, bias, eps); }

GroupNormImpl::GroupNormImpl(int64_t groups, int64_t channels, double e, const at::TensorOptions& options)
    : num_groups(groups), eps(e) {
  weight = Param(*this, "weight", {channels}, options);
  bias = Param(*this, "bias", {channels}, options);
}

at::Tensor GroupNormImpl::forward(const at::Tensor& x) const { return at::group_norm(x, num_groups, weight, bias, eps); }

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings, int64_t d, const at::TensorOptions& options) {
  weight = Param(*this, "weight", {num_embeddings, d}, options);
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) const { return at::embedding(weight, ids); }

Conv2dImpl::Conv2dImpl(const Conv2dSpec& s, const at::TensorOptions& options) : spec(s) {
  weight = Param(*this, "weight", {s.out_channels, s.in_channels, s.kernel_size, s.kernel_size}, options);
  if (s.bias) bias = Param(*this, "bias", {s.out_channels}, options);
}

at::Tensor Conv2dImpl::forward(const at::Tensor& x) const {
  return at::conv2d(x, weight, bias, {spec.stride, spec.stride}, {spec.padding, spec.padding});
}

}  // namespace tomeserve::pipeline
