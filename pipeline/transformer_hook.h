// The seam between the UNet's transformer blocks and Token Merging (tome/). A hook is chosen per UNet forward
// call and passed down as an argument: the loaded model holds no ToMe state, so one model serves batches with
// different settings back to back. A hook instance belongs to one forward call on one thread.
#pragma once

#include <cstdint>
#include <memory>

#include <ATen/ATen.h>

#include "absl/strings/string_view.h"

namespace tomeserve::pipeline {

// Where a BasicTransformerBlock sits, for hooks that decide per block.
struct BlockContext {
  absl::string_view path;  // checkpoint path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0"
  int64_t latent_height;   // spatial size of the UNet's input sample (tomesd's "size")
  int64_t latent_width;
};

// A token reduction and its inverse around one sub-layer: Unmerge(f(Merge(x))) has x's shape [B, N, C].
class TokenOps {
 public:
  virtual ~TokenOps() = default;
  virtual at::Tensor Merge(const at::Tensor& x) const = 0;
  virtual at::Tensor Unmerge(const at::Tensor& x) const = 0;
};

// Per-block choice for the three sub-layers; a null pointer means identity (no merging).
struct BlockTokenOps {
  std::shared_ptr<const TokenOps> attn;       // around attn1 (self-attention)
  std::shared_ptr<const TokenOps> crossattn;  // around attn2
  std::shared_ptr<const TokenOps> mlp;        // around ff
};

class TransformerBlockHook {
 public:
  virtual ~TransformerBlockHook() = default;
  // Called once per block per UNet call, before norm1, with the block input x [B, N, C] (the merge metric).
  virtual BlockTokenOps ForBlock(const BlockContext& ctx, const at::Tensor& x) = 0;
  // Asked first, once per block per UNet call, in UNet order: whether ForBlock could merge anything in this
  // block of `tokens` tokens. false: the block is left alone for these rows and ForBlock is not called for it
  // (the hook counts the block as seen). A block that no group's hook patches runs once on every row of the
  // call. The default (true) always asks ForBlock.
  virtual bool Patches(const BlockContext& /*ctx*/, int64_t /*tokens*/) { return true; }
};

// The rows of one UNet call that share a hook (one Token Merging setting). Convolutions and ResNet blocks run
// on every row at once; a BasicTransformerBlock that some group's hook patches runs once per patching group on
// that group's rows (merge, attend, unmerge with the group's own plan) and once on the rows of all other groups
// together, and puts the rows back in place; a block no hook patches runs once on every row. Rows are
// independent in every transformer sub-layer, so a row's result does not depend on which group layout it was
// run in.
struct HookGroup {
  at::Tensor rows;                      // int64 row indices on the model's device; undefined = every row
  TransformerBlockHook* hook = nullptr; // null: the plain block for these rows
};

}  // namespace tomeserve::pipeline
