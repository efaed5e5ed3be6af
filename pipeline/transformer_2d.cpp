#include "pipeline/transformer_2d.h"

#include <torch/nn/modules/container/modulelist.h>

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tomeserve::pipeline {
namespace {

// A parameter-less container module, for checkpoint path segments such as "to_out" or "ff.net".
std::shared_ptr<torch::nn::Module> Container(torch::nn::Module& parent, const std::string& name) {
  return parent.register_module(name, std::make_shared<torch::nn::Module>());
}

at::Tensor Merge(const std::shared_ptr<const TokenOps>& ops, const at::Tensor& x) {
  return ops ? ops->Merge(x) : x;
}
at::Tensor Unmerge(const std::shared_ptr<const TokenOps>& ops, const at::Tensor& x) {
  return ops ? ops->Unmerge(x) : x;
}

}  // namespace

TransformerAttentionImpl::TransformerAttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads,
                                                   int64_t head_dim, bool upcast, const at::TensorOptions& o)
    : heads_(heads), head_dim_(head_dim), upcast_(upcast) {
  const int64_t inner = heads * head_dim;
  to_q_ = register_module("to_q", Linear(query_dim, inner, /*bias=*/false, o));
  to_k_ = register_module("to_k", Linear(context_dim, inner, /*bias=*/false, o));
  to_v_ = register_module("to_v", Linear(context_dim, inner, /*bias=*/false, o));
  // to_out.1 is a Dropout: no parameters, identity in eval.
  to_out_ = Container(*this, "to_out")->register_module("0", Linear(inner, query_dim, /*bias=*/true, o));
}

at::Tensor TransformerAttentionImpl::forward(const at::Tensor& x, const at::Tensor& context) const {
  const at::Tensor& kv = context.defined() ? context : x;
  const int64_t b = x.size(0);
  auto split_heads = [&](const at::Tensor& t) { return t.view({b, -1, heads_, head_dim_}).transpose(1, 2); };
  at::Tensor q = split_heads(to_q_->forward(x));
  at::Tensor k = split_heads(to_k_->forward(kv));
  at::Tensor v = split_heads(to_v_->forward(kv));
  at::Tensor out;
  if (upcast_ && q.scalar_type() != at::kFloat) {
    // upcast_attention (SD 2.1): fp16 attention logits can overflow. diffusers' AttnProcessor2_0 ignores the
    // flag; computing in fp32 here costs a little speed and never changes fp32 results.
    out = at::scaled_dot_product_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat))
              .to(q.scalar_type());
  } else {
    out = at::scaled_dot_product_attention(q, k, v);
  }
  return to_out_->forward(out.transpose(1, 2).reshape({b, -1, heads_ * head_dim_}));
}

GegluFeedForwardImpl::GegluFeedForwardImpl(int64_t dim, const at::TensorOptions& o) {
  const int64_t inner = 4 * dim;
  auto net = Container(*this, "net");
  proj_ = Container(*net, "0")->register_module("proj", Linear(dim, 2 * inner, true, o));  // GEGLU
  out_ = net->register_module("2", Linear(inner, dim, true, o));                           // net.1: Dropout
}

at::Tensor GegluFeedForwardImpl::forward(const at::Tensor& x) const {
  std::vector<at::Tensor> halves = proj_->forward(x).chunk(2, -1);
  return out_->forward(halves[0] * at::gelu(halves[1]));
}

BasicTransformerBlockImpl::BasicTransformerBlockImpl(const Transformer2DSpec& s, std::string path,
                                                     const at::TensorOptions& o)
    : path_(std::move(path)) {
  const int64_t head_dim = s.channels / s.heads;
  const int64_t dim = s.heads * head_dim;
  // LayerNorm eps: BasicTransformerBlock's norm_eps default (Transformer2DModel passes 1e-5).
  norm1_ = register_module("norm1", LayerNorm(dim, 1e-5, o));
  attn1_ = register_module("attn1", TransformerAttention(dim, dim, s.heads, head_dim, s.upcast_attention, o));
  norm2_ = register_module("norm2", LayerNorm(dim, 1e-5, o));
  attn2_ = register_module(
      "attn2", TransformerAttention(dim, s.cross_attention_dim, s.heads, head_dim, s.upcast_attention, o));
  norm3_ = register_module("norm3", LayerNorm(dim, 1e-5, o));
  ff_ = register_module("ff", GegluFeedForward(dim, o));
}

at::Tensor BasicTransformerBlockImpl::ForwardRows(const at::Tensor& x, const at::Tensor& context,
                                                  TransformerBlockHook* hook, const TransformerCall& call) const {
  // tomesd's patched forward: merge after the norm, unmerge before the residual add. Null ops are the
  // identity, so without a hook this is exactly diffusers' BasicTransformerBlock.
  BlockTokenOps ops;
  if (hook != nullptr) ops = hook->ForBlock(BlockContext{path_, call.latent_height, call.latent_width}, x);
  at::Tensor h = Unmerge(ops.attn, attn1_->forward(Merge(ops.attn, norm1_->forward(x)))) + x;
  h = Unmerge(ops.crossattn, attn2_->forward(Merge(ops.crossattn, norm2_->forward(h)), context)) + h;
  return Unmerge(ops.mlp, ff_->forward(Merge(ops.mlp, norm3_->forward(h)))) + h;
}

at::Tensor BasicTransformerBlockImpl::forward(const at::Tensor& x, const TransformerCall& call) const {
  if (call.groups.empty()) return ForwardRows(x, call.encoder_hidden_states, nullptr, call);
  const BlockContext ctx{path_, call.latent_height, call.latent_width};
  const int64_t tokens = x.size(1);
  // Which groups' hooks merge in this block (each hook is asked once per block, in UNet order).
  std::vector<TransformerBlockHook*> hooks(call.groups.size(), nullptr);
  bool any = false;
  for (size_t i = 0; i < call.groups.size(); ++i) {
    TransformerBlockHook* hook = call.groups[i].hook;
    if (hook != nullptr && hook->Patches(ctx, tokens)) {
      hooks[i] = hook;
      any = true;
    }
  }
  if (call.groups.size() == 1 && !call.groups[0].rows.defined())
    return ForwardRows(x, call.encoder_hidden_states, hooks[0], call);
  // No group merges here: the plain block, once for every row.
  if (!any) return ForwardRows(x, call.encoder_hidden_states, nullptr, call);
  // Mixed settings: each merging group on its own rows (token counts differ per group after merging), the
  // other groups' rows together in one plain run, written back in place. Every row belongs to exactly one group
  // (DenoiseBatch builds the partition).
  at::Tensor out = at::empty_like(x);
  std::vector<at::Tensor> plain_rows;
  for (size_t i = 0; i < call.groups.size(); ++i) {
    const HookGroup& g = call.groups[i];
    if (hooks[i] == nullptr) {
      plain_rows.push_back(g.rows);
      continue;
    }
    at::Tensor y = ForwardRows(x.index_select(0, g.rows), call.encoder_hidden_states.index_select(0, g.rows),
                               hooks[i], call);
    out.index_copy_(0, g.rows, y);
  }
  if (!plain_rows.empty()) {
    const at::Tensor rows = plain_rows.size() == 1 ? plain_rows[0] : at::cat(plain_rows);
    out.index_copy_(0, rows, ForwardRows(x.index_select(0, rows), call.encoder_hidden_states.index_select(0, rows),
                                         nullptr, call));
  }
  return out;
}

Transformer2DModelImpl::Transformer2DModelImpl(const Transformer2DSpec& s, const std::string& path,
                                               const at::TensorOptions& o)
    : spec_(s), inner_dim_(s.heads * (s.channels / s.heads)) {
  norm_ = register_module("norm", GroupNorm(s.norm_groups, s.channels, /*eps=*/1e-6, o));
  if (s.use_linear_projection) {
    proj_in_linear_ = register_module("proj_in", Linear(s.channels, inner_dim_, true, o));
  } else {
    proj_in_conv_ = register_module("proj_in", Conv2d(Conv2dSpec{s.channels, inner_dim_, 1}, o));
  }
  auto list = register_module("transformer_blocks", torch::nn::ModuleList());
  for (int64_t k = 0; k < s.num_layers; ++k) {
    blocks_.push_back(BasicTransformerBlock(s, absl::StrCat(path, ".transformer_blocks.", k), o));
    list->push_back(blocks_.back());
  }
  if (s.use_linear_projection) {
    proj_out_linear_ = register_module("proj_out", Linear(inner_dim_, s.channels, true, o));
  } else {
    proj_out_conv_ = register_module("proj_out", Conv2d(Conv2dSpec{inner_dim_, s.channels, 1}, o));
  }
}

at::Tensor Transformer2DModelImpl::forward(const at::Tensor& x, const TransformerCall& call) const {
  const int64_t b = x.size(0), height = x.size(2), width = x.size(3);
  at::Tensor h = norm_->forward(x);
  if (proj_in_conv_) {
    h = proj_in_conv_->forward(h).permute({0, 2, 3, 1}).reshape({b, height * width, inner_dim_});
  } else {
    h = proj_in_linear_->forward(h.permute({0, 2, 3, 1}).reshape({b, height * width, spec_.channels}));
  }
  for (const BasicTransformerBlock& block : blocks_) h = block->forward(h, call);
  if (proj_out_conv_) {
    h = proj_out_conv_->forward(h.reshape({b, height, width, inner_dim_}).permute({0, 3, 1, 2}).contiguous());
  } else {
    h = proj_out_linear_->forward(h)
            .reshape({b, height, width, spec_.channels})
            .permute({0, 3, 1, 2})
            .contiguous();
  }
  return h + x;
}

}  // namespace tomeserve::pipeline
