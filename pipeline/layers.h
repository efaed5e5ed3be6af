// Parameter-holding building blocks whose parameter names match PyTorch's (weight, bias), so a module tree
// built from them spells the checkpoint keys. Parameters are allocated uninitialised directly in the target
// dtype and device: loading fills every one of them (LoadWeights checks that none is missing), so random init
// would be wasted time and memory for a 1B-parameter model.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

namespace tomeserve::pipeline {

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight, bias;  // bias undefined when constructed without one
};
TORCH_MODULE(Linear);

class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight, bias;
  int64_t dim;
  double eps;
};
TORCH_MODULE(LayerNorm);

class GroupNormImpl : public torch::nn::Module {
 public:
  GroupNormImpl(int64_t num_groups, int64_t channels, double eps, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight, bias;
  int64_t num_groups;
  double eps;
};
TORCH_MODULE(GroupNorm);

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t dim, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& ids) const;
  at::Tensor weight;
};
TORCH_MODULE(Embedding);

struct Conv2dSpec {
  int64_t in_channels, out_channels, kernel_size;
  int64_t stride = 1;
  int64_t padding = 0;
  bool bias = true;
};

class Conv2dImpl : public torch::nn::Module {
 public:
  Conv2dImpl(const Conv2dSpec& spec, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight, bias;
  Conv2dSpec spec;
};
TORCH_MODULE(Conv2d);

}  // namespace tomeserve::pipeline
