#include "server/job.h"

#include "absl/strings/str_cat.h"

namespace tomeserve::server {

std::string ToString(const BatchKey& key) {
  return absl::StrCat("model=", key.model, " ", key.width, "x", key.height, " steps=", key.steps,
                      " scheduler=", pipeline::SchedulerKindName(key.scheduler), " tome[",
                      tome::ToString(key.tome), "]");
}

absl::Status Job::StopReason(absl::Time now) const {
  // The deadline first: gRPC also cancels a call whose deadline passed, and the log should say why.
  if (now >= deadline_) return absl::DeadlineExceededError("the call's deadline passed");
  if (cancelled()) return absl::CancelledError("the call was cancelled");
  return absl::OkStatus();
}

bool Job::Finish(const absl::StatusOr<GenerationResult>& result) {
  bool expected = false;
  if (!finished_.compare_exchange_strong(expected, true)) return false;
  observer_->OnDone(result);
  return true;
}

}  // namespace tomeserve::server
