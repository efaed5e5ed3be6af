// Token Merging (tomesd 0.1.3) settings for one batch. A plain value: built and validated on any thread (the
// server's gRPC threads, the CLI), compared and hashed as part of a batch key, moved to the worker that runs it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace tomeserve::tome {

// Defaults equal tomesd.apply_patch's. The field names are the request's (tome.ratio, tome.sx, ...), and
// validation errors name them that way.
struct TokenMerging {
  double ratio = 0.5;      // fraction of a patched block's tokens merged away; 0 = off
  int max_downsample = 1;  // patch blocks whose token grid is downsampled at most this much: 1, 2, 4 or 8
  int sx = 2;              // stride of the dst grid: one dst token per sy x sx cell
  int sy = 2;
  // Random dst within each cell. tomesd turns it off for odd UNet batches; tomeserve decides per sample: on for
  // a sample with classifier-free guidance (its two CFG halves share the partition), off without.
  bool use_rand = true;
  bool merge_attn = true;
  bool merge_crossattn = false;
  bool merge_mlp = false;
  // Seeds the random dst choice. tomeserve draws it per UNet row from (seed, the sample's seed, the UNet call,
  // the block), so results are reproducible and batch-invariant; tomesd forks the process RNG instead.
  uint64_t seed = 0;

  bool operator==(const TokenMerging&) const = default;

  template <typename H>
  friend H AbslHashValue(H h, const TokenMerging& t) {
    return H::combine(std::move(h), t.ratio, t.max_downsample, t.sx, t.sy, t.use_rand, t.merge_attn,
                      t.merge_crossattn, t.merge_mlp, t.seed);
  }
};

inline constexpr int kMaxStride = 16;

// The largest ratio tomesd can honour with strides sx, sy: 1 - 1/(sx*sy) (only src tokens can be merged).
double MaxRatio(int sx, int sy);

// INVALID_ARGUMENT naming the field and its allowed range for values tomesd would mis-handle or silently cap:
// ratio NaN or outside [0, MaxRatio(sx, sy)], max_downsample not in {1, 2, 4, 8}, sx/sy outside [1, kMaxStride].
absl::Status Validate(const TokenMerging& tome);

// Model-aware max_downsample. `levels`: the UNet's levels with transformer blocks as downsample factors,
// ascending (pipeline::UNet2DConditionConfig::AttentionDownsamples: SD 1.5 {1, 2, 4, 8}, SDXL {2, 4}).
// The default is the finest of them (1 without levels): tomesd's own 1 patches no block of SDXL, which has no
// attention at full resolution.
int DefaultMaxDownsample(const std::vector<int>& levels);
// INVALID_ARGUMENT naming tome.max_downsample, `model` and its levels when settings that merge (`merges`: a
// ratio or a controller range above 0) would patch no block at `max_downsample`.
absl::Status CheckPatchesABlock(int max_downsample, bool merges, const std::vector<int>& levels,
                                absl::string_view model);

// True when the settings change the UNet's output: ratio > 0 and at least one sub-layer merged. Inactive
// settings are run as the plain UNet (bit-identical to no ToMe).
bool IsActive(const TokenMerging& tome);

// The settings with fields that cannot change the output cleared, for batch keys: inactive settings become
// ratio 0 with every other field at its default; the seed is 0 when use_rand is off.
TokenMerging Canonical(const TokenMerging& tome);

// One line for logs and batch keys: "ratio=0.5 max_downsample=1 sx=2 sy=2 use_rand=1 attn/crossattn/mlp=1/0/0
// seed=0".
std::string ToString(const TokenMerging& tome);

}  // namespace tomeserve::tome
