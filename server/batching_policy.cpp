#include "server/batching_policy.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"

namespace tomeserve::server {
namespace {

// Projected times within this of a limit meet it (sums of step times are not exact).
constexpr double kSlackEpsilon = 1e-9;

// A call in a projection: its rows at its ratio, UNet calls left, its due time (the urgency order), when it
// must end (kNever: no limit), and its lane (the running batch of its model and size).
struct Member {
  const PolicyCall* call;
  double ratio;
  int calls_left;
  double due;
  double limit;
  int lane;
};

// When a call must end to count as on time: its latency target or its hard deadline, the earlier.
double Limit(const PolicyCall& c) {
  const double target = c.target_seconds > 0 ? c.enqueued + c.target_seconds : kNever;
  return std::min(target, c.deadline);
}

// The outcome of one option: finish times (seconds) per member, in member order, and when each lane drains.
struct Outcome {
  std::vector<double> finish;
  std::vector<double> lane_drain;  // by lane; `now` for a lane without members
};

// Missed limits first, then total latency: the option with the smaller pair wins.
struct Score {
  int misses = 0;
  double latency = 0;
  bool operator<=(const Score& o) const {
    return misses < o.misses || (misses == o.misses && latency <= o.latency + 1e-12);
  }
};

class Projector {
 public:
  Projector(const StepCost& cost, int lanes) : cost_(cost), lanes_(lanes) {}

  // Finish times of `members` from `now`, as the worker runs them: the lane holding the most urgent call steps
  // (PickBatch), so lanes run one after the other, most urgent first (their order fixed at `now`); within a
  // lane every step costs cost(its rows, its tome rows) over the members still in it, and a member leaves after
  // its last call and its fixed costs. nullopt: no cost known.
  std::optional<Outcome> Shared(const std::vector<Member>& members, double now) const {
    Outcome out{.finish = std::vector<double>(members.size(), now), .lane_drain = std::vector<double>(lanes_, now)};
    std::vector<double> lane_due(lanes_, kNever);
    for (const Member& m : members) lane_due[m.lane] = std::min(lane_due[m.lane], m.due);
    std::vector<int> lane_order(lanes_);
    std::iota(lane_order.begin(), lane_order.end(), 0);
    std::stable_sort(lane_order.begin(), lane_order.end(), [&](int a, int b) { return lane_due[a] < lane_due[b]; });
    double t = now;
    for (int lane : lane_order) {
      std::vector<size_t> order;
      int rows = 0;
      double tome_rows = 0;
      for (size_t i = 0; i < members.size(); ++i) {
        if (members[i].lane != lane) continue;
        order.push_back(i);
        rows += members[i].call->rows;
        tome_rows += members[i].call->rows * members[i].ratio;
      }
      if (order.empty()) continue;
      std::stable_sort(order.begin(), order.end(),
                       [&](size_t a, size_t b) { return members[a].calls_left < members[b].calls_left; });
      const PolicyCall& shape = *members[order.front()].call;
      int done = 0;
      for (size_t k : order) {
        const Member& m = members[k];
        if (m.calls_left > done) {
          std::optional<double> step = cost_.StepSeconds(shape.model, shape.latent_pixels, rows, tome_rows);
          if (!step) return std::nullopt;
          t += (m.calls_left - done) * *step;
          done = m.calls_left;
        }
        out.finish[k] = t + cost_.FixedSeconds(m.call->model, m.call->latent_pixels, m.call->images);
        out.lane_drain[lane] = std::max(out.lane_drain[lane], out.finish[k]);
        rows -= m.call->rows;
        tome_rows -= m.call->rows * m.ratio;
      }
      t = out.lane_drain[lane];  // fixed costs run on the worker's thread too
    }
    return out;
  }

 private:
  const StepCost& cost_;
  const int lanes_;
};

bool SameBatch(const PolicyCall& a, const PolicyCall& b) {
  return a.model == b.model && a.width == b.width && a.height == b.height;
}

}  // namespace

std::string_view BatchingModeName(BatchingMode mode) {
  return mode == BatchingMode::kStep ? "step" : "request";
}

std::vector<double> BatchingPolicy::ControllerGrid(double min_ratio, double max_ratio) {
  std::vector<double> grid{min_ratio};
  // Grid points as exact two-decimal values (k * 5 / 100), so labels and int(N * ratio) are stable.
  for (int k = static_cast<int>(std::floor(min_ratio * 20.0 + 1e-9)) + 1; k * 0.05 < max_ratio - 1e-9; ++k) {
    grid.push_back(static_cast<double>(k * 5) / 100.0);
  }
  if (max_ratio > min_ratio) grid.push_back(max_ratio);
  return grid;
}

std::optional<double> BatchingPolicy::SoloSeconds(const StepCost* cost, const PolicyCall& call, double ratio) {
  if (cost == nullptr) return std::nullopt;
  std::optional<double> step = cost->StepSeconds(call.model, call.latent_pixels, call.rows, call.rows * ratio);
  if (!step) return std::nullopt;
  return call.unet_calls * *step + cost->FixedSeconds(call.model, call.latent_pixels, call.images);
}

double BatchingPolicy::DueTime(const StepCost* cost, const PolicyCall& call) {
  // A latency target is the call's promise: its due time (or the deadline, if earlier).
  if (call.target_seconds > 0) return Limit(call);
  // Best effort: a slack of its solo time after it arrived (or after its tenant's fair start); a deadline only
  // makes it more urgent when it is tighter than that (a generous client deadline must not rank a call behind
  // calls without one).
  std::optional<double> solo = SoloSeconds(cost, call, call.ratio);
  if (!solo) return std::min(call.enqueued, call.deadline);  // no costs yet: first come, first served
  const double start = call.fair_start >= 0 ? call.fair_start : call.enqueued;
  return std::min(call.deadline, start + kBestEffortSlack[static_cast<int>(call.priority)] * *solo);
}

void BatchingPolicy::AssignFairStarts(const StepCost* cost, const FairShareState& state,
                                      std::span<PolicyCall> queue) {
  std::map<std::string, double> weights;  // of the tenants with queued calls
  double oldest = kNever;
  for (const PolicyCall& c : queue) {
    if (c.tenant_weight <= 0) continue;
    weights[c.tenant] = c.tenant_weight;
    oldest = std::min(oldest, c.enqueued);
  }
  double total = 0;
  for (const auto& [tenant, weight] : weights) total += weight;
  // Virtual time, caught up with the queue after an idle spell (never with the clock: a clock ahead of the tags
  // would tie every tenant at "now" and fall back to arrival order).
  const double base = std::max(state.virtual_time, oldest);
  std::map<std::string, double> next;  // per tenant: the fair start of its next queued call
  for (PolicyCall& c : queue) {
    c.fair_start = -1;
    c.fair_share = 0;
    if (c.tenant_weight <= 0) continue;
    std::optional<double> solo = SoloSeconds(cost, c, c.ratio);
    if (!solo) continue;
    auto [it, first] = next.try_emplace(c.tenant, base);
    if (first) {
      auto finish = state.finish.find(c.tenant);
      if (finish != state.finish.end()) it->second = std::max(base, finish->second);
    }
    c.fair_share = weights[c.tenant] / total;
    c.fair_start = it->second;
    it->second += *solo / c.fair_share;
  }
}

void BatchingPolicy::ChargeTenant(const StepCost* cost, const PolicyCall& call, FairShareState& state) {
  if (call.tenant_weight <= 0 || call.fair_share <= 0 || call.fair_start < 0) return;
  std::optional<double> solo = SoloSeconds(cost, call, call.ratio);
  if (!solo) return;
  double& finish = state.finish.try_emplace(call.tenant, call.fair_start).first->second;
  finish = std::max(finish, call.fair_start) + *solo / call.fair_share;
  state.virtual_time = std::max(state.virtual_time, call.fair_start);
}

AdmitPlan BatchingPolicy::Admit(const WorkerView& worker, std::span<const PolicyCall> queue, double now,
                                bool draining) const {
  if (queue.empty()) return {};
  return options_.mode == BatchingMode::kStep ? AdmitStep(worker, queue, now)
                                              : AdmitRequest(worker, queue, now, draining);
}

namespace {

// One candidate's evaluation against a batch: the ratio to run at and what joining now projects.
struct JoinEval {
  double ratio = 0;
  SloDecision slo;
  std::optional<Outcome> joined;  // members + candidate (last); nullopt: no cost
};

// The controller: the smallest grid ratio at which the candidate meets its target and no member that met its
// limit in `base` misses it; none: the ceiling. Calls without a range keep their ratio.
JoinEval ChooseRatio(const Projector& proj, std::vector<Member> members, const std::optional<Outcome>& base,
                     const PolicyCall& c, double due, int lane, double now) {
  JoinEval e{.ratio = c.ratio};
  members.push_back({&c, c.ratio, c.unet_calls, due, Limit(c), lane});
  if (!c.has_range()) {
    e.joined = proj.Shared(members, now);
    return e;
  }
  e.slo.applied = true;
  e.slo.target_seconds = c.target_seconds;
  const std::vector<double> grid = BatchingPolicy::ControllerGrid(c.ratio, c.max_ratio);
  for (double ratio : grid) {
    members.back().ratio = ratio;
    std::optional<Outcome> out = proj.Shared(members, now);
    if (!out) return e;  // no cost yet: keep the request's ratio, no prediction
    e.ratio = ratio;
    e.joined = out;
    e.slo.predicted_seconds = out->finish.back() - c.enqueued;
    bool ok = out->finish.back() <= c.enqueued + c.target_seconds + kSlackEpsilon;
    for (size_t i = 0; ok && i + 1 < members.size(); ++i) {
      const bool met_before = base && base->finish[i] <= members[i].limit + kSlackEpsilon;
      ok = !met_before || out->finish[i] <= members[i].limit + kSlackEpsilon;
    }
    if (ok) {
      e.slo.target_met = true;
      return e;
    }
  }
  return e;  // the ceiling, target_met false
}

Score ScoreOf(const std::vector<Member>& members, const std::vector<double>& finish) {
  Score s;
  for (size_t i = 0; i < members.size(); ++i) {
    if (finish[i] > members[i].limit + kSlackEpsilon) ++s.misses;
    s.latency += finish[i] - members[i].call->enqueued;
  }
  return s;
}

std::string DeadlineMessage(double left, int calls, double until) {
  return absl::StrFormat(
      "refused at admission: predicted to need %.3f s more (%d UNet calls) but the call's deadline is in %.3f s",
      left, calls, until);
}

}  // namespace

AdmitPlan BatchingPolicy::AdmitStep(const WorkerView& worker, std::span<const PolicyCall> queue, double now) const {
  AdmitPlan plan;
  // Urgency order: earliest due first; ties by priority, then arrival.
  std::vector<size_t> order(queue.size());
  std::vector<double> due(queue.size());
  const StepCost* const cost_model = worker.cost;
  for (size_t i = 0; i < queue.size(); ++i) due[i] = DueTime(cost_model, queue[i]);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (due[a] != due[b]) return due[a] < due[b];
    if (queue[a].priority != queue[b].priority) return queue[a].priority < queue[b].priority;
    return queue[a].enqueued < queue[b].enqueued;
  });
  // Without costs a second batch cannot be judged: one at a time.
  const int max_lanes = cost_model == nullptr ? 1 : std::max(1, worker.max_batches);

  // Lanes: one per model and size, in order of first appearance, with their images and cost.
  std::vector<const PolicyCall*> lane_shape;
  std::vector<int> lane_images;
  std::vector<int64_t> lane_cost;
  auto lane_of = [&](const PolicyCall& c) {
    for (size_t l = 0; l < lane_shape.size(); ++l) {
      if (SameBatch(c, *lane_shape[l])) return static_cast<int>(l);
    }
    return -1;
  };
  std::vector<Member> members;
  auto add = [&](const PolicyCall& c, double ratio, int calls_left, double call_due) {
    int lane = lane_of(c);
    if (lane < 0) {
      lane = static_cast<int>(lane_shape.size());
      lane_shape.push_back(&c);
      lane_images.push_back(0);
      lane_cost.push_back(0);
    }
    members.push_back({&c, ratio, calls_left, call_due, Limit(c), lane});
    lane_images[lane] += c.images;
    lane_cost[lane] += c.cost();
  };
  // Fair preemption (see the header): room for the most urgent call, taken from backlogged tenants' calls.
  std::vector<bool> paused(worker.running.size(), false);
  for (size_t i = 0; i < worker.running.size(); ++i) paused[i] = worker.running[i].paused;
  std::optional<size_t> preempting;
  // The candidate: the most urgent queued call at its fair start (a tenant calling back to back gets its share,
  // not the whole worker) whose tenant has nothing here, paused calls included (no pausing back and forth).
  // Calls ahead of it are of tenants already running here: they wait for room anyway.
  const auto tenant_runs = [&](const std::string& tenant) {
    return std::any_of(worker.running.begin(), worker.running.end(),
                       [&](const RunningCall& r) { return r.call.tenant == tenant; });
  };
  const auto candidate = std::find_if(order.begin(), order.end(), [&](size_t i) {
    const PolicyCall& q = queue[i];
    return q.tenant_weight > 0 && q.fair_start >= 0 && q.fair_start <= now && !tenant_runs(q.tenant);
  });
  if (candidate != order.end()) {
    const PolicyCall& c = queue[*candidate];
    std::vector<size_t> lane;  // c's batch's running calls, admission order
    int images = 0;
    int64_t cost = 0;
    for (size_t i = 0; i < worker.running.size(); ++i) {
      if (paused[i] || !SameBatch(worker.running[i].call, c)) continue;
      lane.push_back(i);
      images += worker.running[i].call.images;
      cost += worker.running[i].call.cost();
    }
    const auto fits = [&] { return images + c.images <= worker.max_images && cost + c.cost() <= worker.budget; };
    // Backlogged: the tenant has calls queued, and all of them after c in fair-start order (c is the call
    // start-time fair queueing would start next anyway; pausing only moves that start to this step boundary).
    const auto backlogged = [&](const std::string& tenant) {
      bool queued = false;
      for (const PolicyCall& q : queue) {
        if (q.tenant != tenant) continue;
        if (q.fair_start >= 0 && q.fair_start < c.fair_start) return false;
        queued = true;
      }
      return queued;
    };
    if (!lane.empty() && !fits()) {
      std::vector<size_t> chosen;
      // A deadline (a client's cancel time; gRPC clients nearly always set one) must survive the pause: the
      // call's remaining work after the candidate's whole call.
      const std::optional<double> pause_for = SoloSeconds(cost_model, c, c.ratio);
      const auto deadline_at_risk = [&](const RunningCall& r) {
        if (r.call.deadline == kNever) return false;
        const std::optional<double> solo = SoloSeconds(cost_model, r.call, r.ratio);
        if (!pause_for || !solo) return true;
        const double left = *solo * r.calls_left / std::max(1, r.call.unet_calls);
        return now + *pause_for + left > r.call.deadline;
      };
      for (auto it = lane.rbegin(); it != lane.rend() && !fits(); ++it) {
        const PolicyCall& r = worker.running[*it].call;
        if (r.tenant_weight <= 0 || r.target_seconds > 0 || deadline_at_risk(worker.running[*it]) ||
            !backlogged(r.tenant)) {
          continue;
        }
        chosen.push_back(*it);
        images -= r.images;
        cost -= r.cost();
      }
      if (fits()) {
        preempting = *candidate;
        for (size_t i : chosen) {
          paused[i] = true;
          plan.pause.push_back({.running_id = worker.running[i].call.id, .for_index = *preempting});
        }
        // It starts first: the room is its.
        order.erase(candidate);
        order.insert(order.begin(), *preempting);
      }
    }
  }
  for (size_t i = 0; i < worker.running.size(); ++i) {
    if (paused[i]) continue;
    const RunningCall& r = worker.running[i];
    add(r.call, r.ratio, r.calls_left, DueTime(cost_model, r.call));
  }

  const PolicyCall* blocked = nullptr;  // the most urgent call that cannot start now
  int blocked_lane = -1;                // its lane, if it has one (else it waits for the first lane to drain)
  for (size_t idx : order) {
    const PolicyCall& c = queue[idx];
    const int lane = lane_of(c);
    const bool fits = lane >= 0 ? lane_images[lane] + c.images <= worker.max_images &&
                                      lane_cost[lane] + c.cost() <= worker.budget
                                : static_cast<int>(lane_shape.size()) < max_lanes;
    if (!members.empty() && !fits) {
      // Without costs nothing can judge a detour: later calls wait behind this one.
      if (cost_model == nullptr) break;
      if (blocked == nullptr) {
        blocked = &c;
        blocked_lane = lane;
      }
      continue;
    }
    // The age bound: once the blocked call is overdue, nothing more starts; the worker drains for it.
    if (blocked != nullptr && now > due[static_cast<size_t>(blocked - queue.data())]) break;
    const int candidate_lane = lane >= 0 ? lane : static_cast<int>(lane_shape.size());
    const int lanes = static_cast<int>(lane_shape.size()) + (lane >= 0 ? 0 : 1);
    std::optional<double> decision_ratio;
    JoinEval e;
    if (cost_model == nullptr) {
      e.ratio = c.ratio;
      decision_ratio = c.ratio;  // no costs: join while it fits
    } else {
      const Projector proj(*cost_model, lanes);
      const std::optional<Outcome> base = proj.Shared(members, now);
      e = ChooseRatio(proj, members, base, c, due[idx], candidate_lane, now);
      if (members.empty() || !e.joined || !base) {
        decision_ratio = e.ratio;  // an idle worker starts the most urgent call; no cost: join
      } else {
        // Start now vs wait (for its batch to drain, or for every batch to drain when it has none), over the
        // running calls, the candidate and the blocked call.
        std::vector<Member> all = members;
        all.push_back({&c, e.ratio, c.unet_calls, due[idx], Limit(c), candidate_lane});
        std::vector<double> join_finish = e.joined->finish;
        std::vector<double> wait_finish = base->finish;
        const double all_drained = *std::max_element(base->lane_drain.begin(), base->lane_drain.end());
        const double wait_start = lane >= 0 ? base->lane_drain[lane] : all_drained;
        const std::optional<double> solo = SoloSeconds(cost_model, c, c.ceiling_ratio());
        wait_finish.push_back(wait_start + solo.value_or(0));
        if (blocked != nullptr) {
          if (std::optional<double> b = SoloSeconds(cost_model, *blocked, blocked->ceiling_ratio())) {
            all.push_back({blocked, blocked->ratio, blocked->unet_calls, 0, Limit(*blocked), 0});
            auto start_of = [&](const Outcome& o) {
              return blocked_lane >= 0 && blocked_lane < static_cast<int>(o.lane_drain.size())
                         ? o.lane_drain[blocked_lane]
                         : *std::max_element(o.lane_drain.begin(), o.lane_drain.end());
            };
            join_finish.push_back(start_of(*e.joined) + *b);
            wait_finish.push_back(start_of(*base) + *b);
          }
        }
        if (ScoreOf(all, join_finish) <= ScoreOf(all, wait_finish)) decision_ratio = e.ratio;
      }
    }
    if (!decision_ratio) {
      if (blocked == nullptr) {
        blocked = &c;
        blocked_lane = lane;
      }
      continue;
    }
    if (c.deadline != kNever && e.joined && e.joined->finish.back() > c.deadline) {
      plan.refuse.push_back({idx, DeadlineMessage(e.joined->finish.back() - now, c.unet_calls, c.deadline - now)});
      continue;
    }
    plan.admit.push_back({idx, *decision_ratio, e.slo});
    add(c, *decision_ratio, c.unet_calls, due[idx]);
  }
  // Pauses only ever make room for an admitted call.
  if (preempting && std::none_of(plan.admit.begin(), plan.admit.end(),
                                 [&](const Admission& a) { return a.index == *preempting; })) {
    plan.pause.clear();
  }
  return plan;
}

size_t BatchingPolicy::PickBatch(const WorkerView& worker) const {
  std::optional<size_t> best;
  double best_due = kNever;
  for (size_t i = 0; i < worker.running.size(); ++i) {
    if (worker.running[i].paused) continue;  // holds no rows
    const double d = DueTime(worker.cost, worker.running[i].call);
    if (!best || d < best_due) {
      best = i;
      best_due = d;
    }
  }
  return best.value_or(0);
}

double BatchingPolicy::RequestReadyAt(std::span<const PolicyCall> queue, bool draining) const {
  if (options_.mode != BatchingMode::kRequest || queue.empty()) return kNever;
  if (draining) return -kNever;
  const PolicyCall* oldest = &queue[0];
  for (const PolicyCall& c : queue) {
    if (c.enqueued < oldest->enqueued) oldest = &c;
  }
  int images = 0;
  for (const PolicyCall& c : queue) {
    if (c.batch_key != oldest->batch_key) continue;
    images += c.images;
    if (images >= options_.max_batch_images) return -kNever;
  }
  return oldest->enqueued + options_.max_queue_delay_seconds;
}

AdmitPlan BatchingPolicy::AdmitRequest(const WorkerView& worker, std::span<const PolicyCall> queue, double now,
                                       bool draining) const {
  AdmitPlan plan;
  if (!worker.idle() || now < RequestReadyAt(queue, draining)) return plan;
  std::vector<size_t> order(queue.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return queue[a].enqueued < queue[b].enqueued; });
  const uint64_t key = queue[order[0]].batch_key;
  std::vector<Member> members;
  int images = 0;
  for (size_t idx : order) {
    const PolicyCall& c = queue[idx];
    if (c.batch_key != key || (!members.empty() && images + c.images > options_.max_batch_images)) continue;
    JoinEval e{.ratio = c.ratio};
    if (worker.cost != nullptr) {
      const Projector proj(*worker.cost, 1);
      e = ChooseRatio(proj, members, proj.Shared(members, now), c, 0, 0, now);
    }
    if (c.deadline != kNever && e.joined && e.joined->finish.back() > c.deadline) {
      plan.refuse.push_back({idx, DeadlineMessage(e.joined->finish.back() - now, c.unet_calls, c.deadline - now)});
      continue;
    }
    plan.admit.push_back({idx, e.ratio, e.slo});
    members.push_back({&c, e.ratio, c.unet_calls, 0, Limit(c), 0});
    images += c.images;
  }
  return plan;
}

}  // namespace tomeserve::server
