#include "tome/tome_hooks.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include <ATen/CPUGeneratorImpl.h>

#include "tome/merge.h"

namespace tomeserve::tome {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t MixSeed(std::initializer_list<uint64_t> parts) {
  uint64_t h = 0x746f6d6573657276ULL;  // "tomeserv"
  for (uint64_t p : parts) h = SplitMix64(h ^ p);
  return h;
}

}  // namespace

// The hook of one UNet call: a merge plan per transformer block, from the block's input (tomesd's
// compute_merge). Lives on the worker thread for one forward call; blocks arrive in UNet order.
class TokenMergingCallHook final : public pipeline::TransformerBlockHook {
 public:
  TokenMergingCallHook(const TokenMergingHooks& owner, const pipeline::UNetCallInfo& call)
      : owner_(owner), call_(call) {}

  pipeline::BlockTokenOps ForBlock(const pipeline::BlockContext& ctx, const at::Tensor& x) override {
    const uint64_t block_index = next_block_++;
    const TokenMerging& tome = owner_.tome_;
    const int64_t n = x.size(1), orig_h = ctx.latent_height, orig_w = ctx.latent_width;
    if (n <= 0 || n > orig_h * orig_w) return {};
    // tomesd: downsample = ceil(sqrt(original_tokens // N)); blocks downsampled more than max_downsample are
    // left alone; the grid is the latent size divided by downsample, rounded up.
    const auto downsample = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(orig_h * orig_w / n))));
    if (downsample > tome.max_downsample) return {};
    const GridSpec grid{
        .w = static_cast<int64_t>(std::ceil(static_cast<double>(orig_w) / static_cast<double>(downsample))),
        .h = static_cast<int64_t>(std::ceil(static_cast<double>(orig_h) / static_cast<double>(downsample))),
        .sx = tome.sx,
        .sy = tome.sy};
    const auto r = static_cast<int64_t>(static_cast<double>(n) * tome.ratio);
    // Odd UNet batches cannot hold both CFG halves of every sample: tomesd turns randomness off there.
    const bool use_rand = tome.use_rand && x.size(0) % 2 == 0;
    const at::Tensor choice = use_rand ? DrawDstChoice(grid, x.size(0), block_index) : at::Tensor();
    std::shared_ptr<const MergePlan> plan = MergePlan::Build(x, grid, r, choice);
    owner_.Record(BlockMergeCount{std::string(ctx.path), n, plan ? plan->tokens_after() : n});
    if (plan == nullptr) return {};
    pipeline::BlockTokenOps ops;
    if (tome.merge_attn) ops.attn = plan;
    if (tome.merge_crossattn) ops.crossattn = plan;
    if (tome.merge_mlp) ops.mlp = plan;
    return ops;
  }

 private:
  // One random dst per cell for every UNet row, drawn on the CPU from (settings seed, the row's sample seed,
  // call index, block index): the CFG halves of a sample share a partition, and a sample's partitions do not
  // depend on its batch-mates. Without per-row seeds (a caller outside the pipeline) all rows share one draw.
  at::Tensor DrawDstChoice(const GridSpec& grid, int64_t rows, uint64_t block_index) const {
    const int64_t hsy = grid.h / grid.sy, wsx = grid.w / grid.sx;
    const int64_t cell = static_cast<int64_t>(grid.sx) * grid.sy;
    const auto draw = [&](uint64_t row_seed) {
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(
          MixSeed({owner_.tome_.seed, row_seed, static_cast<uint64_t>(call_.call_index), block_index}));
      return at::randint(cell, {hsy, wsx}, gen, at::TensorOptions().dtype(at::kLong));
    };
    if (static_cast<int64_t>(call_.row_seeds.size()) != rows) return draw(0).unsqueeze(0);
    std::vector<at::Tensor> per_row;
    per_row.reserve(rows);
    for (int64_t i = 0; i < rows; ++i) {
      // Rows of the same sample (its uncond and cond halves) reuse the first row's draw.
      const auto first = std::find(call_.row_seeds.begin(), call_.row_seeds.end(), call_.row_seeds[i]);
      const auto j = first - call_.row_seeds.begin();
      per_row.push_back(j < i ? per_row[j] : draw(call_.row_seeds[i]));
    }
    return at::stack(per_row);
  }

  const TokenMergingHooks& owner_;
  const pipeline::UNetCallInfo call_;
  uint64_t next_block_ = 0;
};

absl::StatusOr<std::shared_ptr<TokenMergingHooks>> TokenMergingHooks::Create(const TokenMerging& tome) {
  if (absl::Status s = Validate(tome); !s.ok()) return s;
  return std::shared_ptr<TokenMergingHooks>(new TokenMergingHooks(tome));
}

std::unique_ptr<pipeline::TransformerBlockHook> TokenMergingHooks::ForCall(const pipeline::UNetCallInfo& call) const {
  return std::make_unique<TokenMergingCallHook>(*this, call);
}

std::vector<BlockMergeCount> TokenMergingHooks::MergeCounts() const {
  absl::MutexLock lock(&mu_);
  return counts_;
}

void TokenMergingHooks::Record(const BlockMergeCount& count) const {
  absl::MutexLock lock(&mu_);
  for (BlockMergeCount& c : counts_) {
    if (c.block == count.block) {
      c = count;
      return;
    }
  }
  counts_.push_back(count);
}

}  // namespace tomeserve::tome
