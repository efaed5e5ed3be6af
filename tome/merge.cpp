#include "tome/merge.h"

#include <ATen/record_function.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "pipeline/device.h"

namespace tomeserve::tome {
namespace {

// Stable-sorted dst|src order [rows, N] of the token grid, dst marked -1 by `choice` [rows, hsy, wsx, 1].
at::Tensor PartitionOrder(const at::Tensor& choice, const GridSpec& grid, const at::TensorOptions& long_opts) {
  const int64_t hsy = grid.h / grid.sy, wsx = grid.w / grid.sx, cell = static_cast<int64_t>(grid.sx) * grid.sy;
  const int64_t rows = choice.size(0);
  // Mark the dst of every whole cell with -1 in a grid of zeros; the right/bottom remainder stays src (0).
  at::Tensor cells = at::zeros({rows, hsy, wsx, cell}, long_opts).scatter_(3, choice, -1);
  cells = cells.view({rows, hsy, wsx, grid.sy, grid.sx}).transpose(2, 3).reshape({rows, hsy * grid.sy, wsx * grid.sx});
  at::Tensor marks = at::zeros({rows, grid.h, grid.w}, long_opts);
  marks.slice(1, 0, hsy * grid.sy).slice(2, 0, wsx * grid.sx).copy_(cells);
  // A stable sort keeps dst and src each in raster order (tomesd's unstable argsort permutes them, which changes
  // nothing but the order of tokens inside attention).
  return std::get<1>(
      marks.reshape({rows, grid.w * grid.h}).sort(std::optional<bool>(true), /*dim=*/1, /*descending=*/false));
}

// tomesd's no_rand partition (the top-left token of every cell is dst) depends only on the grid, so it is built
// once per (device, grid) and shared, read-only, by every block call that uses it: ~8 small kernels fewer per
// patched block per UNet call. Bounded (cleared when full: a server sees a handful of sizes x levels). Thread-safe;
// a cached tensor is used on the stream that made it, which holds while each device has one worker.
class TopLeftPartitions {
 public:
  at::Tensor Get(const GridSpec& grid, const at::TensorOptions& long_opts) {
    const Key key{long_opts.device().type(), long_opts.device().index(), grid.w, grid.h, grid.sx, grid.sy};
    absl::MutexLock lock(&mu_);
    if (auto it = cache_.find(key); it != cache_.end()) return it->second;
    if (cache_.size() >= kCapacity) cache_.clear();
    at::Tensor order =
        PartitionOrder(at::zeros({1, grid.h / grid.sy, grid.w / grid.sx, 1}, long_opts), grid, long_opts);
    cache_.emplace(key, order);
    return order;
  }

 private:
  using Key = std::tuple<c10::DeviceType, c10::DeviceIndex, int64_t, int64_t, int, int>;
  static constexpr size_t kCapacity = 256;
  absl::Mutex mu_;
  absl::flat_hash_map<Key, at::Tensor> cache_ ABSL_GUARDED_BY(mu_);
};

TopLeftPartitions& SharedTopLeftPartitions() {
  static auto* partitions = new TopLeftPartitions();  // never destroyed: used from worker threads until exit
  return *partitions;
}

}  // namespace

std::shared_ptr<const MergePlan> MergePlan::Build(const at::Tensor& metric, const GridSpec& grid, int64_t r,
                                                  const at::Tensor& dst_choice, pipeline::HookInputs* inputs) {
  // Named scopes for the torch profiler (tomeserve-bench --profile, scripts/profile_unet.py --tome-ratio): the
  // share of a UNet call Token Merging's own work takes. Free when no profiler is on.
  RECORD_USER_SCOPE("tome::plan");
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
    TORCH_CHECK(!dst_choice.device().is_cpu() || dst_choice.numel() == 0 ||
                    (dst_choice.min().item<int64_t>() >= 0 && dst_choice.max().item<int64_t>() < cell),
                "ToMe dst choice values must be in [0, ", cell, ")");
  }

  // Random dst choices are drawn on the CPU and copied without making the host wait for the stream; the
  // top-left partition comes from the shared cache.
  at::Tensor order;
  if (dst_choice.defined()) {
    order = PartitionOrder(
        pipeline::ToDeviceAsync(dst_choice.to(at::kLong), metric.device()).reshape({-1, hsy, wsx, 1}), grid,
        long_opts);
  } else {
    order = SharedTopLeftPartitions().Get(grid, long_opts);
    if (inputs != nullptr) inputs->Retain(order);
  }

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
  // Rows are copied with index_select on [B*N, C] views: whole rows at a time, where gather with an index
  // expanded over C reads an index per element (several times slower on CPU).
  const at::Tensor row_base = at::arange(batch, long_opts).unsqueeze(1);  // [B, 1]
  const auto rows_of = [&](const at::Tensor& flat, const at::Tensor& pos, int64_t tokens) {
    return flat.index_select(0, (pos + row_base * tokens).reshape(-1));
  };
  const at::Tensor normed = (metric / metric.norm(2, -1, /*keepdim=*/true)).reshape({batch * n, channels});
  const at::Tensor a = rows_of(normed, src_pos, n).view({batch, num_src, channels});
  const at::Tensor b = rows_of(normed, dst_pos, n).view({batch, num_dst, channels});
  const auto [node_max, node_idx] = at::matmul(a, b.transpose(-1, -2)).max(-1);
  const at::Tensor edge = std::get<1>(node_max.sort(std::optional<bool>(true), /*dim=*/-1, /*descending=*/true));
  const at::Tensor unm_idx = edge.slice(1, r), src_idx = edge.slice(1, 0, r);
  const at::Tensor dst_idx = node_idx.gather(1, src_idx);  // [B, r]: which dst each merged src joins

  // Merge output layout per row: [unmerged src | dst], N - r tokens; flat row indices into x and into it.
  const int64_t kept = n - r, unm = num_src - r;
  const at::Tensor kept_pos = at::cat({src_pos.gather(1, unm_idx), dst_pos}, 1);  // [B, N - r]
  const at::Tensor merged_pos = src_pos.gather(1, src_idx);                       // [B, r]
  const at::Tensor merged_into = dst_idx + unm;                                   // [B, r], in the output
  plan->kept_rows_ = (kept_pos + row_base * n).reshape(-1);
  plan->merged_rows_ = (merged_pos + row_base * n).reshape(-1);
  plan->merged_into_rows_ = (merged_into + row_base * kept).reshape(-1);
  // Each dst averages itself and the src merged into it (tomesd's scatter_reduce "mean", include_self). Counted
  // exactly in float, then converted once to the compute dtype, so Merge divides without a conversion per call.
  plan->dst_count_ = at::ones({batch, num_dst}, metric.options().dtype(at::kFloat))
                         .scatter_add_(1, dst_idx, at::ones({batch, r}, metric.options().dtype(at::kFloat)))
                         .unsqueeze(-1)
                         .to(metric.scalar_type());
  // Unmerge: a kept token comes back from its own output row, a merged one from its dst's.
  const at::Tensor positions = at::cat({kept_pos, merged_pos}, 1);  // [B, N]
  const at::Tensor sources = at::cat({at::arange(kept, long_opts).expand({batch, kept}), merged_into}, 1);
  plan->unmerge_rows_ =
      (at::empty_like(positions).scatter_(1, positions, sources) + row_base * kept).reshape(-1);
  return plan;
}

at::Tensor MergePlan::Merge(const at::Tensor& x) const {
  RECORD_USER_SCOPE("tome::merge");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == batch_ && x.size(1) == n_, "ToMe Merge expects [", batch_, ", ", n_,
              ", C], got ", x.sizes());
  const int64_t c = x.size(2);
  const at::Tensor rows = x.reshape({batch_ * n_, c});
  at::Tensor out = rows.index_select(0, kept_rows_);  // [B * (N - r), C]
  // tomesd: dst.scatter_reduce(-2, dst_idx, src, reduce="mean", include_self=True), which sums (self first, then
  // src in order) and divides by the count: the same adds in the same order here, whole rows at a time.
  out.index_add_(0, merged_into_rows_, rows.index_select(0, merged_rows_));
  at::Tensor merged = out.view({batch_, n_ - r_, c});
  merged.narrow(1, n_ - r_ - num_dst_, num_dst_).div_(dst_count_.to(x.scalar_type()));
  return merged;
}

at::Tensor MergePlan::Unmerge(const at::Tensor& x) const {
  RECORD_USER_SCOPE("tome::unmerge");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == batch_ && x.size(1) == n_ - r_, "ToMe Unmerge expects [", batch_, ", ",
              n_ - r_, ", C], got ", x.sizes());
  const int64_t c = x.size(2);
  return x.reshape({batch_ * (n_ - r_), c}).index_select(0, unmerge_rows_).view({batch_, n_, c});
}

}  // namespace tomeserve::tome
