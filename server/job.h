// One Generate call on its way through the server: the validated request (a plain value built on a gRPC
// thread by request_convert), the key it batches under, and the runtime state shared between the gRPC
// reactor (cancellation), the batcher thread (queue position, expiry) and the worker thread (progress, the
// result). Torch-free.
//
// Ownership: a Job is held by shared_ptr by its reactor and, while queued or running, by the batcher/worker.
// The JobObserver (the reactor) must stay alive until OnDone; Finish() calls OnDone exactly once and no
// observer method is called after it.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "pipeline/scheduler_config.h"
#include "tome/token_merging.h"

namespace tomeserve::server {

enum class OutputFormat { kPng, kRawRgb8 };

// What must be equal for requests to share a batch. Token Merging settings that change nothing
// (tome::IsActive false) are stored as TokenMerging{.ratio = 0}, so all of them batch together.
struct BatchKey {
  std::string model;
  int width = 0;
  int height = 0;
  int steps = 0;
  pipeline::SchedulerKind scheduler = pipeline::SchedulerKind::kPndm;
  tome::TokenMerging tome;

  bool operator==(const BatchKey&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const BatchKey& k) {
    return H::combine(std::move(h), k.model, k.width, k.height, k.steps, k.scheduler, k.tome);
  }
};
// "model=tiny 64x64 steps=20 scheduler=pndm tome[ratio=0.5 ...]" for logs.
std::string ToString(const BatchKey& key);

// A validated request with every default filled in.
struct GenerationRequest {
  std::string request_id;
  BatchKey key;
  tome::TokenMerging tome;  // the effective settings as reported back (key.tome may be normalised)
  std::string prompt;
  std::string negative_prompt;
  double guidance_scale = 7.5;
  uint64_t seed = 0;  // image i gets seed + i
  int num_images = 1;
  OutputFormat output_format = OutputFormat::kPng;
};

struct EncodedImage {
  std::string data;
  std::string mime_type;
  int width = 0, height = 0;
  uint64_t seed = 0;
};

struct MergeCount {
  std::string block;
  int64_t tokens_before = 0, tokens_after = 0;
};

struct GenerationResult {
  std::vector<EncodedImage> images;
  double queue_seconds = 0, text_encoding_seconds = 0, denoising_seconds = 0, decoding_seconds = 0,
         total_seconds = 0;
  int batch_size = 0;  // images in the (last) UNet batch this request ran in
  std::vector<MergeCount> merged_tokens;
};

// Implemented by the gRPC reactor. OnQueued runs on the batcher thread, OnProgress on the worker thread,
// OnDone on whichever thread finishes the job (batcher, worker, or a gRPC thread when enqueueing fails).
class JobObserver {
 public:
  virtual ~JobObserver() = default;
  virtual void OnQueued(int /*position*/) {}
  virtual void OnProgress(int /*step*/, int /*num_steps*/) {}
  virtual void OnDone(const absl::StatusOr<GenerationResult>& result) = 0;
};

class Job {
 public:
  Job(GenerationRequest request, absl::Time deadline, JobObserver* observer)
      : request_(std::move(request)), deadline_(deadline), observer_(observer), enqueued_(absl::Now()) {}

  const GenerationRequest& request() const { return request_; }
  const BatchKey& key() const { return request_.key; }
  absl::Time deadline() const { return deadline_; }
  absl::Time enqueued() const { return enqueued_; }
  int num_images() const { return request_.num_images; }

  // Any thread (the reactor's OnCancel).
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }
  // CANCELLED or DEADLINE_EXCEEDED when the job should stop now, else OK.
  absl::Status StopReason(absl::Time now) const;

  void NotifyQueued(int position) {
    if (!finished_.load()) observer_->OnQueued(position);
  }
  void NotifyProgress(int step, int num_steps) {
    if (!finished_.load()) observer_->OnProgress(step, num_steps);
  }
  // The first call wins and reaches the observer; later calls are ignored. Returns whether this call won.
  bool Finish(const absl::StatusOr<GenerationResult>& result);
  bool finished() const { return finished_.load(); }

 private:
  const GenerationRequest request_;
  const absl::Time deadline_;
  JobObserver* const observer_;
  const absl::Time enqueued_;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> finished_{false};
};

}  // namespace tomeserve::server
