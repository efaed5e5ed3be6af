// tomeserve-sim's replay: a trace of calls played against the real BatchingPolicy on a virtual clock, with
// device workers that cost their steps from a CostProfile and learn them in a StepTimeModel each, as the
// server's workers do (warm-up steps at the native size first). One worker loop per device mirrors
// server/worker.cpp: at each step boundary ask the policy, encode the prompts of what it admits, run one step
// over every running call, then decode and finish the calls whose last step it was. Deterministic: the same
// inputs give the same result.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "pipeline/graph_layout.h"
#include "server/batching_policy.h"
#include "tools/sim/cost_profile.h"

namespace tomeserve::sim {

// One trace line.
struct TraceCall {
  double t = 0;  // arrival, in units of the trace's mean unloaded latency (or of --arrival-scale seconds)
  int width = 512, height = 512, steps = 25;
  std::string scheduler = "pndm";  // pndm|ddim|euler|euler_a|dpmpp_2m|dpmpp_2m_karras
  double guidance = 7.5;
  int num_images = 1;
  double ratio = 0;
  uint64_t seed = 0;
  std::string prompt;
  std::optional<double> max_ratio;
  std::optional<double> slo_x;  // latency target as a multiple of the call's own unloaded latency
};

// JSON lines; errors name the file, the line and the field.
absl::StatusOr<std::vector<TraceCall>> ReadTrace(const std::string& path);

struct ReplayOptions {
  server::PolicyOptions policy;
  int max_queue_size = 64;
  int workers = 1;
  int64_t max_batch_cost = 0;  // 0: the profile's budget
  int max_batches = 2;         // running batches (one per size) per worker (--max-running-batches)
  int warmup_steps = 2;
  bool slo = false;            // calls with slo_x get a target and their max_ratio
  double arrival_scale = 1;    // seconds per trace time unit
  // CUDA graphs as the server's UNetGraphs keeps them (one cache per worker): counted, not costed (a step costs
  // what the profile measured, without padding).
  bool graphs = false;
  size_t graph_capacity = pipeline::kDefaultGraphCapacity;
  int64_t graph_max_rows = pipeline::kDefaultGraphMaxRows;
  pipeline::RowBuckets graph_buckets = pipeline::RowBuckets::kFine;
  // false: the layout key before graphs were keyed by shape (rows in admission order, unconditional halves
  // first, each row's sample and half in the key), for the comparison in docs/benchmarks.md.
  bool graph_shape_keys = true;
};

struct CallOutcome {
  bool completed = false, refused = false;
  double arrival = 0, finish = 0;
  double ratio = 0;           // effective
  double solo_seconds = 0;    // unloaded latency under the profile at the trace's ratio
  double target_seconds = 0;  // with --slo and slo_x
};

struct ReplayResult {
  std::vector<CallOutcome> calls;  // in trace order
  int64_t unet_calls = 0;          // steps run, all workers
  int64_t unet_rows = 0;           // their rows summed
  pipeline::GraphLayoutCache::Stats graphs;  // summed over workers (with ReplayOptions::graphs)
  int64_t graph_rows = 0, graph_padded_rows = 0;  // rows of the calls a graph ran (replays and captures), padding
};

// Unloaded latency of one trace call at `ratio` under `profile`: fixed costs + its UNet calls alone.
double SoloSeconds(const TraceCall& call, double ratio, const CostProfile& profile);

ReplayResult Replay(const std::vector<TraceCall>& trace, const CostProfile& profile, const ReplayOptions& options);

}  // namespace tomeserve::sim
