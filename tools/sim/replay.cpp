#include "tools/sim/replay.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>

#include <nlohmann/json.hpp>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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

// The Token Merging settings of a call at `ratio` as a layout group's key: "" (the plain block) at 0, as the
// server gives such calls no hooks; one key per ratio otherwise (the server's other settings are per call and
// equal across a trace).
std::string SettingsKey(double ratio) { return ratio > 0 ? absl::StrFormat("tome ratio=%.4g", ratio) : ""; }

// The key graphs had before they were keyed by shape: the rows as DenoiseBatch laid them out then (every
// unconditional half in admission order, then every conditional one), grouped by settings in order of first
// appearance, each row named by its sample's ordinal in the group and its half.
std::string AdmissionOrderKey(const std::vector<pipeline::LayoutSample>& samples, int64_t height, int64_t width,
                              int64_t bucket) {
  struct Row {
    size_t sample;
    bool uncond;
  };
  std::vector<Row> rows;
  for (bool uncond : {true, false}) {
    for (size_t i = 0; i < samples.size(); ++i) {
      if (!uncond || samples[i].guided) rows.push_back({i, uncond});
    }
  }
  std::vector<std::string> settings;  // groups, first appearance
  std::vector<std::vector<size_t>> seen;
  std::vector<std::string> group_rows;
  for (size_t r = 0; r < rows.size(); ++r) {
    const std::string& s = samples[rows[r].sample].settings;
    size_t g = std::find(settings.begin(), settings.end(), s) - settings.begin();
    if (g == settings.size()) {
      settings.push_back(s);
      seen.emplace_back();
      group_rows.emplace_back();
    }
    auto it = std::find(seen[g].begin(), seen[g].end(), rows[r].sample);
    if (it == seen[g].end()) it = seen[g].insert(seen[g].end(), rows[r].sample);
    absl::StrAppend(&group_rows[g], r, "=", it - seen[g].begin(), rows[r].uncond ? "u," : "c,");
  }
  std::string key = absl::StrCat(height, "x", width, " rows ", rows.size(), "/", bucket);
  for (size_t g = 0; g < settings.size(); ++g) absl::StrAppend(&key, " | ", settings[g], " [", group_rows[g], "]");
  return key;
}

// One UNet call of the running calls `in_batch` selects, through `cache` as the server's UNetGraphs would run it:
// the same canonical layout, key, bucket and cache policy (pipeline/graph_layout.h).
template <typename InBatch>
void CountGraphCall(pipeline::GraphLayoutCache& cache, const std::vector<server::RunningCall>& running,
                    const InBatch& in_batch, const ReplayOptions& o, ReplayResult* result) {
  std::vector<pipeline::LayoutSample> samples;
  int64_t height = 0, width = 0;
  for (const server::RunningCall& r : running) {
    if (!in_batch(r)) continue;
    height = r.call.height / 8;
    width = r.call.width / 8;
    const bool guided = r.call.rows == 2 * r.call.images;
    for (int i = 0; i < r.call.images; ++i) samples.push_back({.settings = SettingsKey(r.ratio), .guided = guided});
  }
  const pipeline::CallLayout layout{.latent_height = height, .latent_width = width, .text_length = 77,
                                    .dtype = "Half", .groups = pipeline::CanonicalGroups(samples)};
  const int64_t rows = layout.rows();
  const int64_t bucket = pipeline::GraphRowsBucket(rows, o.graph_max_rows, o.graph_buckets);
  if (bucket == 0) {
    ++result->graphs.eager;  // more rows than the largest bucket: eager, outside the cache
    return;
  }
  const std::string key =
      o.graph_shape_keys ? pipeline::GraphLayoutKey(layout, bucket) : AdmissionOrderKey(samples, height, width, bucket);
  const pipeline::GraphLayoutCache::Action action = cache.Next(key);
  if (action == pipeline::GraphLayoutCache::Action::kCapture) cache.Captured(key);
  cache.TakeReleased();
  if (action != pipeline::GraphLayoutCache::Action::kEager) {
    result->graph_rows += rows;
    result->graph_padded_rows += bucket - rows;
  }
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
    std::unique_ptr<pipeline::GraphLayoutCache> graphs;
    std::vector<server::RunningCall> running;  // admission order
    std::map<uint64_t, uint64_t> paused_for;    // paused running call -> the call it waits for
    bool busy = false;
    double free_at = 0;
  };
  std::vector<Worker> workers(std::max(1, o.workers));
  if (o.graphs) {
    for (Worker& w : workers) w.graphs = std::make_unique<pipeline::GraphLayoutCache>(o.graph_capacity);
  }
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
    // Fair preemption: a paused call holds no rows until the call it was paused for ends (as the worker parks it).
    for (const server::Pause& p : plan.pause) {
      for (server::RunningCall& r : w.running) {
        if (r.call.id == p.running_id) {
          r.paused = true;
          w.paused_for[r.call.id] = calls[queue[p.for_index]].id;
        }
      }
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
      return !r.paused && r.call.model == shape.model && r.call.width == shape.width && r.call.height == shape.height;
    };
    int rows = 0;
    double tome_rows = 0;
    for (const server::RunningCall& r : w.running) {
      if (!in_batch(r)) continue;
      rows += r.call.rows;
      tome_rows += r.call.rows * r.ratio;
    }
    if (w.graphs != nullptr) CountGraphCall(*w.graphs, w.running, in_batch, o, &result);
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
    for (server::RunningCall& r : w.running) {
      auto it = w.paused_for.find(r.call.id);
      if (it == w.paused_for.end()) continue;
      const bool waiting = std::any_of(w.running.begin(), w.running.end(),
                                       [&](const server::RunningCall& o) { return o.call.id == it->second; });
      if (!waiting) {
        r.paused = false;
        w.paused_for.erase(it);
      }
    }
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
  for (const Worker& w : workers) {
    if (w.graphs == nullptr) continue;
    const pipeline::GraphLayoutCache::Stats& g = w.graphs->stats();
    result.graphs.replays += g.replays;
    result.graphs.captures += g.captures;
    result.graphs.eager += g.eager;
    result.graphs.layouts += g.layouts;
    result.graphs.graphs += g.graphs;
  }
  return result;
}

}  // namespace tomeserve::sim
