// diffusers' Transformer2DModel (continuous input) and its parts, as SD 1.x/2.x UNets use them:
//   norm (GroupNorm, eps 1e-6), proj_in (1x1 Conv2d, or Linear with use_linear_projection),
//   transformer_blocks.K.{norm1, attn1.{to_q,to_k,to_v,to_out.0}, norm2, attn2.*, norm3, ff.net.{0.proj,2}},
//   proj_out; output = proj_out(blocks(proj_in(norm(x)))) + x.
// Each BasicTransformerBlock knows its checkpoint path and asks the per-call TransformerBlockHook (Token
// Merging) for merge/unmerge ops around attn1 / attn2 / ff. All forwards are const: the modules are immutable
// after load.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pipeline/layers.h"
#include "pipeline/transformer_hook.h"

namespace tomeserve::pipeline {

struct Transformer2DSpec {
  int64_t channels;        // in = out channels of the Transformer2DModel
  int64_t heads;           // attention heads; head size = channels / heads (inner dim = heads * head size)
  int64_t num_layers = 1;  // BasicTransformerBlocks
  int64_t cross_attention_dim;
  int64_t norm_groups;
  bool use_linear_projection = false;
  bool upcast_attention = false;
};

// What a transformer block needs to know about the current UNet call, beyond its input.
struct TransformerCall {
  const at::Tensor& encoder_hidden_states;  // [B, L, cross_attention_dim]
  const std::vector<HookGroup>& groups;     // partition of the rows; one group with undefined rows = all
  int64_t latent_height, latent_width;      // the UNet input sample's spatial size (BlockContext)
};

// diffusers' Attention with AttnProcessor2_0 (no bias on q/k/v, to_out.0 with bias). Self-attention when
// `context` is undefined.
class TransformerAttentionImpl : public torch::nn::Module {
 public:
  TransformerAttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads, int64_t head_dim,
                           bool upcast, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context = {}) const;

 private:
  int64_t heads_, head_dim_;
  bool upcast_;
  Linear to_q_{nullptr}, to_k_{nullptr}, to_v_{nullptr}, to_out_{nullptr};
};
TORCH_MODULE(TransformerAttention);

// FeedForward with GEGLU: net.0.proj (dim -> 2 * 4 dim), hidden * gelu(gate), net.2 (4 dim -> dim).
class GegluFeedForwardImpl : public torch::nn::Module {
 public:
  GegluFeedForwardImpl(int64_t dim, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  Linear proj_{nullptr}, out_{nullptr};
};
TORCH_MODULE(GegluFeedForward);

class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  BasicTransformerBlockImpl(const Transformer2DSpec& spec, std::string path,
                            const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x, const TransformerCall& call) const;  // x: [B, N, inner]

 private:
  // The block on some rows (x and context already narrowed to them) with one hook (may be null).
  at::Tensor ForwardRows(const at::Tensor& x, const at::Tensor& context, TransformerBlockHook* hook,
                         const TransformerCall& call) const;

 public:
  const std::string& path() const { return path_; }

 private:
  std::string path_;  // checkpoint path, handed to the hook as BlockContext::path
  LayerNorm norm1_{nullptr}, norm2_{nullptr}, norm3_{nullptr};
  TransformerAttention attn1_{nullptr}, attn2_{nullptr};
  GegluFeedForward ff_{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

class Transformer2DModelImpl : public torch::nn::Module {
 public:
  // `path`: this module's checkpoint path, e.g. "down_blocks.0.attentions.1".
  Transformer2DModelImpl(const Transformer2DSpec& spec, const std::string& path,
                         const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x, const TransformerCall& call) const;  // x: [B, C, h, w]

 private:
  Transformer2DSpec spec_;
  int64_t inner_dim_;
  GroupNorm norm_{nullptr};
  Conv2d proj_in_conv_{nullptr}, proj_out_conv_{nullptr};
  Linear proj_in_linear_{nullptr}, proj_out_linear_{nullptr};
  std::vector<BasicTransformerBlock> blocks_;
};
TORCH_MODULE(Transformer2DModel);

}  // namespace tomeserve::pipeline
