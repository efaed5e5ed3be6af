#include "server/scheduler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/admission.h"

namespace tomeserve::server {
namespace {

bool SameSize(const Job& job, const RunningView& v) {
  return job.key().model == v.model && job.key().width == v.width && job.key().height == v.height;
}

}  // namespace

std::string_view BatchingModeName(BatchingMode mode) {
  return mode == BatchingMode::kStep ? "step" : "request";
}

Scheduler::Scheduler(SchedulerOptions options, const StepTimeModel* model, DepthFn on_depth)
    : options_(options), model_(model), on_depth_(std::move(on_depth)) {
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
  queue_.push_back({std::move(job), -1});
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

std::vector<std::shared_ptr<Job>> Scheduler::Admit(const RunningView& running) {
  std::vector<std::shared_ptr<Job>> out, stopped;
  Refused refused;
  {
    absl::MutexLock lock(&mu_);
    while (true) {
      const absl::Time now = absl::Now();
      DropStoppedLocked(now, &stopped);
      if (stopping_) break;
      out = options_.mode == BatchingMode::kStep ? TakeStepLocked(running, now, &refused)
                                                 : TakeRequestLocked(running, now, &refused);
      if (!out.empty() || !running.idle || !stopped.empty() || !refused.empty()) break;
      // Idle and nothing to start: wait for a job, a drain, a stop, the request-mode delay or an expiry.
      const absl::Time until = std::min(RequestReadyAtLocked(), NextExpiryLocked());
      cv_.WaitWithDeadline(&mu_, until);
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

std::vector<std::shared_ptr<Job>> Scheduler::TakeStepLocked(const RunningView& running, absl::Time now,
                                                             Refused* refused) {
  std::vector<std::shared_ptr<Job>> out;
  if (queue_.empty()) return out;
  RunningView v = running;
  if (v.idle) {
    const Job& oldest = *queue_.front().job;
    v.model = oldest.key().model;
    v.width = oldest.key().width;
    v.height = oldest.key().height;
  }
  // Fairness across sizes: only jobs queued before the oldest job of another size may join (the queue is in
  // arrival order).
  std::vector<size_t> taken;
  for (size_t i = 0; i < queue_.size(); ++i) {
    const std::shared_ptr<Job>& job = queue_[i].job;
    if (!SameSize(*job, v)) break;
    const bool empty = v.images == 0;
    const bool fits = v.images + job->num_images() <= v.max_images && v.cost + job->request().cost() <= v.budget;
    if (!fits && !empty) break;  // oldest first within a size: later jobs wait behind it
    taken.push_back(i);
    AdmissionDecision d = DecideAdmission(*job, v, model_, now);
    if (!d.refusal.ok()) {
      refused->emplace_back(job, d.refusal);
      continue;
    }
    job->SetAdmitted(d.tome, d.slo);
    v.images += job->num_images();
    v.cost += job->request().cost();
    v.rows += job->request().rows();
    v.tome_rows += job->request().rows() * d.tome.ratio;
    out.push_back(job);
  }
  for (auto it = taken.rbegin(); it != taken.rend(); ++it) queue_.erase(queue_.begin() + static_cast<long>(*it));
  return out;
}

absl::Time Scheduler::RequestReadyAtLocked() const {
  if (options_.mode != BatchingMode::kRequest || queue_.empty()) return absl::InfiniteFuture();
  if (draining_) return absl::InfinitePast();
  // Full: the oldest key has max_batch_images queued.
  const BatchKey& key = queue_.front().job->key();
  int images = 0;
  for (const Entry& e : queue_) {
    if (!(e.job->key() == key)) continue;
    images += e.job->num_images();
    if (images >= options_.max_batch_images) return absl::InfinitePast();
  }
  return queue_.front().job->enqueued() + options_.max_queue_delay;
}

std::vector<std::shared_ptr<Job>> Scheduler::TakeRequestLocked(const RunningView& running, absl::Time now,
                                                                Refused* refused) {
  std::vector<std::shared_ptr<Job>> out;
  if (!running.idle || queue_.empty() || now < RequestReadyAtLocked()) return out;
  const BatchKey key = queue_.front().job->key();
  RunningView v = running;
  v.model = key.model;
  v.width = key.width;
  v.height = key.height;
  int images = 0;
  for (auto it = queue_.begin(); it != queue_.end();) {
    const bool fits = out.empty() || images + it->job->num_images() <= options_.max_batch_images;
    if (it->job->key() == key && fits) {
      AdmissionDecision d = DecideAdmission(*it->job, v, model_, now);
      if (!d.refusal.ok()) {
        refused->emplace_back(std::move(it->job), d.refusal);
        it = queue_.erase(it);
        continue;
      }
      images += it->job->num_images();
      it->job->SetAdmitted(d.tome, d.slo);
      v.rows += it->job->request().rows();
      v.tome_rows += it->job->request().rows() * d.tome.ratio;
      out.push_back(std::move(it->job));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
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
  bool known = model_ != nullptr;
  for (int i = 0; i < static_cast<int>(queue_.size()); ++i) {
    const Job& job = *queue_[i].job;
    const int rows = job.request().rows();
    std::optional<double> step =
        known ? model_->Predict(job.request().latent_pixels(), rows, rows * job.request().tome.ratio)
              : std::nullopt;
    known = known && step.has_value();
    QueuedInfo info{.position = i};
    if (known) {
      const double alone = job.key().steps * *step;
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
