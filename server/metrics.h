// Prometheus metrics for the whole server: one Metrics object, created once in main and passed to the service
// and the workers. Without a listen address it is a no-op (every method returns at once). Thread-safe.
//
// Exposed on http://<metrics-listen>/metrics (server/metrics_http.h):
//   tomeserve_requests_total{code}                         finished Generate/GenerateStream calls
//   tomeserve_request_latency_seconds{tome_ratio,code}     end-to-end, from enqueue to finish
//   tomeserve_phase_seconds{phase=queue|text_encoding|denoising|decoding}
//   tomeserve_batch_size                                   images per UNet call actually run
//   tomeserve_unet_rows_total                              UNet input rows computed (2 per guided image/step)
//   tomeserve_queue_depth                                  queued (not running) requests
//   tomeserve_oom_total{tome_ratio,resolution}             out-of-memory errors (steps and decodes)
//   tomeserve_oom_evictions_total                          samples evicted after an OOM (state kept)
//   tomeserve_slo_decisions_total{tome_ratio,target_met}   SLO ratio controller choices
// Label values are bounded (clients choose ratios and sizes freely): tome_ratio is the batch key's canonical
// ratio with two decimals (RatioLabel), resolution a pixel-count bucket (ResolutionLabel).
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tomeserve::server {

class Metrics {
 public:
  // A no-op instance.
  Metrics();
  ~Metrics();
  // Serves /metrics on `listen` ("host:port"); errors (e.g. the port is taken) are UNAVAILABLE.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen);

  void ObserveRequest(double tome_ratio, absl::StatusCode code, double seconds);
  void ObservePhases(double queue, double text_encoding, double denoising, double decoding);
  void ObserveBatch(int images);
  void SetQueueDepth(int depth);
  void CountOom(double tome_ratio, int width, int height);
  void CountUnetRows(int rows);
  void CountEvictions(int samples);
  void CountSloDecision(double chosen_ratio, bool target_met);

  // The bound port (0 when off); for tests that listen on port 0.
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "0.50", "0.30", "0.00": how ratios are written in labels (the canonical ratio rounded to 2 decimals).
std::string RatioLabel(double ratio);
// "<=256x256", "<=512x512", "<=768x768", "<=1024x1024" or ">1024x1024": the smallest bucket whose pixel count
// (side squared) holds width*height.
std::string ResolutionLabel(int width, int height);

}  // namespace tomeserve::server
