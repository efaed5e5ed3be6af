#include "tome/merge.h"

#include <algorithm>
#include <optional>
#include <tuple>

namespace tomeserve::tome {

std::shared_ptr<const MergePlan> MergePlan::Build(const at::Tensor& metric, const GridSpec& grid, int64_t r,
                                                  const at::Tensor& dst_choice) {
  TORCH_CHECK(metric.dim() == 3, "ToMe metric must be [B, N, C], got ", metric.sizes());
  TORCH_CHECK(grid.sx >= 1 && grid.sy >= 1, "ToMe strides must be >= 1, got sx=", grid.sx, " sy=", grid.sy);
  const int64_t batch = metric.size(0), n = metric.size(1), channels = metric.size(2);
  const int64_t hsy = grid.h / grid.sy, wsx = grid.w / grid.sx;
  const int64_t num_dst = hsy * wsx, num_src = n - num_dst;
  r = std::min(r, num_src);
  // tomesd would fail on an empty dst set; with nothing to merge the block runs unpatched.
  if (r <= 0 || num_dst == 0 || n != grid.w * grid.h) return nullptr;

  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(metric.device());
  const int64_t cell = static_cast<int64_t>(grid.sx) * grid.sy;
  if (dst_choice.defined()) {
    // Checked here, on the CPU: an out-of-range index would be a device-side assert in scatter_ on CUDA.
    TORCH_CHECK(dst_choice.dim() == 3 && (dst_choice.size(0) == 1 || dst_choice.size(0) == batch) &&
                    dst_choice.size(1) == hsy && dst_choice.size(2) == wsx,
                "ToMe dst choice must be [1 or ", batch, ", ", hsy, ", ", wsx, "], got ", dst_choice.sizes());
    TORCH_CHECK(dst_choice.numel() == 0 || (dst_choice.min().item<int64_t>() >= 0 &&
                                            dst_choice.max().item<int64_t>() < cell),
                "ToMe dst choice values must be in [0, ", cell, ")");
  }

  // Mark the dst of every whole cell with -1 in a grid of zeros; the right/bottom remainder stays src (0).
  at::Tensor choice = dst_choice.defined()
                          ? dst_choice.to(metric.device(), at::kLong).reshape({-1, hsy, wsx, 1})
                          : at::zeros({1, hsy, wsx, 1}, long_opts);
  const int64_t rows = choice.size(0);
  at::Tensor cells = at::zeros({rows, hsy, wsx, cell}, long_opts).scatter_(3, choice, -1);
  cells = cells.view({rows, hsy, wsx, grid.sy, grid.sx}).transpose(2, 3).reshape({rows, hsy * grid.sy, wsx * grid.sx});
  at::Tensor marks = at::zeros({rows, grid.h, grid.w}, long_opts);
  marks.slice(1, 0, hsy * grid.sy).slice(2, 0, wsx * grid.sx).copy_(cells);
  // A stable sort keeps dst and src each in raster order (tomesd's unstable argsort permutes them, which changes
  // nothing but the order of tokens inside attention).
  const at::Tensor order =
      std::get<1>(marks.reshape({rows, n}).sort(std::optional<bool>(true), /*dim=*/1, /*descending=*/false));

  auto plan = std::shared_ptr<MergePlan>(new MergePlan());
  plan->batch_ = batch;
  plan->n_ = n;
  plan->r_ = r;
  plan->num_dst_ = num_dst;
  plan->dst_pos_ = order.slice(1, 0, num_dst);
  plan->src_pos_ = order.slice(1, num_dst);

  // Cosine similarity of every src token to every dst token; each src picks its best dst, and the r src tokens
  // with the highest best score merge (ties: lower src position first).
  const at::Tensor dst_pos = plan->dst_pos_.expand({batch, num_dst});
  const at::Tensor src_pos = plan->src_pos_.expand({batch, num_src});
  const at::Tensor normed = metric / metric.norm(2, -1, /*keepdim=*/true);
  const at::Tensor a = normed.gather(1, src_pos.unsqueeze(-1).expand({batch, num_src, channels}));
  const at::Tensor b = normed.gather(1, dst_pos.unsqueeze(-1).expand({batch, num_dst, channels}));
  const auto [node_max, node_idx] = at::matmul(a, b.transpose(-1, -2)).max(-1);
  const at::Tensor edge = std::get<1>(node_max.sort(std::optional<bool>(true), /*dim=*/-1, /*descending=*/true));
  const at::Tensor unm_idx = edge.slice(1, r), src_idx = edge.slice(1, 0, r);
  const at::Tensor dst_idx = node_idx.gather(1, src_idx);

  // Positions in the input grid, so that Merge/Unmerge gather from x directly.
  const at::Tensor kept = at::cat({src_pos.gather(1, unm_idx), dst_pos}, 1);  // [B, N - r]
  const at::Tensor merged = src_pos.gather(1, src_idx);                        // [B, r]
  plan->kept_pos_ = kept.unsqueeze(-1);
  plan->merged_pos_ = merged.unsqueeze(-1);
  plan->merged_into_ = (dst_idx + (num_src - r)).unsqueeze(-1);
  // Unmerge lays out [merged tokens | their dst's value again] = positions [kept | merged]; invert that.
  const at::Tensor layout = at::cat({kept, merged}, 1);
  plan->restore_ = at::empty_like(layout)
                       .scatter_(1, layout, at::arange(n, long_opts).expand({batch, n}))
                       .unsqueeze(-1);
  return plan;
}

at::Tensor MergePlan::Merge(const at::Tensor& x) const {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == batch_ && x.size(1) == n_, "ToMe Merge expects [", batch_, ", ", n_,
              ", C], got ", x.sizes());
  const int64_t c = x.size(2);
  at::Tensor out = x.gather(1, kept_pos_.expand({batch_, n_ - r_, c}));
  const at::Tensor src = x.gather(1, merged_pos_.expand({batch_, r_, c}));
  // tomesd: dst.scatter_reduce(-2, dst_idx, src, reduce="mean") with include_self; the unmerged part is untouched.
  out.scatter_reduce_(1, merged_into_.expand({batch_, r_, c}), src, "mean", /*include_self=*/true);
  return out;
}

at::Tensor MergePlan::Unmerge(const at::Tensor& x) const {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == batch_ && x.size(1) == n_ - r_, "ToMe Unmerge expects [", batch_, ", ",
              n_ - r_, ", C], got ", x.sizes());
  const int64_t c = x.size(2);
  const at::Tensor src = x.gather(1, merged_into_.expand({batch_, r_, c}));
  return at::cat({x, src}, 1).gather(1, restore_.expand({batch_, n_, c}));
}

}  // namespace tomeserve::tome
