#include "server/scheduler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tomeserve::server {

Scheduler::Scheduler(SchedulerOptions options, const StepCost* estimates, DepthFn on_depth)
    : options_(options),
      policy_({.mode = options.mode,
               .max_batch_images = options.max_batch_images,
               .max_queue_delay_seconds = absl::ToDoubleSeconds(options.max_queue_delay)}),
      estimates_(estimates),
      on_depth_(std::move(on_depth)) {
  thread_ = std::thread([this] { Run(); });
}

Scheduler::~Scheduler() { Stop(); }

absl::Status Scheduler::Enqueue(std::shared_ptr<Job> job) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  // Jobs already cancelled or expired do not hold a place (the housekeeping thread removes them shortly).
  if (static_cast<int>(queue_.size()) >= options_.max_queue_size &&
      std::count_if(queue_.begin(), queue_.end(), [now = absl::Now()](const Entry& e) {
        return e.job->StopReason(now).ok();
      }) >= options_.max_queue_size) {
    return absl::ResourceExhaustedError(absl::StrCat("the queue is full (", options_.max_queue_size,
                                                     " requests, --max-queue-size); retry later"));
  }
  PolicyCall call = job->policy_call(next_id_++);
  queue_.push_back({std::move(job), std::move(call), -1});
  wake_ = true;
  cv_.SignalAll();
  return absl::OkStatus();
}

void Scheduler::Wake() {
  absl::MutexLock lock(&mu_);
  wake_ = true;
  cv_.SignalAll();
}

void Scheduler::Drain() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  wake_ = true;
  cv_.SignalAll();
}

int Scheduler::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

bool Scheduler::stopped() const {
  absl::MutexLock lock(&mu_);
  return stopping_;
}

void Scheduler::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    // The thread may be between two looks at the queue (observers run unlocked): wake_ makes it loop once
    // more instead of waiting, and that pass sees stopping_.
    wake_ = true;
    cv_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
}

void Scheduler::ReportBacklog(int worker, double seconds) {
  absl::MutexLock lock(&mu_);
  if (worker < 0) return;
  if (static_cast<int>(backlog_.size()) <= worker) backlog_.resize(worker + 1, 0.0);
  backlog_[worker] = seconds;
}

bool Scheduler::DropStoppedLocked(absl::Time now, std::vector<std::shared_ptr<Job>>* finished) {
  const size_t before = queue_.size();
  std::erase_if(queue_, [&](const Entry& e) {
    if (e.job->StopReason(now).ok()) return false;
    finished->push_back(e.job);
    return true;
  });
  return queue_.size() != before;
}

std::vector<AdmittedCall> Scheduler::Admit(const WorkerView& worker) {
  std::vector<AdmittedCall> out;
  std::vector<std::shared_ptr<Job>> stopped;
  Refused refused;
  {
    absl::MutexLock lock(&mu_);
    while (true) {
      const absl::Time now = absl::Now();
      DropStoppedLocked(now, &stopped);
      if (stopping_) break;
      out = TakeLocked(worker, now, &refused);
      if (!out.empty() || !worker.idle() || !stopped.empty() || !refused.empty()) break;
      // Idle and nothing to start: wait for a job, a drain, a stop, the request-mode delay or an expiry.
      const double ready = RequestReadyAtLocked();
      const absl::Time ready_at = ready == kNever ? absl::InfiniteFuture()
                                                  : absl::UnixEpoch() + absl::Seconds(std::max(0.0, ready));
      cv_.WaitWithDeadline(&mu_, std::min(ready_at, NextExpiryLocked()));
    }
    if (!out.empty() || !stopped.empty() || !refused.empty()) {
      wake_ = true;  // positions changed: let the housekeeping thread report them
      cv_.SignalAll();
    }
  }
  for (auto& job : stopped) job->Finish(job->StopReason(absl::Now()));
  for (auto& [job, status] : refused) job->Finish(status);
  return out;
}

double Scheduler::RequestReadyAtLocked() const {
  std::vector<PolicyCall> calls;
  calls.reserve(queue_.size());
  for (const Entry& e : queue_) calls.push_back(e.call);
  return policy_.RequestReadyAt(calls, draining_);
}

std::vector<AdmittedCall> Scheduler::TakeLocked(const WorkerView& worker, absl::Time now, Refused* refused) {
  std::vector<AdmittedCall> out;
  if (queue_.empty()) return out;
  std::vector<PolicyCall> calls;
  calls.reserve(queue_.size());
  for (const Entry& e : queue_) calls.push_back(e.call);
  const double policy_now = PolicyTime(now);
  BatchingPolicy::AssignFairStarts(estimates_, fair_share_, calls);
  const AdmitPlan plan = policy_.Admit(worker, calls, policy_now, draining_);
  std::vector<size_t> taken;
  for (const Admission& a : plan.admit) {
    Entry& e = queue_[a.index];
    tome::TokenMerging tome = e.job->request().tome;
    tome.ratio = a.ratio;
    e.job->SetAdmitted(tome, a.slo);
    e.call.ratio = a.ratio;
    e.call.fair_start = calls[a.index].fair_start;
    e.call.fair_share = calls[a.index].fair_share;
    BatchingPolicy::ChargeTenant(estimates_, e.call, fair_share_);
    AdmittedCall admitted{e.job, e.call};
    for (const Pause& p : plan.pause) {
      if (p.for_index == a.index) admitted.pause.push_back(p.running_id);
    }
    out.push_back(std::move(admitted));
    taken.push_back(a.index);
  }
  for (const Refusal& r : plan.refuse) {
    refused->emplace_back(queue_[r.index].job, absl::DeadlineExceededError(r.why));
    taken.push_back(r.index);
  }
  std::sort(taken.begin(), taken.end());
  for (auto it = taken.rbegin(); it != taken.rend(); ++it) queue_.erase(queue_.begin() + static_cast<long>(*it));
  return out;
}

absl::Time Scheduler::NextExpiryLocked() const {
  absl::Time next = absl::InfiniteFuture();
  for (const Entry& e : queue_) next = std::min(next, e.job->deadline());
  return next;
}

std::vector<Scheduler::Update> Scheduler::ChangedPositionsLocked() {
  std::vector<Update> changed;
  const int workers = std::max<int>(1, static_cast<int>(backlog_.size()));
  const double backlog = backlog_.empty() ? 0.0 : *std::min_element(backlog_.begin(), backlog_.end());
  double ahead = 0;  // seconds of work queued ahead, each job as if alone
  bool known = estimates_ != nullptr;
  for (int i = 0; i < static_cast<int>(queue_.size()); ++i) {
    std::optional<double> solo =
        known ? BatchingPolicy::SoloSeconds(estimates_, queue_[i].call, queue_[i].call.ratio) : std::nullopt;
    known = known && solo.has_value();
    QueuedInfo info{.position = i};
    if (known) {
      const double alone = *solo;
      info.estimated_start_seconds = backlog + ahead / workers;
      info.estimated_finish_seconds = info.estimated_start_seconds + alone;
      ahead += alone;
    }
    if (queue_[i].reported_position != i) {
      queue_[i].reported_position = i;
      changed.push_back({queue_[i].job, info});
    }
  }
  return changed;
}

void Scheduler::Run() {
  int last_depth = -1;
  absl::MutexLock lock(&mu_);
  while (true) {
    const absl::Time now = absl::Now();
    std::vector<std::shared_ptr<Job>> stopped;
    DropStoppedLocked(now, &stopped);
    std::vector<std::shared_ptr<Job>> unavailable;
    if (stopping_) {
      for (Entry& e : queue_) unavailable.push_back(std::move(e.job));
      queue_.clear();
      cv_.SignalAll();  // idle workers see stopping_
    }
    std::vector<Update> positions = ChangedPositionsLocked();
    const int depth = static_cast<int>(queue_.size());
    const bool stop = stopping_;
    if (!stopped.empty()) cv_.SignalAll();

    // Observers are called without the lock: they may call back into the scheduler.
    mu_.Unlock();
    for (auto& job : stopped) job->Finish(job->StopReason(now));
    for (auto& job : unavailable) job->Finish(absl::UnavailableError("the server is shutting down"));
    for (auto& [job, info] : positions) job->NotifyQueued(info);
    if (depth != last_depth && on_depth_) on_depth_(depth);
    last_depth = depth;
    mu_.Lock();

    if (stop) return;
    // stopping_ too: Stop() may have run while the lock was released above.
    if (!stopped.empty() || wake_ || stopping_) {
      wake_ = false;
      continue;
    }
    cv_.WaitWithDeadline(&mu_, NextExpiryLocked());
  }
}

}  // namespace tomeserve::server
