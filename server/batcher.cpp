#include "server/batcher.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace tomeserve::server {

int Batch::num_images() const {
  int n = 0;
  for (const auto& job : jobs) n += job->num_images();
  return n;
}

Batcher::Batcher(BatcherOptions options, DispatchFn dispatch, DepthFn on_depth)
    : options_(options),
      dispatch_(std::move(dispatch)),
      on_depth_(std::move(on_depth)),
      free_slots_(options.num_slots) {
  thread_ = std::thread([this] { Run(); });
}

Batcher::~Batcher() { Stop(); }

absl::Status Batcher::Enqueue(std::shared_ptr<Job> job) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  // Jobs already cancelled or expired do not hold a place (the batcher thread removes them shortly).
  if (static_cast<int>(queue_.size()) >= options_.max_queue_size &&
      std::count_if(queue_.begin(), queue_.end(), [now = absl::Now()](const Entry& e) {
        return e.job->StopReason(now).ok();
      }) >= options_.max_queue_size) {
    return absl::ResourceExhaustedError(absl::StrCat("the queue is full (", options_.max_queue_size,
                                                     " requests, --max-queue-size); retry later"));
  }
  queue_.push_back({std::move(job), -1});
  wake_ = true;
  cv_.Signal();
  return absl::OkStatus();
}

void Batcher::Wake() {
  absl::MutexLock lock(&mu_);
  wake_ = true;
  cv_.Signal();
}

void Batcher::Drain() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  wake_ = true;
  cv_.Signal();
}

void Batcher::Release() {
  absl::MutexLock lock(&mu_);
  ++free_slots_;
  wake_ = true;
  cv_.Signal();
}

int Batcher::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

void Batcher::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    // The thread may be between two looks at the queue (observers run unlocked): wake_ makes it loop once
    // more instead of waiting, and that pass sees stopping_.
    wake_ = true;
    cv_.Signal();
  }
  if (thread_.joinable()) thread_.join();
}

bool Batcher::DropStoppedLocked(absl::Time now, std::vector<std::shared_ptr<Job>>* finished) {
  const size_t before = queue_.size();
  std::erase_if(queue_, [&](const Entry& e) {
    if (e.job->StopReason(now).ok()) return false;
    finished->push_back(e.job);
    return true;
  });
  return queue_.size() != before;
}

bool Batcher::OldestBatchFullLocked() const {
  const BatchKey& key = queue_.front().job->key();
  int images = 0;
  for (const Entry& e : queue_) {
    if (!(e.job->key() == key)) continue;
    if (images + e.job->num_images() > options_.max_batch_images) return true;
    images += e.job->num_images();
    if (images == options_.max_batch_images) return true;
  }
  return false;
}

Batch Batcher::TakeBatchLocked(absl::Time now) {
  Batch batch{.key = queue_.front().job->key(), .formed = now};
  int images = 0;
  for (auto it = queue_.begin(); it != queue_.end();) {
    const bool fits = batch.jobs.empty() || images + it->job->num_images() <= options_.max_batch_images;
    if (it->job->key() == batch.key && fits) {
      images += it->job->num_images();
      batch.jobs.push_back(std::move(it->job));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  return batch;
}

absl::Time Batcher::NextWakeLocked() const {
  if (queue_.empty()) return absl::InfiniteFuture();
  absl::Time next = absl::InfiniteFuture();
  if (free_slots_ > 0) next = queue_.front().job->enqueued() + options_.max_queue_delay;
  for (const Entry& e : queue_) next = std::min(next, e.job->deadline());
  return next;
}

std::vector<std::pair<std::shared_ptr<Job>, int>> Batcher::ChangedPositionsLocked() {
  std::vector<std::pair<std::shared_ptr<Job>, int>> changed;
  for (int i = 0; i < static_cast<int>(queue_.size()); ++i) {
    if (queue_[i].reported_position != i) {
      queue_[i].reported_position = i;
      changed.emplace_back(queue_[i].job, i);
    }
  }
  return changed;
}

void Batcher::Run() {
  int last_depth = -1;
  absl::MutexLock lock(&mu_);
  while (true) {
    const absl::Time now = absl::Now();
    std::vector<std::shared_ptr<Job>> stopped;
    DropStoppedLocked(now, &stopped);
    std::vector<std::shared_ptr<Job>> unavailable;
    std::vector<Batch> batches;
    if (stopping_) {
      for (Entry& e : queue_) unavailable.push_back(std::move(e.job));
      queue_.clear();
    }
    while (!stopping_ && free_slots_ > 0 && !queue_.empty() &&
           (draining_ || OldestBatchFullLocked() ||
            now >= queue_.front().job->enqueued() + options_.max_queue_delay)) {
      batches.push_back(TakeBatchLocked(now));
      --free_slots_;
    }
    auto positions = ChangedPositionsLocked();
    const int depth = static_cast<int>(queue_.size());
    const bool stop = stopping_;

    // Observers and workers are called without the lock: they may call back into the batcher.
    mu_.Unlock();
    for (auto& job : stopped) job->Finish(job->StopReason(now));
    for (auto& job : unavailable) job->Finish(absl::UnavailableError("the server is shutting down"));
    for (auto& [job, position] : positions) job->NotifyQueued(position);
    if (depth != last_depth && on_depth_) on_depth_(depth);
    last_depth = depth;
    for (Batch& b : batches) dispatch_(std::move(b));
    mu_.Lock();

    if (stop) return;
    // stopping_ too: Stop() may have run while the lock was released above.
    if (!stopped.empty() || !batches.empty() || wake_ || stopping_) {
      wake_ = false;
      continue;
    }
    cv_.WaitWithDeadline(&mu_, NextWakeLocked());
  }
}

}  // namespace tomeserve::server
