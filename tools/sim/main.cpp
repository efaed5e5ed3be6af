// tomeserve-sim: replays a trace against the server's BatchingPolicy on a virtual clock over a device cost
// profile, in seconds instead of a half-hour run, and measures profiles.
//   tomeserve-sim --trace FILE --profile FILE_OR_NAME (--load X | --arrival-scale S) [--slo] [scheduling flags]
//   tomeserve-sim calibrate --model DIR --devices D --out FILE [--sizes WxH,...] [--rows N,...] [--ratios R,...]
// Replay prints one JSON line (see kUsage). Usage errors print one line and exit 2; runtime errors exit 1.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "tools/cli_args.h"
#include "tools/sim/calibrate.h"
#include "tools/sim/cost_profile.h"
#include "tools/sim/replay.h"

namespace tomeserve::sim {
namespace {

constexpr char kUsage[] =
    "usage: tomeserve-sim --trace FILE --profile FILE_OR_NAME (--load X | --arrival-scale S) [--slo]\n"
    "                     [--batching step|request] [--max-batch-size N] [--max-batch-cost N]\n"
    "                     [--max-queue-delay-ms N] [--max-queue-size N] [--max-running-batches N]\n"
    "                     [--devices D1,D2,...] [--warmup-steps N] [--calls-out FILE]\n"
    "                     [--graph-buckets fine|pow2] [--graph-capacity N] [--graph-keys shape|admission]\n"
    "       tomeserve-sim calibrate --model DIR --devices D --out FILE [--sizes WxH,...] [--rows N,...]\n"
    "                     [--ratios R,...] [--dtype auto|fp32|fp16|bf16] [--repeats N]\n"
    "  replay     the trace (JSON lines: t, width, height, steps, scheduler, guidance, num_images, ratio, seed,\n"
    "             prompt, optional max_ratio and slo_x) through the server's batching policy on a virtual\n"
    "             clock, one worker per --devices entry, costs from the profile (a JSON file or built in:\n"
    "             h200-sd15-fp16). Arrival seconds = t x mean_solo_s / X (--load) or t x S (--arrival-scale);\n"
    "             mean_solo_s is the mean unloaded latency of the trace's calls under the profile. With --slo a\n"
    "             call with slo_x gets the target slo_x x its own unloaded latency and its max_ratio. Prints one\n"
    "             JSON line: p50_s, p95_s, p99_s, throughput_rps, completed, refused, slo_attainment (null\n"
    "             without --slo), mean_ratio, mean_rows_per_call (UNet rows per UNet call), mean_solo_s, ...;\n"
    "             --calls-out FILE writes each call's outcome as a JSON line. On a CUDA profile it also counts\n"
    "             CUDA graphs as the server keeps them (pipeline/graph_layout.h): graph_layouts, graph_captures,\n"
    "             graph_hit_rate (replays / UNet calls), padded_rows_fraction (padding / rows graphs computed);\n"
    "             --graph-buckets, --graph-capacity (graphs held per worker) and --graph-keys (admission: the\n"
    "             earlier key by row identity) vary them.\n"
    "  calibrate  measures a profile with the real pipeline on this machine: UNet steps by size x rows x ratio\n"
    "             (ToMe groups included), text encoding, decode and encode, and the host overhead per step.\n";

int UsageError(const std::string& message) {
  std::fprintf(stderr, "tomeserve-sim: %s (see --help)\n", message.c_str());
  return 2;
}

// Nearest-rank percentile of a non-empty sorted list (scripts/load.py's definition).
double Percentile(const std::vector<double>& sorted, double q) {
  const long n = static_cast<long>(sorted.size());
  const long k = std::max(0L, std::min(n - 1, static_cast<long>(std::nearbyint(q / 100.0 * n + 0.5)) - 1));
  return sorted[k];
}

int RunReplay(const std::vector<std::string>& rest) {
  absl::StatusOr<tools::CliArgs> args = tools::CliArgs::Parse(
      rest,
      {"trace", "profile", "load", "arrival-scale", "batching", "max-batch-size", "max-batch-cost",
       "max-queue-delay-ms", "max-queue-size", "devices", "warmup-steps", "max-running-batches", "calls-out",
       "graph-buckets", "graph-capacity", "graph-keys"},
      {"slo"});
  if (!args.ok()) return UsageError(std::string(args.status().message()));
  absl::StatusOr<std::string> trace_path = args->Required("trace");
  if (!trace_path.ok()) return UsageError(std::string(trace_path.status().message()));
  absl::StatusOr<std::string> profile_name = args->Required("profile");
  if (!profile_name.ok()) return UsageError(std::string(profile_name.status().message()));
  if (args->Has("load") == args->Has("arrival-scale")) return UsageError("give exactly one of --load and --arrival-scale");
  const std::string batching = args->Get("batching").value_or("step");
  if (batching != "step" && batching != "request") {
    return UsageError("--batching is \"" + batching + "\"; allowed: step or request");
  }
  absl::StatusOr<int64_t> max_batch = args->GetInt("max-batch-size", 8, 1, 256);
  absl::StatusOr<int64_t> max_cost = args->GetInt("max-batch-cost", 0, 0, int64_t{1} << 40);
  absl::StatusOr<int64_t> delay_ms = args->GetInt("max-queue-delay-ms", 20, 0, 60000);
  absl::StatusOr<int64_t> queue_size = args->GetInt("max-queue-size", 64, 1, 1000000);
  absl::StatusOr<int64_t> warmup = args->GetInt("warmup-steps", 2, 0, 1000);
  absl::StatusOr<int64_t> max_batches = args->GetInt("max-running-batches", 2, 1, 16);
  absl::StatusOr<int64_t> graph_capacity = args->GetInt("graph-capacity", static_cast<int64_t>(pipeline::kDefaultGraphCapacity), 1, 4096);
  const std::string graph_buckets = args->Get("graph-buckets").value_or("fine");
  if (graph_buckets != "fine" && graph_buckets != "pow2") {
    return UsageError("--graph-buckets is \"" + graph_buckets + "\"; allowed: fine or pow2");
  }
  const std::string graph_keys = args->Get("graph-keys").value_or("shape");
  if (graph_keys != "shape" && graph_keys != "admission") {
    return UsageError("--graph-keys is \"" + graph_keys + "\"; allowed: shape or admission");
  }
  absl::StatusOr<double> load = args->GetDouble("load", 1, 1e-6, 1e6);
  absl::StatusOr<double> scale = args->GetDouble("arrival-scale", 1, 0, 1e9);
  for (const absl::Status& s : {max_batch.status(), max_cost.status(), delay_ms.status(), queue_size.status(),
                                warmup.status(), load.status(), scale.status(), max_batches.status(),
                                graph_capacity.status()}) {
    if (!s.ok()) return UsageError(std::string(s.message()));
  }
  const std::string devices = args->Get("devices").value_or("cpu");
  const std::vector<std::string> device_list = absl::StrSplit(devices, ',', absl::SkipEmpty());
  if (device_list.empty()) return UsageError("--devices is empty; give one entry per worker, e.g. cpu,cpu");

  absl::StatusOr<std::vector<TraceCall>> trace = ReadTrace(*trace_path);
  if (!trace.ok()) return UsageError(std::string(trace.status().message()));
  absl::StatusOr<CostProfile> profile = CostProfile::Load(*profile_name);
  if (!profile.ok()) return UsageError(std::string(profile.status().message()));

  double mean_solo = 0;
  for (const TraceCall& c : *trace) mean_solo += SoloSeconds(c, c.ratio, *profile);
  mean_solo /= static_cast<double>(trace->size());
  ReplayOptions options{
      .policy = {.mode = batching == "request" ? server::BatchingMode::kRequest : server::BatchingMode::kStep,
                 .max_batch_images = static_cast<int>(*max_batch),
                 .max_queue_delay_seconds = *delay_ms / 1000.0},
      .max_queue_size = static_cast<int>(*queue_size),
      .workers = static_cast<int>(device_list.size()),
      .max_batch_cost = *max_cost,
      .max_batches = static_cast<int>(*max_batches),
      .warmup_steps = static_cast<int>(*warmup),
      .slo = args->Has("slo"),
      .arrival_scale = args->Has("load") ? mean_solo / *load : *scale,
      // CUDA graphs are the server's default on a CUDA device.
      .graphs = absl::StartsWith(profile->data().device, "cuda"),
      .graph_capacity = static_cast<size_t>(*graph_capacity),
      .graph_buckets = graph_buckets == "pow2" ? pipeline::RowBuckets::kPowerOfTwo : pipeline::RowBuckets::kFine,
      .graph_shape_keys = graph_keys == "shape"};
  const ReplayResult r = Replay(*trace, *profile, options);

  std::vector<double> latency;
  double ratio_sum = 0, first_arrival = server::kNever, last_finish = 0;
  int refused = 0, slo_calls = 0, slo_met = 0;
  for (size_t i = 0; i < r.calls.size(); ++i) {
    const CallOutcome& c = r.calls[i];
    first_arrival = std::min(first_arrival, c.arrival);
    if (c.completed) {
      latency.push_back(c.finish - c.arrival);
      ratio_sum += c.ratio;
      last_finish = std::max(last_finish, c.finish);
    }
    refused += c.refused ? 1 : 0;
    if (options.slo && (*trace)[i].slo_x) {
      ++slo_calls;
      slo_met += c.completed && c.finish - c.arrival <= c.target_seconds + 1e-9 ? 1 : 0;
    }
  }
  if (std::optional<std::string> path = args->Get("calls-out")) {
    std::FILE* f = std::fopen(path->c_str(), "w");
    if (f == nullptr) return UsageError("--calls-out " + *path + ": cannot write");
    for (size_t i = 0; i < r.calls.size(); ++i) {
      const CallOutcome& c = r.calls[i];
      nlohmann::json line = {{"index", i},          {"completed", c.completed}, {"refused", c.refused},
                             {"arrival_s", c.arrival}, {"ratio", c.ratio},        {"solo_s", c.solo_seconds}};
      line["latency_s"] = c.completed ? nlohmann::json(c.finish - c.arrival) : nlohmann::json(nullptr);
      line["target_s"] = c.target_seconds > 0 ? nlohmann::json(c.target_seconds) : nlohmann::json(nullptr);
      std::fprintf(f, "%s\n", line.dump().c_str());
    }
    std::fclose(f);
  }
  std::vector<double> slowdown;
  for (const CallOutcome& c : r.calls) {
    if (c.completed) slowdown.push_back((c.finish - c.arrival) / c.solo_seconds);
  }
  std::sort(slowdown.begin(), slowdown.end());
  std::sort(latency.begin(), latency.end());
  nlohmann::json out;
  const bool any = !latency.empty();
  out["p50_s"] = any ? nlohmann::json(Percentile(latency, 50)) : nlohmann::json(nullptr);
  out["p95_s"] = any ? nlohmann::json(Percentile(latency, 95)) : nlohmann::json(nullptr);
  out["p99_s"] = any ? nlohmann::json(Percentile(latency, 99)) : nlohmann::json(nullptr);
  const double makespan = any ? last_finish - first_arrival : 0;
  out["throughput_rps"] = makespan > 0 ? latency.size() / makespan : 0.0;
  out["completed"] = latency.size();
  out["refused"] = refused;
  out["slo_attainment"] = options.slo && slo_calls > 0 ? nlohmann::json(static_cast<double>(slo_met) / slo_calls)
                                                       : nlohmann::json(nullptr);
  out["mean_ratio"] = any ? nlohmann::json(ratio_sum / latency.size()) : nlohmann::json(nullptr);
  out["mean_rows_per_call"] = r.unet_calls > 0 ? static_cast<double>(r.unet_rows) / r.unet_calls : 0.0;
  out["mean_solo_s"] = mean_solo;
  // Latency over the call's own unloaded latency: what batching and queueing add (the tail of latency itself is
  // bounded below by the largest calls' unloaded latency).
  out["p50_slowdown"] = any ? nlohmann::json(Percentile(slowdown, 50)) : nlohmann::json(nullptr);
  out["p95_slowdown"] = any ? nlohmann::json(Percentile(slowdown, 95)) : nlohmann::json(nullptr);
  out["mean_latency_s"] = any ? nlohmann::json(std::accumulate(latency.begin(), latency.end(), 0.0) / latency.size())
                              : nlohmann::json(nullptr);
  // CUDA graphs (a CUDA profile; null otherwise): distinct layouts, the share of UNet calls a graph replayed
  // (captures and first calls of a layout are not replays), and the share of the rows graphs computed that were
  // padding.
  const auto graph_value = [&](double v) { return options.graphs ? nlohmann::json(v) : nlohmann::json(nullptr); };
  out["graph_layouts"] = graph_value(static_cast<double>(r.graphs.layouts));
  out["graph_captures"] = graph_value(static_cast<double>(r.graphs.captures));
  out["graph_hit_rate"] = graph_value(r.unet_calls > 0 ? static_cast<double>(r.graphs.replays) / r.unet_calls : 0.0);
  const int64_t graph_computed = r.graph_rows + r.graph_padded_rows;
  out["padded_rows_fraction"] =
      graph_value(graph_computed > 0 ? static_cast<double>(r.graph_padded_rows) / graph_computed : 0.0);
  out["calls"] = r.calls.size();
  out["slo_calls"] = slo_calls;
  out["unet_calls"] = r.unet_calls;
  out["makespan_s"] = makespan;
  out["arrival_scale_s"] = options.arrival_scale;
  out["load"] = args->Has("load") ? nlohmann::json(*load) : nlohmann::json(nullptr);
  out["batching"] = batching;
  out["workers"] = options.workers;
  out["profile"] = profile->data().name;
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace
}  // namespace tomeserve::sim

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && (args[0] == "--help" || args[0] == "-h" || args[0] == "help")) {
    std::fputs(tomeserve::sim::kUsage, stdout);
    return 0;
  }
  if (!args.empty() && args[0] == "calibrate") {
    return tomeserve::sim::Calibrate(std::vector<std::string>(args.begin() + 1, args.end()));
  }
  if (args.empty()) {
    std::fputs(tomeserve::sim::kUsage, stderr);
    return 2;
  }
  return tomeserve::sim::RunReplay(args);
}
