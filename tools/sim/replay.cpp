#include "tools/sim/replay.h"

#include <algorithm>
#include <fstream>
#include <memory>
#include <numeric>

#include <nlohmann/json.hpp>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pipeline/unet_calls.h"
#include "server/step_time_model.h"

namespace tomeserve::sim {
namespace {

// The trace's scheduler names (tomeserve-gen's --scheduler names).
constexpr std::pair<const char*, pipeline::SchedulerKind> kSchedulers[] = {
    {"pndm", pipeline::SchedulerKind::kPndm},
    {"ddim", pipeline::SchedulerKind::kDdim},
    {"euler", pipeline::SchedulerKind::kEuler},
    {"euler_a", pipeline::SchedulerKind::kEulerAncestral},
    {"dpmpp_2m", pipeline::SchedulerKind::kDpmpp2m},
    {"dpmpp_2m_karras", pipeline::SchedulerKind::kDpmpp2mKarras}};

const pipeline::SchedulerKind* KindOf(const std::string& name) {
  for (const auto& [n, kind] : kSchedulers) {
    if (name == n) return &kind;
  }
  return nullptr;
}
constexpr const char* kModel = "sim";  // one model per trace

int64_t LatentPixels(const TraceCall& c) { return static_cast<int64_t>(c.width / 8) * (c.height / 8); }
int Rows(const TraceCall& c) { return c.num_images * (c.guidance > 1.0 ? 2 : 1); }
// PNDM's PLMS warm-up adds one UNet call (as the server counts a queued call).
int UNetCalls(const TraceCall& c) { return pipeline::UNetCallsPerSample(*KindOf(c.scheduler), c.steps); }

server::PolicyCall ToPolicyCall(const TraceCall& c, size_t index, double arrival, double target, double max_ratio) {
  return {.id = index,
          .batch_key = absl::HashOf(c.width, c.height, c.steps, c.scheduler, c.ratio),
          .model = kModel,
          .width = c.width,
          .height = c.height,
          .latent_pixels = LatentPixels(c),
          .images = c.num_images,
          .rows = Rows(c),
          .unet_calls = UNetCalls(c),
          .ratio = c.ratio,
          .max_ratio = max_ratio,
          .target_seconds = target,
          .enqueued = arrival};
}

}  // namespace

absl::StatusOr<std::vector<TraceCall>> ReadTrace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--trace ", path, ": cannot open"));
  std::vector<TraceCall> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = absl::StrCat(path, ":", n, ": ");
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(where + "not a JSON object");
    TraceCall c;
    try {
      c.t = j.at("t").get<double>();
      c.width = j.at("width").get<int>();
      c.height = j.at("height").get<int>();
      c.steps = j.at("steps").get<int>();
      c.scheduler = j.at("scheduler").get<std::string>();
      c.guidance = j.at("guidance").get<double>();
      c.num_images = j.at("num_images").get<int>();
      c.ratio = j.at("ratio").get<double>();
      c.seed = j.at("seed").get<uint64_t>();
      c.prompt = j.at("prompt").get<std::string>();
      if (j.contains("max_ratio") && !j["max_ratio"].is_null()) c.max_ratio = j["max_ratio"].get<double>();
      if (j.contains("slo_x") && !j["slo_x"].is_null()) c.slo_x = j["slo_x"].get<double>();
    } catch (const nlohmann::json::exception& e) {
      return absl::InvalidArgumentError(where + e.what());
    }
    if (!(c.t >= 0)) return absl::InvalidArgumentError(absl::StrCat(where, "t is ", c.t, "; allowed: >= 0"));
    if (c.width < 8 || c.height < 8 || c.width % 8 != 0 || c.height % 8 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "width x height is ", c.width, "x", c.height, "; allowed: multiples of 8"));
    }
    if (c.steps < 1) return absl::InvalidArgumentError(absl::StrCat(where, "steps is ", c.steps, "; allowed: >= 1"));
    if (c.num_images < 1) {
      return absl::InvalidArgumentError(absl::StrCat(where, "num_images is ", c.num_images, "; allowed: >= 1"));
    }
    if (!(c.ratio >= 0 && c.ratio < 1)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "ratio is ", c.ratio, "; allowed: [0, 1)"));
    }
    if (c.max_ratio && !(*c.max_ratio >= 0 && *c.max_ratio < 1)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "max_ratio is ", *c.max_ratio, "; allowed: [0, 1)"));
    }
    if (c.slo_x && !(*c.slo_x > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "slo_x is ", *c.slo_x, "; allowed: > 0"));
    }
    if (KindOf(c.scheduler) == nullptr) {
      std::vector<std::string> names;
      for (const auto& [n, kind] : kSchedulers) names.push_back(n);
      return absl::InvalidArgumentError(absl::StrCat(where, "scheduler is \"", c.scheduler,
                                                     "\"; allowed: ", absl::StrJoin(names, "|")));
    }
    out.push_back(std::move(c));
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--trace ", path, ": no calls"));
  return out;
}

double SoloSeconds(const TraceCall& c, double ratio, const CostProfile& profile) {
  const int rows = Rows(c);
  return profile.FixedSeconds(kModel, LatentPixels(c), c.num_images) +
         UNetCalls(c) * *profile.StepSeconds(kModel, LatentPixels(c), rows, rows * ratio);
}

ReplayResult Replay(const std::vector<TraceCall>& trace, const CostProfile& profile, const ReplayOptions& o) {
  const server::BatchingPolicy policy(o.policy);
  const int64_t budget = o.max_batch_cost > 0 ? o.max_batch_cost : profile.data().batch_cost_budget;
  ReplayResult result;
  result.calls.resize(trace.size());
  std::vector<server::PolicyCall> calls;
  for (size_t i = 0; i < trace.size(); ++i) {
    const TraceCall& c = trace[i];
    CallOutcome& out = result.calls[i];
    out.arrival = c.t * o.arrival_scale;
    out.solo_seconds = SoloSeconds(c, c.ratio, profile);
    double max_ratio = 0;
    if (o.slo && c.slo_x) {
      out.target_seconds = *c.slo_x * out.solo_seconds;
      max_ratio = c.max_ratio.value_or(c.ratio);
    }
    out.ratio = c.ratio;
    calls.push_back(ToPolicyCall(c, i, out.arrival, out.target_seconds, max_ratio));
  }
  std::vector<size_t> arrivals(trace.size());
  std::iota(arrivals.begin(), arrivals.end(), 0);
  std::stable_sort(arrivals.begin(), arrivals.end(),
                   [&](size_t a, size_t b) { return result.calls[a].arrival < result.calls[b].arrival; });

  struct Worker {
    std::unique_ptr<server::StepTimeModel> model = std::make_unique<server::StepTimeModel>();
    std::vector<server::RunningCall> running;  // admission order
    bool busy = false;
    double free_at = 0;
  };
  std::vector<Worker> workers(std::max(1, o.workers));
  const int64_t native = static_cast<int64_t>(profile.data().native_width / 8) * (profile.data().native_height / 8);
  for (Worker& w : workers) {
    // The server's warm-up: one image with CFG at the native size; its steps after the first are observed.
    for (int s = 1; s < o.warmup_steps; ++s) w.model->Observe(kModel, native, 2, 0.0, *profile.StepSeconds(kModel, native, 2, 0.0));
  }

  std::vector<size_t> queue;  // arrived, waiting (indices into calls)
  size_t next = 0;
  double now = 0;
  auto queued_calls = [&] {
    std::vector<server::PolicyCall> q;
    for (size_t i : queue) q.push_back(calls[i]);
    return q;
  };
  // One step boundary of worker `w` at `now`: admit, step, retire (server/worker.cpp's loop).
  auto boundary = [&](Worker& w) {
    double t = now;
    server::WorkerView view{.cost = w.model.get(), .running = w.running, .max_images = o.policy.max_batch_images,
                            .budget = budget, .max_batches = o.max_batches};
    const std::vector<server::PolicyCall> q = queued_calls();
    const server::AdmitPlan plan = policy.Admit(view, q, t, false);
    std::vector<size_t> taken;
    for (const server::Refusal& r : plan.refuse) {
      result.calls[queue[r.index]].refused = true;
      taken.push_back(r.index);
    }
    for (const server::Admission& a : plan.admit) {
      const size_t i = queue[a.index];
      server::PolicyCall call = calls[i];
      call.ratio = a.ratio;
      result.calls[i].ratio = a.ratio;
      t += profile.CallSeconds(call.latent_pixels);  // text encoding, on the worker thread
      w.running.push_back({.call = call, .ratio = a.ratio, .calls_left = call.unet_calls});
      taken.push_back(a.index);
    }
    std::sort(taken.begin(), taken.end());
    for (auto it = taken.rbegin(); it != taken.rend(); ++it) queue.erase(queue.begin() + static_cast<long>(*it));
    if (w.running.empty()) {
      w.busy = false;
      return;
    }
    // One step of one batch: the one the policy picks (server/worker.cpp does the same).
    view.running = w.running;
    const server::PolicyCall shape = w.running[policy.PickBatch(view)].call;
    auto in_batch = [&](const server::RunningCall& r) {
      return r.call.model == shape.model && r.call.width == shape.width && r.call.height == shape.height;
    };
    int rows = 0;
    double tome_rows = 0;
    for (const server::RunningCall& r : w.running) {
      if (!in_batch(r)) continue;
      rows += r.call.rows;
      tome_rows += r.call.rows * r.ratio;
    }
    const double dt = *profile.StepSeconds(kModel, shape.latent_pixels, rows, tome_rows);
    w.model->Observe(kModel, shape.latent_pixels, rows, tome_rows, dt);
    ++result.unet_calls;
    result.unet_rows += rows;
    t += dt;
    for (server::RunningCall& r : w.running) {
      if (in_batch(r)) --r.calls_left;
    }
    for (const server::RunningCall& r : w.running) {
      if (r.calls_left > 0) continue;
      const double image = profile.ImageSeconds(r.call.latent_pixels);
      t += r.call.images * image;  // decode and encode, on the worker thread
      CallOutcome& out = result.calls[r.call.id];
      out.completed = true;
      out.finish = t;
      w.model->ObserveFixed(kModel, r.call.latent_pixels, r.call.images,
                            profile.CallSeconds(r.call.latent_pixels) + r.call.images * image);
    }
    std::erase_if(w.running, [](const server::RunningCall& r) { return r.calls_left <= 0; });
    w.busy = true;
    w.free_at = t;
  };

  while (true) {
    double at = server::kNever;
    if (next < arrivals.size()) at = result.calls[arrivals[next]].arrival;
    for (const Worker& w : workers) {
      if (w.busy) {
        at = std::min(at, w.free_at);
      } else if (!queue.empty()) {
        const double ready = policy.RequestReadyAt(queued_calls(), false);
        at = std::min(at, std::max(now, ready == server::kNever ? now : ready));
      }
    }
    if (at == server::kNever) break;
    now = std::max(now, at);
    while (next < arrivals.size() && result.calls[arrivals[next]].arrival <= now) {
      const size_t i = arrivals[next++];
      if (static_cast<int>(queue.size()) >= o.max_queue_size) {
        result.calls[i].refused = true;  // RESOURCE_EXHAUSTED: the queue is full
      } else {
        queue.push_back(i);
      }
    }
    for (Worker& w : workers) {
      if ((w.busy && w.free_at <= now) || (!w.busy && !queue.empty())) boundary(w);
    }
  }
  return result;
}

}  // namespace tomeserve::sim
