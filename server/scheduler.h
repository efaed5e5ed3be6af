// The hand-off between the gRPC side and the device workers: one queue of jobs, one housekeeping thread, and
// the admission policy the workers ask at every step boundary (Triton's scheduler contract: Enqueue, Stop,
// counts; the workers pull).
//
// What joins a running batch, in which order and at which ToMe ratio is decided by the BatchingPolicy
// (server/batching_policy.h, both modes); the scheduler owns the queue, its bounds, expiry and position
// reports, and hands the policy's choices to the worker that asked.
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
#include "server/batching_policy.h"
#include "server/job.h"
#include "server/step_cost.h"

namespace tomeserve::server {

struct SchedulerOptions {
  BatchingMode mode = BatchingMode::kStep;
  int max_batch_images = 8;                                // images in one running batch
  absl::Duration max_queue_delay = absl::Milliseconds(20);  // request mode only
  int max_queue_size = 64;                                  // queued jobs
};

// A call handed to a worker, with the policy's view of it (the worker reports it back in WorkerView).
struct AdmittedCall {
  std::shared_ptr<Job> job;
  PolicyCall call;
  // Running calls (PolicyCall::id) the worker parks before starting this one, until it ends (AdmitPlan::pause).
  std::vector<uint64_t> pause;
};

class Scheduler {
 public:
  using DepthFn = std::function<void(int)>;  // called with the queue depth whenever it changes

  // `estimates` (may be null) gives queued calls their start/finish estimates; it must outlive the scheduler.
  Scheduler(SchedulerOptions options, const StepCost* estimates, DepthFn on_depth = nullptr);
  ~Scheduler();  // Stop()s
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerOptions& options() const { return options_; }
  // The policy the workers also ask which of their batches steps next (immutable; any thread).
  const BatchingPolicy& policy() const { return policy_; }

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

  // Worker thread, at a step boundary: queued jobs to add to the running batch now, in the order to start them,
  // taken out of the queue (the policy's choice; refused ones are finished here). For an idle worker, blocks
  // until a job can start or Stop() (then returns empty).
  std::vector<AdmittedCall> Admit(const WorkerView& worker);

  // A worker's view of the load, for estimates: seconds until its running batch is done (set at every step
  // boundary). Thread-safe.
  void ReportBacklog(int worker, double seconds);

 private:
  void Run();
  bool DropStoppedLocked(absl::Time now, std::vector<std::shared_ptr<Job>>* finished)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The policy's plan for `worker` now, applied: admitted jobs out of the queue (their settings set), refused
  // ones to `refused` with their status.
  using Refused = std::vector<std::pair<std::shared_ptr<Job>, absl::Status>>;
  std::vector<AdmittedCall> TakeLocked(const WorkerView& worker, absl::Time now, Refused* refused)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double RequestReadyAtLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time NextExpiryLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct Update {
    std::shared_ptr<Job> job;
    QueuedInfo info;
  };
  std::vector<Update> ChangedPositionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SchedulerOptions options_;
  const BatchingPolicy policy_;
  const StepCost* const estimates_;
  const DepthFn on_depth_;

  mutable absl::Mutex mu_;
  struct Entry {
    std::shared_ptr<Job> job;
    PolicyCall call;
    int reported_position = -1;  // last position sent to the job's observer
  };
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<double> backlog_ ABSL_GUARDED_BY(mu_);  // per worker, seconds
  BatchingPolicy::FairShareState fair_share_ ABSL_GUARDED_BY(mu_);  // between tenants
  absl::CondVar cv_;  // queue changed, stop, drain: every waiter re-checks (SignalAll)
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tomeserve::server
