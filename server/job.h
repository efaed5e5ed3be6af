// One Generate call on its way through the server: the validated request (a plain value built on a gRPC
// thread by request_convert), the key it batches under, and the runtime state shared between the gRPC
// reactor (cancellation), the scheduler (queue position, expiry, admission) and the worker thread (progress, the
// result). Torch-free.
//
// Ownership: a Job is held by shared_ptr by its reactor and, while queued or running, by the scheduler/worker.
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
#include "pipeline/unet_calls.h"
#include "server/batching_policy.h"
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

// The batching policy's clock: seconds since the Unix epoch.
inline double PolicyTime(absl::Time t) { return absl::ToDoubleSeconds(t - absl::UnixEpoch()); }

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
  // SLO ratio controller: any ratio in [tome.ratio, tome_max_ratio] is acceptable (tome_max_ratio <= tome.ratio:
  // the ratio is fixed); the end-to-end target in seconds (0: none).
  double tome_max_ratio = 0;
  double latency_target_seconds = 0;
  Priority priority = Priority::kInteractive;  // orders best-effort calls (BatchingPolicy)
  // Who sent it (its bearer token's tenant; "default" without --auth-token-file) and, when the token file names
  // two or more tenants, the tenant's weight for fair sharing (0: no sharing; BatchingPolicy::AssignFairStarts).
  std::string tenant = "default";
  double tenant_weight = 0;

  // UNet rows per step: 2 per image with classifier-free guidance (guidance_scale > 1), else 1.
  int rows() const { return num_images * (guidance_scale > 1.0 ? 2 : 1); }
  // Latent pixels of one row (SD 1.x: the VAE downsamples by 8).
  int64_t latent_pixels() const { return static_cast<int64_t>(key.width / 8) * (key.height / 8); }
  // What the job takes of a worker's batch budget: rows x latent pixels.
  int64_t cost() const { return rows() * latent_pixels(); }
  // UNet calls per sample (the worker counts the real schedule's once it runs).
  int unet_calls() const { return pipeline::UNetCallsPerSample(key.scheduler, key.steps); }
};

// A queued call's place and the step-time model's estimates (seconds from now; negative: no estimate).
struct QueuedInfo {
  int position = 0;
  double estimated_start_seconds = -1;
  double estimated_finish_seconds = -1;
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
  int batch_size = 0;  // most images in one UNet call this request's samples ran in
  std::vector<MergeCount> merged_tokens;
  tome::TokenMerging tome;  // the effective settings (the controller may have raised the ratio)
  SloDecision slo;
};

// Implemented by the gRPC reactor. OnQueued runs on the scheduler's thread, OnProgress on the worker thread,
// OnDone on whichever thread finishes the job (scheduler, worker, or a gRPC thread when enqueueing fails). The
// Job serialises them: no two run at once, and none runs after OnDone.
class JobObserver {
 public:
  virtual ~JobObserver() = default;
  virtual void OnQueued(const QueuedInfo& /*info*/) {}
  virtual void OnProgress(int /*step*/, int /*num_steps*/) {}
  virtual void OnDone(const absl::StatusOr<GenerationResult>& result) = 0;
};

class Job {
 public:
  Job(GenerationRequest request, absl::Time deadline, JobObserver* observer)
      : request_(std::move(request)),
        deadline_(deadline),
        observer_(observer),
        enqueued_(absl::Now()),
        effective_tome_(request_.tome) {}

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

  // Observer calls, serialised by the job (any thread; never after Finish).
  void NotifyQueued(const QueuedInfo& info);
  void NotifyProgress(int step, int num_steps);
  // The first call wins and reaches the observer; later calls are ignored. Returns whether this call won.
  bool Finish(const absl::StatusOr<GenerationResult>& result);
  bool finished() const { return finished_.load(); }

  // The call as the batching policy sees it; `enqueued` on the policy clock (PolicyTime).
  PolicyCall policy_call(uint64_t id) const;

  // Set once by the scheduler when a worker admits the job (before the worker reads it): the ToMe settings to
  // run with and the controller's decision. Until then effective_tome() is the request's.
  void SetAdmitted(const tome::TokenMerging& tome, const SloDecision& slo) {
    effective_tome_ = tome;
    slo_ = slo;
  }
  const tome::TokenMerging& effective_tome() const { return effective_tome_; }
  const SloDecision& slo() const { return slo_; }

 private:
  const GenerationRequest request_;
  const absl::Time deadline_;
  JobObserver* const observer_;
  const absl::Time enqueued_;
  std::atomic<bool> cancelled_{false};
  absl::Mutex observer_mu_;  // held while calling observer_; finished_ is set under it
  std::atomic<bool> finished_{false};
  tome::TokenMerging effective_tome_;
  SloDecision slo_;
};

}  // namespace tomeserve::server
