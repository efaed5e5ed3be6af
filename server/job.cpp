#include "server/job.h"

#include "absl/strings/str_cat.h"

namespace tomeserve::server {

std::string ToString(const BatchKey& key) {
  return absl::StrCat("model=", key.model, " ", key.width, "x", key.height, " steps=", key.steps,
                      " scheduler=", pipeline::SchedulerKindName(key.scheduler), " tome[",
                      tome::ToString(key.tome), "]");
}

PolicyCall Job::policy_call(uint64_t id) const {
  const GenerationRequest& r = request_;
  return {.id = id,
          .batch_key = absl::HashOf(r.key),
          .model = r.key.model,
          .width = r.key.width,
          .height = r.key.height,
          .latent_pixels = r.latent_pixels(),
          .images = r.num_images,
          .rows = r.rows(),
          .unet_calls = r.unet_calls(),
          .ratio = r.tome.ratio,
          .max_ratio = r.tome_max_ratio,
          .target_seconds = r.latency_target_seconds,
          .enqueued = PolicyTime(enqueued_),
          .deadline = deadline_ == absl::InfiniteFuture() ? kNever : PolicyTime(deadline_),
          .priority = r.priority,
          .tenant = r.tenant,
          .tenant_weight = r.tenant_weight};
}

absl::Status Job::StopReason(absl::Time now) const {
  // The deadline first: gRPC also cancels a call whose deadline passed, and the log should say why.
  if (now >= deadline_) return absl::DeadlineExceededError("the call's deadline passed");
  if (cancelled()) return absl::CancelledError("the call was cancelled");
  return absl::OkStatus();
}

void Job::NotifyQueued(const QueuedInfo& info) {
  absl::MutexLock lock(&observer_mu_);
  if (!finished_.load()) observer_->OnQueued(info);
}

void Job::NotifyProgress(int step, int num_steps) {
  absl::MutexLock lock(&observer_mu_);
  if (!finished_.load()) observer_->OnProgress(step, num_steps);
}

bool Job::Finish(const absl::StatusOr<GenerationResult>& result) {
  absl::MutexLock lock(&observer_mu_);
  if (finished_.exchange(true)) return false;
  observer_->OnDone(result);
  return true;
}

}  // namespace tomeserve::server
