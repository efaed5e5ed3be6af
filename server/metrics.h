// Prometheus metrics for the whole server: one Metrics object, created once in main and passed to the service
// and the workers. Without a listen address it is a no-op (every method returns at once). Thread-safe.
//
// Exposed on http://<metrics-listen>/metrics (server/metrics_http.h); base units, counters end in _total:
//   tomeserve_build_info{version,git_commit,torch,cuda,devices}          1
//   tomeserve_requests_total{model,code}                                finished Generate/GenerateStream calls
//   tomeserve_request_latency_seconds{model,tome_ratio,resolution,code} end to end, enqueue to finish
//   tomeserve_phase_seconds{model,phase=queue|text_encoding|denoising|decoding} per call (device time on CUDA)
//   tomeserve_unet_step_seconds{model,tome_ratio,resolution}            one UNet call + scheduler updates, for steps
//                                                                       whose rows all share that ratio
//   tomeserve_step_marginal_seconds{model,tome_ratio,resolution}        gauge: predicted seconds one guided image
//                                                                       at that ratio adds to its batch's step
//                                                                       (what the ratio's work costs, mixed or not)
//   tomeserve_images_total{model,tome_ratio,resolution}                 images returned
//   tomeserve_tome_tokens_total{model,tome_ratio,stage=before|after}    tokens entering patched blocks and left
//                                                                       after merging (merged fraction = 1 - after/before)
//   tomeserve_batch_size                                                images per UNet call
//   tomeserve_unet_rows                                                 UNet input rows per call (_sum: all rows)
//   tomeserve_queue_depth, tomeserve_queue_capacity, tomeserve_running_samples{device},
//   tomeserve_inflight_requests                                         gauges
//   tomeserve_device_memory_bytes{device,kind=allocated|reserved|peak|rss}  CUDA caching allocator; RSS on CPU
//   tomeserve_worker_healthy{device}                                    1 while the worker serves
//   tomeserve_worker_seconds_total{device,part=admit|step|retire|bookkeeping}  where the worker thread's time
//                                                                       goes while it has work (host clock)
//   tomeserve_unet_calls_total{device,path=graph|capture|eager}          UNet calls by how they ran: a CUDA graph
//                                                                       replayed, captured (after an eager
//                                                                       warm-up), or eagerly (CPU: every call)
//   tomeserve_unet_graph_rows_total{device,kind=real|padding}           rows the CUDA graphs computed: the calls'
//                                                                       own and the padding to the row bucket
//   tomeserve_unet_graph_layouts{device}                                distinct call layouts seen (graphs are
//                                                                       keyed by shape: pipeline/graph_layout.h)
//   tomeserve_text_cache_lookups_total{model,result=hit|miss}           text-embedding cache lookups (hit: no
//                                                                       text-encoder run for that text)
//   tomeserve_oom_total{model,tome_ratio,resolution}                    out-of-memory errors (steps and decodes)
//   tomeserve_oom_evictions_total                                       samples evicted after an OOM (state kept)
//   tomeserve_slo_decisions_total{model,tome_ratio,target_met}          SLO controller choices (predicted)
//   tomeserve_slo_requests_total{model,result=met|missed}               calls with a latency target, by outcome
//   tomeserve_tenant_requests_total{tenant,code}                        finished calls per tenant (the bearer
//                                                                       token's; "default" without auth)
//   tomeserve_http_requests_total{route,code}                           answered --http-listen requests: route
//                                                                       is the server's route pattern ("other"
//                                                                       for unknown paths), code the HTTP status
// Label values are bounded (clients choose ratios and sizes freely): tome_ratio is the effective canonical
// ratio on the 0.05 grid with two decimals (RatioLabel: 16 values), resolution a pixel-count bucket
// (ResolutionLabel: 6 values), code one of gRPC's 17, device one per worker, model one per served model (its
// --model name) plus "unknown" for calls rejected before their model was resolved, tenant one per tenant of
// --auth-token-file plus "default" and "unknown" (rejected before authentication), route one per HTTP route.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tomeserve::server {

struct BuildInfo {
  std::string version, git_commit, torch, cuda;
  std::vector<std::string> devices;
};

class Metrics {
 public:
  // A no-op instance.
  Metrics();
  ~Metrics();
  // Serves /metrics on `listen` ("host:port"); errors (e.g. the port is taken) are UNAVAILABLE.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen);

  void SetBuildInfo(const BuildInfo& info);
  void ObserveRequest(const std::string& model, double tome_ratio, int width, int height, absl::StatusCode code, double seconds);
  void ObservePhases(const std::string& model, double queue, double text_encoding, double denoising, double decoding);
  void ObserveStep(const std::string& model, double tome_ratio, int width, int height, double seconds);
  void SetStepMarginal(const std::string& model, double tome_ratio, int width, int height, double seconds);
  void ObserveBatch(int images, int rows);
  void CountImages(const std::string& model, double tome_ratio, int width, int height, int images);
  void CountMergedTokens(const std::string& model, double tome_ratio, int64_t before, int64_t after);
  void SetQueueDepth(int depth);
  void SetQueueCapacity(int capacity);
  void SetRunningSamples(const std::string& device, int samples);
  void AddInflight(int delta);
  void SetDeviceMemory(const std::string& device, const std::string& kind, double bytes);
  void SetWorkerHealthy(const std::string& device, bool healthy);
  void AddWorkerSeconds(const std::string& device, const std::string& part, double seconds);
  void CountTextCacheLookups(const std::string& model, int64_t hits, int64_t misses);
  void CountUNetCalls(const std::string& device, const std::string& path, int64_t calls);
  void CountGraphRows(const std::string& device, int64_t real, int64_t padding);
  void SetGraphLayouts(const std::string& device, int64_t layouts);
  void CountOom(const std::string& model, double tome_ratio, int width, int height);
  void CountEvictions(int samples);
  void CountSloDecision(const std::string& model, double chosen_ratio, bool target_met);
  void CountSloOutcome(const std::string& model, bool met);
  void CountTenantRequest(const std::string& tenant, absl::StatusCode code);
  void CountHttpRequest(const std::string& route, int http_status);

  // The bound port (0 when off); for tests that listen on port 0.
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "0.50", "0.30", "0.00": how ratios are written in labels (the ratio rounded to the 0.05 grid).
std::string RatioLabel(double ratio);
// "<=256x256", "<=512x512", "<=768x768", "<=1024x1024" or ">1024x1024": the smallest bucket whose pixel count
// (side squared) holds width*height; "unknown" for a call rejected before its size was known.
std::string ResolutionLabel(int width, int height);
// Bucket upper bounds growing by `factor` from `first` until past `last` (the step-time and latency layout:
// 1.25x steps, so ratios 25% apart never share a bucket).
std::vector<double> GeometricBuckets(double first, double last, double factor);

}  // namespace tomeserve::server
