#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/metrics_http.h"

namespace tomeserve::server {
namespace {

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                                     2.5,  5,     10,   25,  50,   100, 250};
  return *b;
}

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

}  // namespace

std::string RatioLabel(double ratio) { return absl::StrFormat("%.2f", ratio); }

std::string ResolutionLabel(int width, int height) {
  const int64_t pixels = static_cast<int64_t>(width) * height;
  for (const int64_t side : {256, 512, 768, 1024}) {
    if (pixels <= side * side) return absl::StrCat("<=", side, "x", side);
  }
  return ">1024x1024";
}

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<MetricsHttpServer> http;
  prometheus::Family<prometheus::Counter>& requests = prometheus::BuildCounter()
                                                          .Name("tomeserve_requests_total")
                                                          .Help("Finished generate calls by status code")
                                                          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& latency =
      prometheus::BuildHistogram()
          .Name("tomeserve_request_latency_seconds")
          .Help("End-to-end generate latency (enqueue to finish) by ToMe ratio and status code")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& phases =
      prometheus::BuildHistogram()
          .Name("tomeserve_phase_seconds")
          .Help("Time per request phase: queue, text_encoding, denoising, decoding")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& batch = prometheus::BuildHistogram()
                                                         .Name("tomeserve_batch_size")
                                                         .Help("Images per UNet call run")
                                                         .Register(*registry);
  prometheus::Family<prometheus::Gauge>& depth = prometheus::BuildGauge()
                                                     .Name("tomeserve_queue_depth")
                                                     .Help("Queued (not yet running) requests")
                                                     .Register(*registry);
  prometheus::Family<prometheus::Counter>& oom =
      prometheus::BuildCounter()
          .Name("tomeserve_oom_total")
          .Help("Out-of-memory errors while running a batch, by ToMe ratio and resolution")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& unet_rows = prometheus::BuildCounter()
                                                          .Name("tomeserve_unet_rows_total")
                                                          .Help("UNet input rows computed (2 per guided image per step)")
                                                          .Register(*registry);
  prometheus::Family<prometheus::Counter>& evictions =
      prometheus::BuildCounter()
          .Name("tomeserve_oom_evictions_total")
          .Help("Samples evicted from a running batch after an out-of-memory step (state kept, rejoined later)")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& slo =
      prometheus::BuildCounter()
          .Name("tomeserve_slo_decisions_total")
          .Help("SLO ratio controller decisions by chosen ToMe ratio and whether a ratio was predicted to meet "
                "the target")
          .Register(*registry);
  prometheus::Counter* unet_rows_counter = &unet_rows.Add({});
  prometheus::Counter* evictions_counter = &evictions.Add({});
  prometheus::Histogram* batch_hist =
      &batch.Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64});
  prometheus::Gauge* depth_gauge = &depth.Add({});
};

Metrics::Metrics() = default;
Metrics::~Metrics() = default;

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& listen) {
  auto m = std::make_unique<Metrics>();
  if (listen.empty()) return m;
  m->impl_ = std::make_unique<Impl>();
  std::shared_ptr<prometheus::Registry> registry = m->impl_->registry;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http = MetricsHttpServer::Start(
      listen, [registry] { return prometheus::TextSerializer().Serialize(registry->Collect()); });
  if (!http.ok()) return http.status();
  m->impl_->http = *std::move(http);
  return m;
}

void Metrics::ObserveRequest(double tome_ratio, absl::StatusCode code, double seconds) {
  if (!impl_) return;
  impl_->requests.Add({{"code", CodeName(code)}}).Increment();
  impl_->latency.Add({{"tome_ratio", RatioLabel(tome_ratio)}, {"code", CodeName(code)}}, LatencyBuckets())
      .Observe(seconds);
}

void Metrics::ObservePhases(double queue, double text_encoding, double denoising, double decoding) {
  if (!impl_) return;
  impl_->phases.Add({{"phase", "queue"}}, LatencyBuckets()).Observe(queue);
  impl_->phases.Add({{"phase", "text_encoding"}}, LatencyBuckets()).Observe(text_encoding);
  impl_->phases.Add({{"phase", "denoising"}}, LatencyBuckets()).Observe(denoising);
  impl_->phases.Add({{"phase", "decoding"}}, LatencyBuckets()).Observe(decoding);
}

void Metrics::ObserveBatch(int images) {
  if (impl_) impl_->batch_hist->Observe(images);
}

void Metrics::SetQueueDepth(int depth) {
  if (impl_) impl_->depth_gauge->Set(depth);
}

void Metrics::CountOom(double tome_ratio, int width, int height) {
  if (!impl_) return;
  impl_->oom.Add({{"tome_ratio", RatioLabel(tome_ratio)}, {"resolution", ResolutionLabel(width, height)}})
      .Increment();
}

void Metrics::CountUnetRows(int rows) {
  if (impl_) impl_->unet_rows_counter->Increment(rows);
}

void Metrics::CountEvictions(int samples) {
  if (impl_) impl_->evictions_counter->Increment(samples);
}

void Metrics::CountSloDecision(double chosen_ratio, bool target_met) {
  if (!impl_) return;
  impl_->slo.Add({{"tome_ratio", RatioLabel(chosen_ratio)}, {"target_met", target_met ? "true" : "false"}})
      .Increment();
}

int Metrics::port() const { return impl_ && impl_->http ? impl_->http->port() : 0; }

}  // namespace tomeserve::server
