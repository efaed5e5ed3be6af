// The dynamic batcher: one thread that groups queued jobs by BatchKey and hands batches to the workers.
//
// Policy:
//  - The oldest queued job's key goes first (FIFO across keys, so no key starves). Its batch takes, in queue
//    order, every later job with the same key that still fits in max_batch_images (a job that does not fit
//    waits for the next batch; a single job larger than the limit runs alone).
//  - A batch is formed only when a worker slot is free, and then as soon as it is full, or when its oldest
//    job has waited max_queue_delay, or when the batcher is draining.
//  - Enqueue answers RESOURCE_EXHAUSTED when max_queue_size live jobs are already queued (running, cancelled
//    and expired ones do not count), UNAVAILABLE after Stop().
//  - A queued job whose call was cancelled or whose deadline passed is finished (CANCELLED /
//    DEADLINE_EXCEEDED) without ever starting.
//  - Streaming calls get their queue position (jobs ahead of them) on enqueue and whenever it changes.
//
// Threading: Enqueue, Wake, Release, queue_depth may be called from any thread. The dispatch callback runs on
// the batcher thread; it must not block (the worker pool queues the batch). Torch-free.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/job.h"

namespace tomeserve::server {

struct Batch {
  BatchKey key;
  std::vector<std::shared_ptr<Job>> jobs;
  absl::Time formed;
  int num_images() const;
};

struct BatcherOptions {
  int max_batch_images = 8;
  absl::Duration max_queue_delay = absl::Milliseconds(20);
  int max_queue_size = 256;  // queued jobs
  int num_slots = 1;         // batches that may run at once (one per worker)
};

class Batcher {
 public:
  using DispatchFn = std::function<void(Batch)>;
  // Called with the queue depth (jobs) whenever it changes.
  using DepthFn = std::function<void(int)>;

  Batcher(BatcherOptions options, DispatchFn dispatch, DepthFn on_depth = nullptr);
  ~Batcher();  // Stop()s
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Queues `job` (its key and deadline are final). On error the job is NOT finished: the caller reports it.
  absl::Status Enqueue(std::shared_ptr<Job> job);
  // Re-examines the queue now (a job was cancelled).
  void Wake();
  // A dispatched batch has finished: its slot is free again.
  void Release();
  int queue_depth() const;

  // The server is draining: batches leave as soon as a worker is free, without waiting for max_queue_delay.
  void Drain();

  // Stops accepting work; jobs still queued are finished with UNAVAILABLE; joins the thread. Batches already
  // dispatched are the workers' business. Idempotent.
  void Stop();

 private:
  void Run();
  // Finishes cancelled/expired queued jobs. Returns whether any was removed.
  bool DropStoppedLocked(absl::Time now, std::vector<std::shared_ptr<Job>>* finished)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the oldest job's batch out of the queue.
  Batch TakeBatchLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool OldestBatchFullLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Earliest time something changes by itself: the oldest job's delay, or any queued job's deadline.
  absl::Time NextWakeLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Positions that changed since they were last reported.
  std::vector<std::pair<std::shared_ptr<Job>, int>> ChangedPositionsLocked()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const BatcherOptions options_;
  const DispatchFn dispatch_;
  const DepthFn on_depth_;

  mutable absl::Mutex mu_;
  struct Entry {
    std::shared_ptr<Job> job;
    int reported_position = -1;  // last position sent to the job's observer
  };
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
  int free_slots_ ABSL_GUARDED_BY(mu_);
  absl::CondVar cv_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tomeserve::server
