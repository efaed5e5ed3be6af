// Token Merging as a pipeline HookFactory: one instance per batch, built from validated settings. ForCall runs
// on the worker thread once per UNet call and returns a hook that builds a merge plan per transformer block
// from the block's input (tomesd's compute_merge). The UNet itself holds no ToMe state.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "pipeline/generation.h"
#include "tome/token_merging.h"

namespace tomeserve::tome {

// What merging did in one transformer block (per UNet row; equal for every call of a batch).
struct BlockMergeCount {
  std::string block;  // checkpoint path of the BasicTransformerBlock
  int64_t tokens_before = 0;
  int64_t tokens_after = 0;
  bool operator==(const BlockMergeCount&) const = default;
};

class TokenMergingHooks final : public pipeline::HookFactory,
                                public std::enable_shared_from_this<TokenMergingHooks> {
 public:
  // Validates `tome` (see Validate).
  static absl::StatusOr<std::shared_ptr<TokenMergingHooks>> Create(const TokenMerging& tome);

  // The returned hook keeps this factory alive (it records merge counts here).
  std::unique_ptr<pipeline::TransformerBlockHook> ForCall(const pipeline::UNetCallInfo& call) const override;

  std::optional<std::string> CaptureKey() const override;

  const TokenMerging& settings() const { return tome_; }

  // The patched blocks seen so far, in UNet order, with their token counts; empty before the first UNet call.
  // Thread-safe.
  std::vector<BlockMergeCount> MergeCounts() const;

 private:
  friend class TokenMergingCallHook;
  explicit TokenMergingHooks(const TokenMerging& tome) : tome_(tome) {}
  void Record(const BlockMergeCount& count) const;

  const TokenMerging tome_;
  mutable absl::Mutex mu_;
  mutable std::vector<BlockMergeCount> counts_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tomeserve::tome
