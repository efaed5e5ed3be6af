// tomesd's bipartite soft matching on a 2D token grid (tomesd/merge.py, bipartite_soft_matching_random2d): the
// plan for one transformer block of one UNet call, applied to every sub-layer the settings merge.
//
// Tokens are split into dst (one per sy x sx cell; leftover right/bottom tokens are always src) and src. Each src
// token finds its most cosine-similar dst on the metric; the r most similar src tokens are merged into their dst
// by mean (scatter_reduce, include_self). Unmerge copies each dst output back to the src tokens merged into it.
//
// An instance is immutable after Build and used on the thread that runs the UNet call.
#pragma once

#include <cstdint>
#include <memory>

#include <ATen/ATen.h>

#include "pipeline/generation.h"
#include "pipeline/transformer_hook.h"

namespace tomeserve::tome {

struct GridSpec {
  int64_t w = 0;  // token grid width (tomesd's ceil(latent_w / downsample))
  int64_t h = 0;
  int sx = 2;
  int sy = 2;
};

class MergePlan final : public pipeline::TokenOps {
 public:
  // metric [B, N, C] with N == w*h. dst_choice: undefined (tomesd's no_rand: top-left of every cell), or int64
  // [P, h/sy, w/sx] with P == 1 or B, values in [0, sx*sy): the dst's row-major index within its cell, per row.
  // r: tokens to remove, clamped to the number of src tokens as tomesd does. Returns null (identity) when nothing
  // would be merged: r <= 0, or no whole cell fits the grid. The metric's device is the plan's device. A CPU
  // dst_choice is range-checked and copied there; one already on the device is trusted (the caller drew it).
  // `inputs` (may be null) retains the shared top-left partition for a CUDA graph that reads it.
  static std::shared_ptr<const MergePlan> Build(const at::Tensor& metric, const GridSpec& grid, int64_t r,
                                                const at::Tensor& dst_choice,
                                                pipeline::HookInputs* inputs = nullptr);

  at::Tensor Merge(const at::Tensor& x) const override;    // [B, N, C] -> [B, N - r, C]
  at::Tensor Unmerge(const at::Tensor& x) const override;  // [B, N - r, C] -> [B, N, C]

  int64_t tokens_before() const { return n_; }
  int64_t tokens_after() const { return n_ - r_; }

  // The src/dst partition, for tests: positions of the dst tokens [P, num_dst] and src tokens [P, N - num_dst]
  // in the flattened grid, each in raster order.
  const at::Tensor& dst_positions() const { return dst_pos_; }
  const at::Tensor& src_positions() const { return src_pos_; }

 private:
  MergePlan() = default;

  int64_t batch_ = 0, n_ = 0, r_ = 0, num_dst_ = 0;
  at::Tensor dst_pos_, src_pos_;  // [P, num_dst], [P, N - num_dst]
  // Flat row indices into [B * tokens, C] views. Merge: out = x[kept_rows] (= [unmerged src | dst] per row),
  // out[merged_into_rows] += x[merged_rows], then the dst part is divided by dst_count. Unmerge: x[unmerge_rows].
  at::Tensor kept_rows_;         // [B * (N - r)]
  at::Tensor merged_rows_;       // [B * r]
  at::Tensor merged_into_rows_;  // [B * r]
  at::Tensor dst_count_;         // [B, num_dst, 1] in the metric's dtype: 1 + number of src merged into each dst
  at::Tensor unmerge_rows_;      // [B * N]
};

}  // namespace tomeserve::tome
