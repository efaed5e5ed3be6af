#include "tome/token_merging.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_format.h"

namespace tomeserve::tome {

double MaxRatio(int sx, int sy) { return 1.0 - 1.0 / (static_cast<double>(sx) * sy); }

absl::Status Validate(const TokenMerging& tome) {
  for (const auto& [name, value] : {std::pair{"tome.sx", tome.sx}, std::pair{"tome.sy", tome.sy}}) {
    if (value < 1 || value > kMaxStride) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [1, ", kMaxStride, "], got ", value));
    }
  }
  const int md = tome.max_downsample;
  if (md != 1 && md != 2 && md != 4 && md != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("tome.max_downsample must be one of 1, 2, 4, 8, got ", md));
  }
  const double cap = MaxRatio(tome.sx, tome.sy);
  if (!std::isfinite(tome.ratio) || tome.ratio < 0 || tome.ratio > cap) {
    // tomesd clamps r to the number of src tokens without saying so; a ratio it cannot honour is an error here.
    return absl::InvalidArgumentError(absl::StrFormat(
        "tome.ratio must be in [0, %g] (1 - 1/(sx*sy) for sx=%d, sy=%d: only src tokens can merge), got %g", cap,
        tome.sx, tome.sy, tome.ratio));
  }
  return absl::OkStatus();
}

bool IsActive(const TokenMerging& tome) {
  return tome.ratio > 0 && (tome.merge_attn || tome.merge_crossattn || tome.merge_mlp);
}

TokenMerging Canonical(const TokenMerging& tome) {
  if (!IsActive(tome)) return TokenMerging{.ratio = 0};
  TokenMerging out = tome;
  if (!out.use_rand) out.seed = 0;
  return out;
}

std::string ToString(const TokenMerging& tome) {
  return absl::StrFormat(
      "ratio=%g max_downsample=%d sx=%d sy=%d use_rand=%d attn/crossattn/mlp=%d/%d/%d seed=%d", tome.ratio,
      tome.max_downsample, tome.sx, tome.sy, tome.use_rand, tome.merge_attn, tome.merge_crossattn, tome.merge_mlp,
      tome.seed);
}

int DefaultMaxDownsample(const std::vector<int>& levels) { return levels.empty() ? 1 : levels.front(); }

absl::Status CheckPatchesABlock(int max_downsample, bool merges, const std::vector<int>& levels,
                                absl::string_view model) {
  if (!merges || levels.empty() || max_downsample >= levels.front()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "tome.max_downsample is ", max_downsample, ", which patches no block of model \"", model,
      "\": its transformer blocks are at downsample ", absl::StrJoin(levels, ", "), "; allowed: at least ",
      levels.front(), " (the model's default)"));
}

}  // namespace tomeserve::tome
