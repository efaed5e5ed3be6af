// The hand-off between the gRPC side and the device workers: one queue of jobs, one housekeeping thread, and
// the admission policy the workers ask at every step boundary (Triton's scheduler contract: Enqueue, Stop,
// counts; the workers pull).
//
// Batching modes:
//  - step (default): a worker holds one running batch of one model and latent size and re-forms it at every
//    step boundary. Admit() hands it queued jobs of its size, oldest first, while they fit its cost budget
//    (rows x latent pixels) and image cap; steps, scheduler, guidance, seed and ToMe settings may all differ.
//    An idle worker starts the oldest queued job at once (no queue delay). Fairness across sizes: while a job
//    of another size waits, only jobs queued before it join, so the batch drains and that size goes next
//    (oldest first across sizes; no size starves).
//  - request: the pre-step-level behaviour, kept for comparison: an idle worker takes the oldest job's whole
//    BatchKey (model, size, steps, scheduler, ToMe settings) up to max_batch_images, once the batch is full,
//    the oldest job has waited max_queue_delay, or the server is draining; nothing joins a running batch.
//
// Queue rules (both modes): Enqueue answers RESOURCE_EXHAUSTED when max_queue_size live jobs are queued,
// UNAVAILABLE after Stop(). A queued job whose call was cancelled or whose deadline passed is finished by the
// housekeeping thread without starting. Streaming calls get their position (jobs ahead) and the step-time
// model's start/finish estimates whenever their position changes. A job handed out by Admit() belongs to the
// worker that took it: it finishes it.
//
// Threading: every public method may be called from any thread; Admit() blocks only for an idle worker. Job
// observers are called without the lock. Torch-free.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/job.h"
#include "server/step_time_model.h"

namespace tomeserve::server {

enum class BatchingMode { kStep, kRequest };
// "step" / "request".
std::string_view BatchingModeName(BatchingMode mode);

struct SchedulerOptions {
  BatchingMode mode = BatchingMode::kStep;
  int max_batch_images = 8;                                // images in one running batch
  absl::Duration max_queue_delay = absl::Milliseconds(20);  // request mode only
  int max_queue_size = 64;                                  // queued jobs
};

// What a worker is running when it asks for more (a snapshot; the worker owns the batch).
struct RunningView {
  bool idle = true;  // nothing running: any size may start (the call may block)
  std::string model;  // the running batch's model and size (when !idle)
  int width = 0, height = 0;
  int images = 0;      // images in the batch, parked ones included
  int64_t cost = 0;    // their cost (GenerationRequest::cost)
  int rows = 0;        // their UNet rows per step
  double tome_rows = 0;  // sum of their rows' ToMe ratios (StepTimeModel)
  int64_t budget = 0;  // the worker's cost budget now; a job larger than it runs alone
  int max_images = 0;  // the worker's image cap now (lowered for a while after an out-of-memory error)
};

class Scheduler {
 public:
  using DepthFn = std::function<void(int)>;  // called with the queue depth whenever it changes

  // `model` (may be null) gives queued calls their start/finish estimates; it must outlive the scheduler.
  Scheduler(SchedulerOptions options, const StepTimeModel* model, DepthFn on_depth = nullptr);
  ~Scheduler();  // Stop()s
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerOptions& options() const { return options_; }

  // Queues `job`. On error the job is NOT finished: the caller reports it.
  absl::Status Enqueue(std::shared_ptr<Job> job);
  // Re-examines the queue now (a job was cancelled).
  void Wake();
  // The server is draining: request mode stops waiting for batch-mates.
  void Drain();
  // Stops accepting work; queued jobs are finished with UNAVAILABLE; idle workers' Admit() returns empty and
  // `stopped()` turns true. Joins the housekeeping thread. Idempotent.
  void Stop();
  bool stopped() const;

  int queue_depth() const;

  // Worker thread, at a step boundary: queued jobs to add to the running batch now, oldest first, taken out of
  // the queue. For an idle worker, blocks until a job can start or Stop() (then returns empty).
  std::vector<std::shared_ptr<Job>> Admit(const RunningView& running);

  // A worker's view of the load, for estimates: seconds until its running batch is done (set at every step
  // boundary). Thread-safe.
  void ReportBacklog(int worker, double seconds);

 private:
  void Run();
  bool DropStoppedLocked(absl::Time now, std::vector<std::shared_ptr<Job>>* finished)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Jobs refused at admission (their deadline cannot be met) go to `refused` with the status to finish with.
  using Refused = std::vector<std::pair<std::shared_ptr<Job>, absl::Status>>;
  std::vector<std::shared_ptr<Job>> TakeStepLocked(const RunningView& running, absl::Time now, Refused* refused)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<std::shared_ptr<Job>> TakeRequestLocked(const RunningView& running, absl::Time now,
                                                      Refused* refused) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Request mode: when the oldest key's batch may leave (full, delayed enough, or draining).
  absl::Time RequestReadyAtLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time NextExpiryLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct Update {
    std::shared_ptr<Job> job;
    QueuedInfo info;
  };
  std::vector<Update> ChangedPositionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SchedulerOptions options_;
  const StepTimeModel* const model_;
  const DepthFn on_depth_;

  mutable absl::Mutex mu_;
  struct Entry {
    std::shared_ptr<Job> job;
    int reported_position = -1;  // last position sent to the job's observer
  };
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<double> backlog_ ABSL_GUARDED_BY(mu_);  // per worker, seconds
  absl::CondVar cv_;  // queue changed, stop, drain: every waiter re-checks (SignalAll)
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tomeserve::server
