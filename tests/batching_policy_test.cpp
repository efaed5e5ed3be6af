// BatchingPolicy: the decisions themselves, on a fake cost model whose numbers are chosen so each expected
// answer can be computed by hand. Pure and deterministic (no clock, no threads): the policy is a function.
#include "server/batching_policy.h"

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tomeserve::server {
namespace {

// step seconds = a + b * rows + c * tome_rows (per size: scaled by latent pixels / 64); fixed costs 0.
class FakeCost : public StepCost {
 public:
  FakeCost(double a, double b, double c = 0) : a_(a), b_(b), c_(c) {}
  std::optional<double> StepSeconds(std::string_view, int64_t pixels, int rows, double tome_rows) const override {
    return (a_ + b_ * rows + c_ * tome_rows) * static_cast<double>(pixels) / 64.0;
  }
  double FixedSeconds(std::string_view, int64_t, int) const override { return 0; }

 private:
  double a_, b_, c_;
};

struct CallSpec {
  int width = 64;
  int images = 1;
  int calls = 10;  // UNet calls
  double enqueued = 0;
  double ratio = 0, max_ratio = 0, target = 0;
  double deadline = kNever;
  Priority priority = Priority::kInteractive;
};

PolicyCall Call(uint64_t id, const CallSpec& s) {
  return {.id = id,
          .batch_key = static_cast<uint64_t>(s.width),
          .model = "m",
          .width = s.width,
          .height = 64,
          .latent_pixels = static_cast<int64_t>(s.width / 8) * 8,
          .images = s.images,
          .rows = 2 * s.images,
          .unet_calls = s.calls,
          .ratio = s.ratio,
          .max_ratio = s.max_ratio,
          .target_seconds = s.target,
          .enqueued = s.enqueued,
          .deadline = s.deadline,
          .priority = s.priority};
}

RunningCall Running(const PolicyCall& c, int calls_left) { return {.call = c, .ratio = c.ratio, .calls_left = calls_left}; }

std::vector<uint64_t> Admitted(const AdmitPlan& plan, const std::vector<PolicyCall>& queue) {
  std::vector<uint64_t> ids;
  for (const Admission& a : plan.admit) ids.push_back(queue[a.index].id);
  return ids;
}

const BatchingPolicy kStep({.mode = BatchingMode::kStep, .max_batch_images = 8});

TEST(BatchingPolicy, OnAGpuLikeDeviceALongCallJoinsAShortOnesBatch) {
  // Rows nearly free: 10 ms per step plus 0.5 ms per row.
  const FakeCost gpu(0.010, 0.0005);
  const WorkerView worker{.cost = &gpu, .running = {Running(Call(0, {.calls = 10}), 10)}, .budget = 1 << 20};
  const std::vector<PolicyCall> queue = {Call(1, {.calls = 50, .enqueued = 0})};
  EXPECT_EQ(Admitted(kStep.Admit(worker, queue, 0, false), queue), std::vector<uint64_t>{1});
}

TEST(BatchingPolicy, OnACpuLikeDeviceLongCallsWaitAndShortOnesJoin) {
  // Cost linear in rows (processor sharing): a 50-call newcomer would slow a 10-call batch fivefold in
  // overlap and gain only the 10 calls it waits; a 5-call newcomer joining a 50-call batch gains 50 calls of
  // waiting for 5 calls of slowdown.
  const FakeCost cpu(0.0, 0.01);
  const WorkerView short_batch{.cost = &cpu, .running = {Running(Call(0, {.calls = 10}), 10)}, .budget = 1 << 20};
  const std::vector<PolicyCall> long_call = {Call(1, {.calls = 50})};
  EXPECT_TRUE(kStep.Admit(short_batch, long_call, 0, false).admit.empty());
  const WorkerView long_batch{.cost = &cpu, .running = {Running(Call(0, {.calls = 50}), 50)}, .budget = 1 << 20};
  const std::vector<PolicyCall> short_call = {Call(1, {.calls = 5})};
  EXPECT_EQ(Admitted(kStep.Admit(long_batch, short_call, 0, false), short_call), std::vector<uint64_t>{1});
}

TEST(BatchingPolicy, CallsWithTargetsGoFirstThenPriorityThenAge) {
  const FakeCost cost(0.0, 0.01);
  const WorkerView idle{.cost = &cost, .max_images = 1, .budget = 1 << 20};  // one call at a time
  // Alone each runs 10 calls x 0.02 s = 0.2 s. Best-effort due: enqueued + 4 x 0.2 (interactive), + 16 x 0.2
  // (batch); the target call's due is enqueued + its target.
  const std::vector<PolicyCall> queue = {
      Call(0, {.enqueued = 0.0, .priority = Priority::kBatch}),  // due 3.2
      Call(1, {.enqueued = 0.1}),                                // due 0.9
      Call(2, {.enqueued = 0.2, .target = 0.5}),                 // due 0.7
  };
  EXPECT_EQ(Admitted(kStep.Admit(idle, queue, 0.3, false), queue), std::vector<uint64_t>{2});
  const std::vector<PolicyCall> rest = {queue[0], queue[1]};
  EXPECT_EQ(Admitted(kStep.Admit(idle, rest, 0.3, false), rest), std::vector<uint64_t>{1});
  // Long enough in the queue, the batch-priority call's due time comes first (the age bound).
  const std::vector<PolicyCall> aged = {queue[0], Call(3, {.enqueued = 3.0})};
  EXPECT_EQ(Admitted(kStep.Admit(idle, aged, 3.0, false), aged), std::vector<uint64_t>{0});
}

TEST(BatchingPolicy, ControllerPicksTheSmallestRatioThatMeetsTheTarget) {
  // 10 calls of 2 rows: 0.2 s at ratio 0, 0.1 s at ratio 0.5 (seconds = 0.01 * rows - 0.01 * tome_rows).
  const FakeCost cost(0.0, 0.01, -0.01);
  const WorkerView idle{.cost = &cost, .budget = 1 << 20};
  auto decide = [&](const CallSpec& s) {
    const std::vector<PolicyCall> q = {Call(0, s)};
    const AdmitPlan plan = kStep.Admit(idle, q, 0, false);
    EXPECT_EQ(plan.admit.size(), 1u);
    return plan.admit.at(0);
  };
  Admission a = decide({.ratio = 0.0, .max_ratio = 0.6, .target = 0.151});
  EXPECT_TRUE(a.slo.applied && a.slo.target_met);
  EXPECT_NEAR(a.ratio, 0.25, 1e-9);  // 0.2 * (1 - r) <= 0.151 first holds on the grid at 0.25
  EXPECT_NEAR(a.slo.predicted_seconds, 0.15, 1e-9);
  a = decide({.ratio = 0.1, .max_ratio = 0.6, .target = 5});
  EXPECT_TRUE(a.slo.target_met);
  EXPECT_EQ(a.ratio, 0.1);  // the request's own minimum
  a = decide({.ratio = 0.0, .max_ratio = 0.5, .target = 0.01});
  EXPECT_FALSE(a.slo.target_met);
  EXPECT_EQ(a.ratio, 0.5);  // the ceiling, and the response says the target was not met
  a = decide({.ratio = 0.3, .target = 0.01});
  EXPECT_FALSE(a.slo.applied);
  EXPECT_EQ(a.ratio, 0.3);
}

TEST(BatchingPolicy, ControllerKeepsTheRunningCallsWithinTheirTargets) {
  // step = 0.01 + 0.005 * rows - 0.01 * tome_rows. A running call (2 rows, 10 calls left: 0.2 s alone) with a
  // 0.2201 s target; a newcomer's 2 rows at ratio r make shared steps 0.03 - 0.02 r, so the running call stays
  // within its target only from r = 0.4 (10 x 0.022 s = 0.22 s), although the newcomer's own loose target would
  // be met at its floor, 0.
  const FakeCost cost(0.01, 0.005, -0.01);
  const PolicyCall running = Call(0, {.calls = 10, .target = 0.2201});
  const WorkerView worker{.cost = &cost, .running = {Running(running, 10)}, .budget = 1 << 20};
  const std::vector<PolicyCall> queue = {Call(1, {.calls = 10, .ratio = 0.0, .max_ratio = 0.75, .target = 10})};
  const AdmitPlan plan = kStep.Admit(worker, queue, 0, false);
  ASSERT_EQ(plan.admit.size(), 1u);
  EXPECT_TRUE(plan.admit[0].slo.target_met);
  EXPECT_NEAR(plan.admit[0].ratio, 0.4, 1e-9);
}

TEST(BatchingPolicy, ACallThatCannotJoinIsWeighedAndAgedIn) {
  const FakeCost gpu(0.010, 0.0005);
  const WorkerView worker{.cost = &gpu, .running = {Running(Call(0, {.calls = 20}), 20)}, .budget = 1 << 20};
  // A 128-wide call waits for the 64-wide batch to drain (due 4 x its unloaded 20 x 0.022 s = 1.76 s); a
  // same-size call (due 1.0 + 4 x 0.22 = 1.88 s) may still join while that pays, but not once the blocked call
  // is past its due time.
  const std::vector<PolicyCall> queue = {Call(1, {.width = 128, .calls = 20, .enqueued = 0}),
                                         Call(2, {.calls = 20, .enqueued = 1.0})};
  EXPECT_EQ(Admitted(kStep.Admit(worker, queue, 1.2, false), queue), std::vector<uint64_t>{2});
  EXPECT_TRUE(kStep.Admit(worker, queue, 2.0, false).admit.empty());
}

TEST(BatchingPolicy, WithoutCostsCallsJoinInOrderWhileTheyFit) {
  const WorkerView worker{.running = {Running(Call(0, {}), 10)}, .max_images = 3, .budget = 1 << 20};
  const std::vector<PolicyCall> queue = {Call(1, {.enqueued = 1}), Call(2, {.images = 2, .enqueued = 2}),
                                         Call(3, {.enqueued = 3})};
  // job 2 does not fit (4 images > 3): job 3 waits behind it.
  EXPECT_EQ(Admitted(kStep.Admit(worker, queue, 5, false), queue), std::vector<uint64_t>{1});
}

TEST(BatchingPolicy, ADeadlineThatCannotBeMetIsRefused) {
  const FakeCost cost(0.0, 0.25);  // 0.5 s per 2-row step
  const WorkerView idle{.cost = &cost, .budget = 1 << 20};
  const std::vector<PolicyCall> queue = {Call(0, {.calls = 100, .deadline = 5}), Call(1, {.calls = 4, .deadline = 60})};
  const AdmitPlan plan = kStep.Admit(idle, queue, 0, false);
  EXPECT_EQ(Admitted(plan, queue), std::vector<uint64_t>{1});
  ASSERT_EQ(plan.refuse.size(), 1u);
  EXPECT_EQ(plan.refuse[0].index, 0u);
  EXPECT_NE(plan.refuse[0].why.find("refused at admission"), std::string::npos);
}

// A client's generous deadline makes a best-effort call more urgent only when it is tighter than the call's own
// best-effort due time: it does not rank the call behind a later call that set none.
TEST(BatchingPolicy, AGenerousDeadlineDoesNotRankACallBehindOnesWithout) {
  const FakeCost cost(0.0, 0.25);
  const WorkerView idle{.cost = &cost, .max_images = 1, .budget = 1 << 20};
  const std::vector<PolicyCall> queue = {Call(0, {.enqueued = 0, .deadline = 300}), Call(1, {.enqueued = 0.1})};
  EXPECT_EQ(Admitted(kStep.Admit(idle, queue, 0.2, false), queue), std::vector<uint64_t>{0});
  const std::vector<PolicyCall> tight = {Call(0, {.enqueued = 0}), Call(1, {.enqueued = 0.1, .deadline = 8})};
  EXPECT_EQ(Admitted(kStep.Admit(idle, tight, 0.2, false), tight), std::vector<uint64_t>{1});
}

TEST(BatchingPolicy, RequestModeTakesOneKeyWhenIdleAfterTheDelay) {
  const BatchingPolicy request({.mode = BatchingMode::kRequest, .max_batch_images = 3, .max_queue_delay_seconds = 1});
  const WorkerView idle{.budget = 1 << 20};
  const std::vector<PolicyCall> queue = {Call(0, {.enqueued = 0}), Call(1, {.width = 128, .enqueued = 0.1}),
                                         Call(2, {.images = 2, .enqueued = 0.2}), Call(3, {.enqueued = 0.3})};
  EXPECT_EQ(request.RequestReadyAt(queue, false), -kNever);  // 3 images of the oldest key: full
  EXPECT_EQ(Admitted(request.Admit(idle, queue, 0.5, false), queue), (std::vector<uint64_t>{0, 2}));
  const std::vector<PolicyCall> one = {queue[1]};
  EXPECT_DOUBLE_EQ(request.RequestReadyAt(one, false), 1.1);
  EXPECT_TRUE(request.Admit(idle, one, 1.0, false).admit.empty());
  EXPECT_EQ(Admitted(request.Admit(idle, one, 1.0, /*draining=*/true), one), std::vector<uint64_t>{1});
  const WorkerView busy{.running = {Running(queue[0], 5)}, .budget = 1 << 20};
  EXPECT_TRUE(request.Admit(busy, queue, 5, false).admit.empty());  // nothing joins a running batch
}

TEST(BatchingPolicy, ControllerGrid) {
  EXPECT_EQ(BatchingPolicy::ControllerGrid(0.3, 0.5), (std::vector<double>{0.3, 0.35, 0.4, 0.45, 0.5}));
  EXPECT_EQ(BatchingPolicy::ControllerGrid(0.32, 0.41), (std::vector<double>{0.32, 0.35, 0.4, 0.41}));
  EXPECT_EQ(BatchingPolicy::ControllerGrid(0.5, 0.5), (std::vector<double>{0.5}));
}

// Fair sharing between tenants: a tenant that queued 10 calls before another queued 2 does not keep the workers
// until its 10 are done; with equal weights the two alternate, with weights 3:1 three of the first's per one.
std::vector<std::string> FairOrder(const std::vector<std::pair<std::string, double>>& tenants_in_arrival_order) {
  const FakeCost cost(0.1, 0.1);
  std::vector<PolicyCall> queue;
  for (size_t i = 0; i < tenants_in_arrival_order.size(); ++i) {
    PolicyCall c = Call(i, {.enqueued = 0.001 * static_cast<double>(i)});
    c.tenant = tenants_in_arrival_order[i].first;
    c.tenant_weight = tenants_in_arrival_order[i].second;
    queue.push_back(c);
  }
  // Admit one call at a time (the urgency order's head), as a worker that runs one call at a time would.
  BatchingPolicy::FairShareState state;
  std::vector<std::string> order;
  while (!queue.empty()) {
    BatchingPolicy::AssignFairStarts(&cost, state, queue);
    size_t best = 0;
    for (size_t i = 1; i < queue.size(); ++i) {
      if (queue[i].fair_start < queue[best].fair_start) best = i;
    }
    BatchingPolicy::ChargeTenant(&cost, queue[best], state);
    order.push_back(queue[best].tenant);
    queue.erase(queue.begin() + static_cast<long>(best));
  }
  return order;
}

TEST(FairShareTest, BackloggedTenantsAreServedByWeight) {
  std::vector<std::pair<std::string, double>> arrivals(10, {"heavy", 1});
  arrivals.insert(arrivals.end(), 2, {"light", 1});
  const std::vector<std::string> order = FairOrder(arrivals);
  // Both have queued calls from the start: they alternate until the light one has none left.
  EXPECT_EQ(std::vector<std::string>(order.begin(), order.begin() + 4),
            (std::vector<std::string>{"heavy", "light", "heavy", "light"}));
  std::vector<std::pair<std::string, double>> weighted(9, {"big", 3});
  weighted.insert(weighted.end(), 3, {"small", 1});
  const std::vector<std::string> by_weight = FairOrder(weighted);
  EXPECT_EQ(std::count(by_weight.begin(), by_weight.begin() + 8, "big"), 6);
  EXPECT_EQ(std::count(by_weight.begin(), by_weight.begin() + 8, "small"), 2);
}

TEST(FairShareTest, CallsWithoutATenantWeightOrCostsAreUntouched) {
  const FakeCost cost(0.1, 0.1);
  std::vector<PolicyCall> queue = {Call(1, {.enqueued = 5}), Call(2, {.enqueued = 6})};
  queue[1].tenant = "a";
  queue[1].tenant_weight = 1;
  BatchingPolicy::AssignFairStarts(&cost, {}, queue);
  EXPECT_EQ(queue[0].fair_start, -1);  // not a tenant call: its due time counts from its arrival
  EXPECT_EQ(queue[1].fair_start, 6);   // the only tenant with queued calls: at its arrival, with all the share
  EXPECT_EQ(queue[1].fair_share, 1);
  BatchingPolicy::AssignFairStarts(nullptr, {}, queue);  // no costs yet: first come, first served
  EXPECT_EQ(queue[1].fair_start, -1);
}

TEST(FairShareTest, AFairStartMovesTheBestEffortDueTimeAndTheClockMovesOn) {
  const FakeCost cost(0.1, 0.1);  // 10 calls x (0.1 + 0.1 x 2 rows) = 3 s alone
  BatchingPolicy::FairShareState state;
  std::vector<PolicyCall> queue = {Call(1, {}), Call(2, {})};
  queue[0].tenant = "a";
  queue[1].tenant = "b";
  queue[0].tenant_weight = queue[1].tenant_weight = 1;
  BatchingPolicy::AssignFairStarts(&cost, state, queue);
  EXPECT_DOUBLE_EQ(queue[0].fair_share, 0.5);
  BatchingPolicy::ChargeTenant(&cost, queue[0], state);
  EXPECT_DOUBLE_EQ(state.finish["a"], 6.0);  // 3 s of work at half the workers
  // A's next call starts at its finish tag, after B's call at the virtual time.
  std::vector<PolicyCall> next = {Call(3, {}), queue[1]};
  next[0].tenant = "a";
  next[0].tenant_weight = 1;
  BatchingPolicy::AssignFairStarts(&cost, state, next);
  EXPECT_DOUBLE_EQ(next[0].fair_start, 6.0);
  EXPECT_DOUBLE_EQ(next[1].fair_start, 0.0);
}

// Fair preemption: a light tenant's call at its fair start does not wait behind a backlogged heavy tenant's
// running call when the batch is full: the heavy call is paused (parked) for it, and only then.
TEST(FairShareTest, ALightTenantAtItsFairStartPausesABackloggedTenantsCall) {
  const FakeCost cpu(0.0, 0.01);
  const auto tenant = [](PolicyCall c, const std::string& name) {
    c.tenant = name;
    c.tenant_weight = 1;
    c.fair_start = c.enqueued;
    return c;
  };
  const PolicyCall heavy_running = tenant(Call(0, {.calls = 50}), "heavy");
  const WorkerView full{.cost = &cpu, .running = {Running(heavy_running, 40)}, .max_images = 1, .budget = 1 << 20};
  const std::vector<PolicyCall> queue = {tenant(Call(1, {.calls = 50}), "heavy"),
                                         tenant(Call(2, {.calls = 10, .enqueued = 1}), "light")};
  std::vector<PolicyCall> light_first = queue;
  light_first[0].fair_start = 5;  // heavy's next call waits for its share; light's is due now
  const AdmitPlan plan = kStep.Admit(full, light_first, 1, false);
  EXPECT_EQ(Admitted(plan, light_first), std::vector<uint64_t>{2});
  ASSERT_EQ(plan.pause.size(), 1u);
  EXPECT_EQ(plan.pause[0].running_id, 0u);
  EXPECT_EQ(plan.pause[0].for_index, 1u);

  // The paused call holds no rows: the worker reports it paused, and nothing pauses back (the heavy tenant
  // has a call here, paused).
  WorkerView after = full;
  after.running[0].paused = true;
  after.running.push_back(Running(light_first[1], 10));
  const std::vector<PolicyCall> heavy_next = {light_first[0]};
  const AdmitPlan none = kStep.Admit(after, heavy_next, 6, false);
  EXPECT_TRUE(none.pause.empty());
  EXPECT_TRUE(none.admit.empty());
  EXPECT_EQ(kStep.PickBatch(after), 1u);  // the light call's batch steps

  // Not before the light call's fair start (a tenant calling back to back gets its share, not the worker).
  std::vector<PolicyCall> early = light_first;
  early[1].fair_start = 3;
  EXPECT_TRUE(kStep.Admit(full, early, 1, false).pause.empty());
  // Not when the heavy tenant has nothing queued (not backlogged), nor a call with a target.
  const std::vector<PolicyCall> light_only = {light_first[1]};
  EXPECT_TRUE(kStep.Admit(full, light_only, 1, false).pause.empty());
  WorkerView promised = full;
  promised.running[0].call.target_seconds = 100;
  EXPECT_TRUE(kStep.Admit(promised, light_first, 1, false).pause.empty());
  // A deadline: paused only when it survives the pause (1 + 0.2 s of the light call + 40 x 0.02 s left = 2 s).
  WorkerView tight = full, loose = full;
  tight.running[0].call.deadline = 1.9;
  loose.running[0].call.deadline = 2.1;
  EXPECT_TRUE(kStep.Admit(tight, light_first, 1, false).pause.empty());
  EXPECT_EQ(kStep.Admit(loose, light_first, 1, false).pause.size(), 1u);
  // Not without tenants (no fair sharing).
  std::vector<PolicyCall> anonymous = light_first;
  for (PolicyCall& c : anonymous) c.tenant_weight = 0;
  WorkerView anon_worker = full;
  anon_worker.running[0].call.tenant_weight = 0;
  EXPECT_TRUE(kStep.Admit(anon_worker, anonymous, 1, false).pause.empty());
}

}  // namespace
}  // namespace tomeserve::server
