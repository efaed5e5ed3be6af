#include "server/batching_policy.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"

namespace tomeserve::server {
namespace {

// Projected times within this of a limit meet it (sums of step times are not exact).
constexpr double kSlackEpsilon = 1e-9;

// A call in a projection: its rows at its ratio, UNet calls left, and when it must end (kNever: no limit).
struct Member {
  const PolicyCall* call;
  double ratio;
  int calls_left;
  double limit;
};

// When a call must end to count as on time: its latency target or its hard deadline, the earlier.
double Limit(const PolicyCall& c) {
  const double target = c.target_seconds > 0 ? c.enqueued + c.target_seconds : kNever;
  return std::min(target, c.deadline);
}

// The outcome of one option: finish times (seconds) per member, in member order.
struct Outcome {
  std::vector<double> finish;
  double drain = 0;  // when the batch's last member ends
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
  Projector(const StepCost& cost, const PolicyCall& shape)
      : cost_(cost), model_(shape.model), pixels_(shape.latent_pixels) {}

  // Finish times of `members` sharing one batch from `now`: the batch steps at cost(rows, tome rows) of the
  // members still running; a member leaves after its last call. nullopt: no cost known.
  std::optional<Outcome> Shared(const std::vector<Member>& members, double now) const {
    std::vector<size_t> order(members.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return members[a].calls_left < members[b].calls_left; });
    int rows = 0;
    double tome_rows = 0;
    for (const Member& m : members) {
      rows += m.call->rows;
      tome_rows += m.call->rows * m.ratio;
    }
    Outcome out{.finish = std::vector<double>(members.size(), now), .drain = now};
    double t = now;
    int done = 0;
    for (size_t k : order) {
      const Member& m = members[k];
      if (m.calls_left > done) {
        std::optional<double> step = cost_.StepSeconds(model_, pixels_, rows, tome_rows);
        if (!step) return std::nullopt;
        t += (m.calls_left - done) * *step;
        done = m.calls_left;
      }
      out.finish[k] = t + cost_.FixedSeconds(model_, pixels_, m.call->images);
      out.drain = std::max(out.drain, out.finish[k]);
      rows -= m.call->rows;
      tome_rows -= m.call->rows * m.ratio;
    }
    return out;
  }

 private:
  const StepCost& cost_;
  const std::string& model_;
  const int64_t pixels_;
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
  const double limit = Limit(call);
  if (limit != kNever) return limit;
  std::optional<double> solo = SoloSeconds(cost, call, call.ratio);
  if (!solo) return call.enqueued;  // no costs yet: first come, first served
  return call.enqueued + kBestEffortSlack[static_cast<int>(call.priority)] * *solo;
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
                     const PolicyCall& c, double now) {
  JoinEval e{.ratio = c.ratio};
  members.push_back({&c, c.ratio, c.unet_calls, Limit(c)});
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

  std::vector<Member> members;
  const PolicyCall* shape = nullptr;  // the batch's model and size
  int images = 0;
  int64_t cost = 0;
  for (const RunningCall& r : worker.running) {
    members.push_back({&r.call, r.ratio, r.calls_left, Limit(r.call)});
    shape = &r.call;
    images += r.call.images;
    cost += r.call.cost();
  }
  const PolicyCall* blocked = nullptr;  // the most urgent call that cannot join: it starts when the batch drains

  for (size_t idx : order) {
    const PolicyCall& c = queue[idx];
    const bool empty = members.empty();
    const bool fits = images + c.images <= worker.max_images && cost + c.cost() <= worker.budget;
    if (!empty && (!SameBatch(c, *shape) || !fits)) {
      // Without costs nothing can judge a detour: later calls wait behind this one (the batch drains for it).
      if (cost_model == nullptr) break;
      if (blocked == nullptr) blocked = &c;
      continue;
    }
    // The age bound: once the blocked call is overdue, nothing more joins; the batch drains for it.
    if (blocked != nullptr && now > due[static_cast<size_t>(blocked - queue.data())]) break;
    std::optional<double> decision_ratio;
    JoinEval e;
    if (cost_model == nullptr) {
      e.ratio = c.ratio;
      decision_ratio = c.ratio;  // no costs: join while it fits
    } else {
      const Projector proj(*cost_model, c);
      const std::optional<Outcome> base = proj.Shared(members, now);
      e = ChooseRatio(proj, members, base, c, now);
      if (empty || !e.joined || !base) {
        decision_ratio = e.ratio;  // an idle worker starts the most urgent call; no cost: join
      } else {
        // Join now vs wait for the drain, over the members, the candidate and the blocked call.
        std::vector<Member> all = members;
        all.push_back({&c, e.ratio, c.unet_calls, Limit(c)});
        std::vector<double> join_finish = e.joined->finish;
        std::vector<double> wait_finish = base->finish;
        const double wait_ratio = c.has_range() ? c.max_ratio : c.ratio;
        const std::optional<double> solo = SoloSeconds(cost_model, c, wait_ratio);
        wait_finish.push_back(base->drain + solo.value_or(0));
        if (blocked != nullptr) {
          const double blocked_ratio = blocked->has_range() ? blocked->max_ratio : blocked->ratio;
          if (std::optional<double> b = SoloSeconds(cost_model, *blocked, blocked_ratio)) {
            all.push_back({blocked, blocked->ratio, blocked->unet_calls, Limit(*blocked)});
            join_finish.push_back(e.joined->drain + *b);
            wait_finish.push_back(base->drain + *b);
          }
        }
        if (ScoreOf(all, join_finish) <= ScoreOf(all, wait_finish)) decision_ratio = e.ratio;
      }
    }
    if (!decision_ratio) {
      if (blocked == nullptr) blocked = &c;
      continue;
    }
    if (c.deadline != kNever && e.joined && e.joined->finish.back() > c.deadline) {
      plan.refuse.push_back({idx, DeadlineMessage(e.joined->finish.back() - now, c.unet_calls, c.deadline - now)});
      continue;
    }
    plan.admit.push_back({idx, *decision_ratio, e.slo});
    members.push_back({&c, *decision_ratio, c.unet_calls, Limit(c)});
    shape = &c;
    images += c.images;
    cost += c.cost();
  }
  return plan;
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
      const Projector proj(*worker.cost, c);
      e = ChooseRatio(proj, members, proj.Shared(members, now), c, now);
    }
    if (c.deadline != kNever && e.joined && e.joined->finish.back() > c.deadline) {
      plan.refuse.push_back({idx, DeadlineMessage(e.joined->finish.back() - now, c.unet_calls, c.deadline - now)});
      continue;
    }
    plan.admit.push_back({idx, e.ratio, e.slo});
    members.push_back({&c, e.ratio, c.unet_calls, Limit(c)});
    images += c.images;
  }
  return plan;
}

}  // namespace tomeserve::server
