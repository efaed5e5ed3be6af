// The batching policy: the one place that decides which queued calls join a worker's running batch at a step
// boundary, in which order, at which Token Merging ratio (the SLO ratio controller), and which are refused. It
// is pure — torch-free, gRPC-free, no clock, no state between calls — so the device workers (through the
// Scheduler, on the real clock) and tomeserve-sim (on a virtual clock, with the same code) drive it alike.
// Triton's scheduler contract: the worker asks, the policy answers.
//
// Step mode (the default):
//  - Urgency: every queued call has a due time — enqueued + its latency target, or its hard deadline if
//    earlier; a best-effort call's is enqueued (or its tenant's fair start, AssignFairStarts) +
//    kBestEffortSlack[priority] x its unloaded latency, or its deadline if that is earlier. Calls are
//    considered earliest due first (earliest deadline first), so calls with targets go ahead of best-effort
//    ones, and a best-effort call's due time is its age bound.
//  - Cost-aware joining: a call joins the running batch (same model and size, within the image cap and the cost
//    budget) when that pays on THIS worker's measured step costs (WorkerView::cost). The policy projects the
//    batch forward (a step costs cost(rows, tome rows) of the calls still in it; a call leaves after its last
//    UNet call and its fixed costs) twice — the call joining now, and the call waiting until the batch drains
//    — over the running calls, the candidate and the most urgent call that cannot join (another size, or over
//    the caps: it starts when the batch drains), and takes the option with fewer missed limits (targets,
//    deadlines), then the smaller total latency. On a GPU, where 8 rows cost about 2 rows' time, joining nearly
//    always pays; on a CPU, where cost grows with rows, a long call joining a short one's batch is plain
//    processor sharing and waits, while a short one joins a long one's (shortest remaining work first).
//  - Age bound: once the most urgent call that cannot join is past its due time, nothing more joins: the batch
//    drains for it. Without costs (none measured yet) the policy is strict: calls join in urgency order while
//    they fit, and the first that cannot join stops the rest.
//  - Controller: for a call with a ratio range [ratio, max_ratio] and a target, the smallest ratio of
//    ControllerGrid at which the projection keeps this call within its target AND every running call that met
//    its limit still meets it; none: max_ratio, target_met = false. Without costs: its ratio.
//  - Refusal: a call whose hard deadline the projection says cannot be met at the chosen ratio is refused with
//    DEADLINE_EXCEEDED when it would start; it never holds rows it would throw away. A missed latency target
//    is not a refusal (the call runs, the response says target_met = false).
//  - An idle worker starts the most urgent call at once, whatever its size; a call larger than the budget runs
//    alone.
//  - Fair preemption (tenants, AssignFairStarts): when the most urgent queued call cannot join its batch (the
//    image cap or the budget), its fair start has come (its tenant is within its share: a tenant calling back
//    to back is not), its tenant has nothing running on this worker, and best-effort calls of other,
//    backlogged tenants (tenants with calls still queued) hold the room, the policy pauses the most recently
//    admitted of them until the call fits (AdmitPlan::pause): the worker parks their samples, state kept, until
//    that call ends. A light tenant then waits one step, not a heavy tenant's whole call. A call with a latency
//    target is never paused, nor one whose deadline the pause would put at risk (its remaining solo time after
//    the pausing call's).
// Request mode (the comparison baseline, the pre-step-level behaviour): an idle worker takes the oldest call's
// whole batch key up to max_batch_images once that many are queued, the oldest waited max_queue_delay, or the
// server drains; nothing joins a running batch.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "server/step_cost.h"

namespace tomeserve::server {

enum class BatchingMode { kStep, kRequest };
// "step" / "request".
std::string_view BatchingModeName(BatchingMode mode);

// GenerateRequest.priority: orders best-effort calls (calls with a latency target or deadline come first).
enum class Priority { kInteractive = 0, kBatch = 1 };
// Best-effort due time, in multiples of the call's unloaded latency, by Priority.
inline constexpr double kBestEffortSlack[] = {4.0, 16.0};

inline constexpr double kNever = std::numeric_limits<double>::infinity();

// One call as the policy sees it. Times are seconds on the caller's clock (real or virtual).
struct PolicyCall {
  uint64_t id = 0;            // the caller's handle, opaque here
  uint64_t batch_key = 0;     // request mode: calls with equal keys may share a batch
  std::string model;
  int width = 0, height = 0;  // pixels
  int64_t latent_pixels = 0;  // of one row
  int images = 1;
  int rows = 1;               // UNet rows per step (2 per image with classifier-free guidance)
  int unet_calls = 1;         // UNet calls per sample (pipeline::UNetCallsPerSample)
  double ratio = 0;           // ToMe ratio asked for (the controller's floor)
  double max_ratio = 0;       // controller ceiling; <= ratio: fixed
  double target_seconds = 0;  // end-to-end latency target; 0: none
  double enqueued = 0;
  double deadline = kNever;   // hard: the call is cancelled at this time
  Priority priority = Priority::kInteractive;
  // Fair sharing between tenants (AssignFairStarts): tenant_weight > 0 takes part. fair_start: when the call's
  // share of the workers lets it start (its best-effort due time counts from there; < 0: from `enqueued`);
  // fair_share: its tenant's share when that was computed.
  std::string tenant;
  double tenant_weight = 0;
  double fair_start = -1;
  double fair_share = 0;

  int64_t cost() const { return static_cast<int64_t>(rows) * latent_pixels; }  // of the batch budget
  bool has_range() const { return target_seconds > 0 && max_ratio > ratio; }
  // The most merging it may get: max_ratio with a range, else its ratio.
  double ceiling_ratio() const { return has_range() ? max_ratio : ratio; }
};

// An admitted call in a worker's batch.
struct RunningCall {
  PolicyCall call;
  double ratio = 0;    // effective
  int calls_left = 0;  // UNet calls until its last sample is done
  bool paused = false;  // its samples are parked for another call (AdmitPlan::pause): holds no rows now
};

// A worker at a step boundary. Its running calls form batches, one per model and size; each batch takes one
// step per round (the worker steps them in turn).
struct WorkerView {
  const StepCost* cost = nullptr;    // this worker's step costs; null: none yet (calls join while they fit)
  std::vector<RunningCall> running;  // every batch's calls
  int max_images = 8;                // per batch (lowered for a while after an out-of-memory error)
  int64_t budget = 0;                // rows x latent pixels over all batches; a call larger than it runs alone
  int max_batches = 1;               // batches of different sizes the worker may run side by side
  bool idle() const { return running.empty(); }
};

// The controller's decision for one call (GenerateResponse.slo).
struct SloDecision {
  bool applied = false;  // the request had a ratio range and a target
  double target_seconds = 0;
  double predicted_seconds = 0;  // the predicted end-to-end latency at the chosen ratio (0: no prediction)
  bool target_met = false;       // some ratio in range was predicted to meet the target
};

struct Admission {
  size_t index = 0;  // into the queue passed to Admit
  double ratio = 0;
  SloDecision slo;
};
struct Refusal {
  size_t index = 0;
  std::string why;  // DEADLINE_EXCEEDED's message
};
// A running call to park (all its samples, state kept) until the admitted call queue[for_index] ends.
struct Pause {
  uint64_t running_id = 0;  // PolicyCall::id of a call in WorkerView::running
  size_t for_index = 0;     // into the queue passed to Admit; always one of the plan's admissions
};
struct AdmitPlan {
  std::vector<Admission> admit;  // in the order to start them
  std::vector<Refusal> refuse;
  std::vector<Pause> pause;      // done before the admissions start
};

struct PolicyOptions {
  BatchingMode mode = BatchingMode::kStep;
  int max_batch_images = 8;
  double max_queue_delay_seconds = 0.020;  // request mode only
};

class BatchingPolicy {
 public:
  explicit BatchingPolicy(PolicyOptions options) : options_(options) {}

  const PolicyOptions& options() const { return options_; }

  // What joins `worker`'s batch now, from `queue` (any order; live calls only).
  AdmitPlan Admit(const WorkerView& worker, std::span<const PolicyCall> queue, double now, bool draining) const;

  // Which batch steps next: the index in `worker.running` of a call whose batch it is — the batch holding the
  // most urgent call (earliest due), so a call with a tight target is not stuck behind another size's batch.
  // Paused calls are skipped. `worker.running` must hold a call that is not paused.
  size_t PickBatch(const WorkerView& worker) const;

  // Request mode: when an idle worker may take the oldest key's batch (-inf: now; +inf: never / step mode).
  double RequestReadyAt(std::span<const PolicyCall> queue, bool draining) const;

  // Seconds of one call run alone at `ratio`, its fixed costs included; nullopt without a cost.
  static std::optional<double> SoloSeconds(const StepCost* cost, const PolicyCall& call, double ratio);

  // The ratios the controller tries, in order: `min_ratio`, then multiples of 0.05 above it, then `max_ratio`.
  static std::vector<double> ControllerGrid(double min_ratio, double max_ratio);

  // Weighted fair sharing between tenants: start-time fair queueing on the calls' solo seconds. The state holds
  // each tenant's finish tag (where its next call would start if it got exactly its share) and the virtual time
  // (the latest start tag admitted). A queued call of a tenant taking part (tenant_weight > 0) gets fair_start =
  // max(virtual time, the oldest queued tenant call's arrival, its tenant's finish tag) + the solo seconds of the
  // tenant's calls queued ahead of it,
  // each over the tenant's share (its weight / the weights of the tenants with queued calls), and fair_share =
  // that share. Its best-effort due time counts from fair_start instead of its arrival, so tenants with queued
  // work are served in proportion to their weights however many calls each sends. A latency target or deadline
  // stays the call's own limit (compared in policy seconds; fair starts run ahead of the clock while batching
  // serves many calls at once, which only favours calls with targets). Without costs nothing changes (first
  // come, first served). `queue` is in arrival order.
  struct FairShareState {
    std::map<std::string, double> finish;  // per tenant
    double virtual_time = 0;
  };
  static void AssignFairStarts(const StepCost* cost, const FairShareState& state, std::span<PolicyCall> queue);
  // An admitted call: its tenant's finish tag moves on by its solo seconds over its fair_share.
  static void ChargeTenant(const StepCost* cost, const PolicyCall& call, FairShareState& state);

 private:
  AdmitPlan AdmitStep(const WorkerView& worker, std::span<const PolicyCall> queue, double now) const;
  AdmitPlan AdmitRequest(const WorkerView& worker, std::span<const PolicyCall> queue, double now,
                         bool draining) const;
  static double DueTime(const StepCost* cost, const PolicyCall& call);

  const PolicyOptions options_;
};

}  // namespace tomeserve::server
