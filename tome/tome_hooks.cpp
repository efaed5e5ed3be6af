#include "tome/tome_hooks.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>
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
  TokenMergingCallHook(std::shared_ptr<const TokenMergingHooks> owner, const pipeline::UNetCallInfo& call)
      : owner_(std::move(owner)), call_(call) {}

  bool Patches(const pipeline::BlockContext& ctx, int64_t tokens) override {
    if (Downsample(ctx, tokens) > 0) return true;
    ++next_block_;  // seen: block indices stay positions in UNet order whichever blocks merge
    return false;
  }

  pipeline::BlockTokenOps ForBlock(const pipeline::BlockContext& ctx, const at::Tensor& x) override {
    const uint64_t block_index = next_block_++;
    const TokenMerging& tome = owner_->tome_;
    const int64_t n = x.size(1), orig_h = ctx.latent_height, orig_w = ctx.latent_width;
    const int64_t downsample = Downsample(ctx, n);
    if (downsample <= 0) return {};
    const GridSpec grid{
        .w = static_cast<int64_t>(std::ceil(static_cast<double>(orig_w) / static_cast<double>(downsample))),
        .h = static_cast<int64_t>(std::ceil(static_cast<double>(orig_h) / static_cast<double>(downsample))),
        .sx = tome.sx,
        .sy = tome.sy};
    const auto r = static_cast<int64_t>(static_cast<double>(n) * tome.ratio);
    const int64_t rows = x.size(0);
    at::Tensor choice = tome.use_rand ? DrawDstChoice(grid, rows, block_index) : at::Tensor();
    if (choice.defined() && call_.inputs != nullptr) {
      // The same draw for any later call of this layout: the recipe keeps the factory, not this hook.
      choice = call_.inputs->Upload(
          choice, [owner = owner_, grid, rows, block_index](const pipeline::UNetCallInfo& call) {
            return TokenMergingCallHook(owner, call).DrawDstChoice(grid, rows, block_index);
          });
    }
    std::shared_ptr<const MergePlan> plan = MergePlan::Build(x, grid, r, choice, call_.inputs);
    const BlockMergeCount count{std::string(ctx.path), n, plan ? plan->tokens_after() : n};
    owner_->Record(count);
    if (call_.inputs != nullptr) {
      call_.inputs->OnReplay([count](const pipeline::HookFactory& factory) {
        if (const auto* hooks = dynamic_cast<const TokenMergingHooks*>(&factory)) hooks->Record(count);
      });
    }
    if (plan == nullptr) return {};
    pipeline::BlockTokenOps ops;
    if (tome.merge_attn) ops.attn = plan;
    if (tome.merge_crossattn) ops.crossattn = plan;
    if (tome.merge_mlp) ops.mlp = plan;
    return ops;
  }

 private:
  // tomesd: downsample = ceil(sqrt(original_tokens // N)); blocks downsampled more than max_downsample are left
  // alone (0 here); the grid is the latent size divided by downsample, rounded up.
  int64_t Downsample(const pipeline::BlockContext& ctx, int64_t n) const {
    const int64_t orig_h = ctx.latent_height, orig_w = ctx.latent_width;
    if (n <= 0 || n > orig_h * orig_w) return 0;
    const auto downsample = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(orig_h * orig_w / n))));
    return downsample > owner_->tome_.max_downsample ? 0 : downsample;
  }

  // The dst of every cell for every UNet row, or undefined for tomesd's top-left choice everywhere.
  //
  // tomesd draws one partition per block call for the whole batch and turns randomness off when the UNet batch
  // is odd (a batch that cannot hold both CFG halves of every sample). tomeserve applies that rule per sample: a
  // sample with both halves (2 rows) gets a random partition shared by its halves, drawn on the CPU from
  // (settings seed, the sample's seed, call index, block index); a sample without guidance (1 row) gets the
  // top-left one. A sample's partition therefore never depends on its batch-mates. Without per-row sample
  // indices (a caller outside the pipeline) the batch-wide rule applies, with one draw for all rows.
  at::Tensor DrawDstChoice(const GridSpec& grid, int64_t rows, uint64_t block_index) const {
    const int64_t hsy = grid.h / grid.sy, wsx = grid.w / grid.sx;
    const int64_t cell = static_cast<int64_t>(grid.sx) * grid.sy;
    // The settings' seed and the batch's call index, unless the pipeline gave the row's own (a sample that
    // joined a running batch is at its own step; its ToMe seed may be carried per row).
    const auto draw = [&](int64_t row) {
      const bool per_row = row >= 0;
      // XOR: a factory's seed and a sample's hook_seed are interchangeable (the server keeps one factory per
      // setting without the seed and passes the seed per sample; offline callers put it in the settings).
      const uint64_t tome_seed =
          owner_->tome_.seed ^ (per_row && static_cast<int64_t>(call_.row_hook_seeds.size()) == rows
                                    ? call_.row_hook_seeds[row] : 0);
      const int call_index = per_row && static_cast<int64_t>(call_.row_call_index.size()) == rows
                                 ? call_.row_call_index[row] : call_.call_index;
      const uint64_t row_seed = per_row ? call_.row_seeds[row] : 0;
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(
          MixSeed({tome_seed, row_seed, static_cast<uint64_t>(call_index), block_index}));
      return at::randint(cell, {hsy, wsx}, gen, at::TensorOptions().dtype(at::kLong));
    };
    const std::vector<int>& sample = call_.row_sample;
    if (static_cast<int64_t>(sample.size()) != rows || static_cast<int64_t>(call_.row_seeds.size()) != rows) {
      return rows % 2 == 0 ? draw(-1).unsqueeze(0) : at::Tensor();
    }
    std::vector<at::Tensor> per_row(rows);
    bool any_random = false;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t first = std::find(sample.begin(), sample.end(), sample[i]) - sample.begin();
      if (first < i) {
        per_row[i] = per_row[first];
        continue;
      }
      const bool both_halves = std::count(sample.begin(), sample.end(), sample[i]) == 2;
      per_row[i] = both_halves ? draw(i) : at::zeros({hsy, wsx}, at::kLong);
      any_random = any_random || both_halves;
    }
    return any_random ? at::stack(per_row) : at::Tensor();
  }

  const std::shared_ptr<const TokenMergingHooks> owner_;
  const pipeline::UNetCallInfo call_;
  uint64_t next_block_ = 0;
};

absl::StatusOr<std::shared_ptr<TokenMergingHooks>> TokenMergingHooks::Create(const TokenMerging& tome) {
  if (absl::Status s = Validate(tome); !s.ok()) return s;
  return std::shared_ptr<TokenMergingHooks>(new TokenMergingHooks(tome));
}

std::unique_ptr<pipeline::TransformerBlockHook> TokenMergingHooks::ForCall(const pipeline::UNetCallInfo& call) const {
  return std::make_unique<TokenMergingCallHook>(shared_from_this(), call);
}

std::optional<std::string> TokenMergingHooks::CaptureKey() const {
  // The settings fix every shape and kernel of a call's merges; the seed only changes the uploaded draws, but it
  // is part of the key because a capture's recipes redraw with the factory that was captured.
  return ToString(tome_);
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
