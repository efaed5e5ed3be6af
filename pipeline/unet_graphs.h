// CUDA graphs for the UNet calls of one model on one worker. At batch 1 a UNet call is bound by kernel launches
// (about a thousand per call for SD 1.5); a graph replays them all with one launch.
//
// A graph is captured per call layout (pipeline/graph_layout.h): the call's rows in canonical order, padded to
// a row bucket, fixed by latent size, text length, dtype and, per hook group, the factory's CaptureKey and its
// counts of guided and unguided samples — not by which samples they are, so the same graph serves a running
// batch whose samples come and go. GraphLayoutCache decides: the first call of a layout runs eagerly; the
// second runs eagerly on the padded shapes (a warm-up: cuBLAS and cuDNN settle their kernels for them) and is
// captured after it; later ones copy their inputs into the graph's static tensors, refill what the hooks
// uploaded (RecordedHookInputs) and replay. Calls a graph cannot serve run eagerly: more rows than the largest
// bucket, rows not in canonical order, a hook factory without a CaptureKey, the legacy default stream, a layout
// whose capture failed (logged once). At most `capacity` graphs are kept, least recently used evicted; all
// share one memory pool, which is safe because replays are sequential on one stream, every input is refilled
// before each replay and the output is copied out right after it. Release() frees them all (the worker calls it
// after an out-of-memory error, so the graphs' memory goes back before the batch is retried).
//
// Owned by the worker thread that runs the model (with its stream current); not thread-safe. Run only with the
// model it captured for alive (graphs read the weights in place); one instance per model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "pipeline/generation.h"
#include "pipeline/graph_layout.h"
#include "pipeline/unet.h"
#include "pipeline/unet_call.h"

namespace tomeserve::pipeline {

class UNetGraphs {
 public:
  struct Options {
    size_t capacity = kDefaultGraphCapacity;   // captured graphs kept
    int64_t max_rows = kDefaultGraphMaxRows;  // calls with more rows run eagerly
    RowBuckets buckets = RowBuckets::kFine;
  };
  struct Stats {
    int64_t replays = 0;           // calls served by a graph
    int64_t captures = 0;          // graphs captured (each after an eager warm-up call)
    int64_t eager = 0;             // calls run eagerly (warm-ups included)
    int64_t capture_failures = 0;  // layouts left eager after a failed capture
    size_t graphs = 0;             // graphs held now
    int64_t layouts = 0;           // distinct layouts seen
    int64_t rows = 0;              // real rows of the calls a graph ran (replays and captures)
    int64_t padded_rows = 0;       // padding rows those calls computed besides
  };

  // For `device` (CUDA). UNIMPLEMENTED in a build without CUDA; FAILED_PRECONDITION for another device.
  static absl::StatusOr<std::unique_ptr<UNetGraphs>> Create(const c10::Device& device, const Options& options);
  ~UNetGraphs();
  UNetGraphs(const UNetGraphs&) = delete;
  UNetGraphs& operator=(const UNetGraphs&) = delete;

  // The call's output, as RunUNetCall gives it (a tensor of its own, not a view of a graph's buffer). On the
  // current stream; throws c10::Error like RunUNetCall (an out-of-memory error in a capture leaves the layout
  // eager and runs the call eagerly instead). A replay skips copying call.encoder_hidden_states (and call.added) when
  // it is the tensor the layout's last call passed (DenoiseBatch keeps one per batch composition), so callers must not
  // change it in place.
  at::Tensor Run(const UNet2DConditionModelImpl& unet, const UNetCall& call);
  Stats stats() const;
  // Drops every graph and returns the pool's memory to the allocator; each layout captures again when next seen.
  void Release();

  // The call's layout, or nullopt when its rows are not in canonical order or a group's factory cannot be
  // captured.
  static std::optional<CallLayout> Layout(const UNetCall& call);
  // GraphLayoutKey of the call's Layout, or nullopt.
  static std::optional<std::string> LayoutKey(const UNetCall& call, int64_t bucket);

 private:
  struct Impl;
  explicit UNetGraphs(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// What one hook group of a UNet call uploads through HookInputs, kept as static device tensors ("slots") with
// their recipes. A recording run (an eager call) allocates a slot per upload, holding that call's value; after
// Rewind() a run of the same layout gets the same slots back in the same order, without copying (the capture
// run); Refill(info) recomputes every slot for another call of the layout. Device-agnostic (CPU tests check the
// refills against fresh draws). Used on one thread.
class RecordedHookInputs final : public HookInputs {
 public:
  explicit RecordedHookInputs(const c10::Device& device) : device_(device) {}

  at::Tensor Upload(const at::Tensor& host, Redraw redraw) override;
  void Retain(const at::Tensor& device) override { retained_.push_back(device); }
  void OnReplay(Effect effect) override;

  // From here on, runs get the recorded slots back (and record nothing more).
  void Rewind() {
    replaying_ = true;
    cursor_ = 0;
  }
  // For another call of the layout whose group has `factory` (null for a plain group) and `info`: copies each
  // recipe's value into its slot (non-blocking on CUDA) and does the recorded effects on `factory`. Throws
  // c10::Error when a recipe no longer gives its slot's shape and dtype.
  void Refill(const HookFactory* factory, const UNetCallInfo& info);
  const std::vector<at::Tensor>& slots() const { return slots_; }

 private:
  c10::Device device_;
  std::vector<at::Tensor> slots_;
  std::vector<Redraw> redraws_;
  std::vector<Effect> effects_;
  std::vector<at::Tensor> retained_;
  bool replaying_ = false;
  size_t cursor_ = 0;
};

}  // namespace tomeserve::pipeline
