#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "server/metrics_http.h"

namespace tomeserve::server {
namespace {

using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

// End to end: 10 ms to ~12 min. Steps: 1 ms (a small GPU step) to ~40 s (sd15 at 1024^2 on a CPU). Phases
// share the latency layout.
const Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new Histogram::BucketBoundaries(GeometricBuckets(0.01, 720, 1.25));
  return *b;
}
const Histogram::BucketBoundaries& StepBuckets() {
  static const auto* b = new Histogram::BucketBoundaries(GeometricBuckets(0.001, 40, 1.25));
  return *b;
}

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

// The served model's name, or "unknown" for a call rejected before its model was resolved (never a client's
// string: the label stays bounded by the server's --model list).
std::string ModelLabel(const std::string& model) { return model.empty() ? "unknown" : model; }

Family<Counter>& CounterFamily(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r);
}
Family<Gauge>& GaugeFamily(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r);
}
Family<Histogram>& HistogramFamily(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r);
}

}  // namespace

std::string RatioLabel(double ratio) {
  const double grid = std::round(ratio * 20.0) / 20.0;
  return absl::StrFormat("%.2f", grid == 0 ? 0.0 : grid);  // no "-0.00"
}

std::string ResolutionLabel(int width, int height) {
  if (width <= 0 || height <= 0) return "unknown";
  const int64_t pixels = static_cast<int64_t>(width) * height;
  for (const int64_t side : {256, 512, 768, 1024}) {
    if (pixels <= side * side) return absl::StrCat("<=", side, "x", side);
  }
  return ">1024x1024";
}

std::vector<double> GeometricBuckets(double first, double last, double factor) {
  std::vector<double> out;
  for (double b = first; out.empty() || out.back() < last; b *= factor) {
    // Three significant digits keep the `le` labels short and stable.
    const double digits = std::pow(10.0, std::floor(std::log10(b)) - 2);
    out.push_back(std::round(b / digits) * digits);
  }
  return out;
}

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<MetricsHttpServer> http;
  prometheus::Registry& r = *registry;

  Family<Gauge>& build = GaugeFamily(r, "tomeserve_build_info", "Build and runtime versions (value 1)");
  Family<Counter>& requests = CounterFamily(r, "tomeserve_requests_total", "Finished generate calls by status code");
  Family<Histogram>& latency = HistogramFamily(
      r, "tomeserve_request_latency_seconds",
      "End-to-end generate latency (enqueue to finish) by effective ToMe ratio, resolution and status code");
  Family<Histogram>& phases = HistogramFamily(
      r, "tomeserve_phase_seconds",
      "Time per call phase: queue, text_encoding, denoising, decoding (CUDA event time on CUDA devices)");
  Family<Histogram>& steps = HistogramFamily(
      r, "tomeserve_unet_step_seconds",
      "One denoising step (UNet call and scheduler updates) whose rows all share one ToMe ratio, by that ratio and "
      "resolution (steps mixing ratios are not observed here: see tomeserve_step_marginal_seconds)");
  Family<Gauge>& marginal = GaugeFamily(
      r, "tomeserve_step_marginal_seconds",
      "Predicted seconds one guided image at this ToMe ratio adds to a step of its batch (the worker's step-time "
      "model at the batch's current rows), by ratio and resolution: the cost of that ratio's work under mixed "
      "batches");
  Family<Counter>& images = CounterFamily(r, "tomeserve_images_total", "Images returned by ToMe ratio and resolution");
  Family<Counter>& tokens = CounterFamily(
      r, "tomeserve_tome_tokens_total",
      "Tokens entering Token-Merging-patched transformer blocks (stage=before) and left after merging "
      "(stage=after), per image and UNet call, by ToMe ratio");
  Family<Histogram>& batch = HistogramFamily(r, "tomeserve_batch_size", "Images per UNet call");
  Family<Histogram>& rows = HistogramFamily(
      r, "tomeserve_unet_rows", "UNet input rows per call (2 per guided image); _sum counts every row computed");
  Family<Gauge>& depth = GaugeFamily(r, "tomeserve_queue_depth", "Queued (not yet running) calls");
  Family<Gauge>& capacity = GaugeFamily(r, "tomeserve_queue_capacity", "Most queued calls (--max-queue-size)");
  Family<Gauge>& running = GaugeFamily(r, "tomeserve_running_samples", "Images in a worker's running batch");
  Family<Gauge>& inflight = GaugeFamily(r, "tomeserve_inflight_requests", "Generate calls accepted and not finished");
  Family<Gauge>& memory = GaugeFamily(
      r, "tomeserve_device_memory_bytes",
      "Device memory: CUDA caching allocator allocated/reserved/peak bytes; process resident set (rss) on CPU");
  Family<Gauge>& healthy = GaugeFamily(r, "tomeserve_worker_healthy", "1 while the device's worker serves, else 0");
  Family<Counter>& worker_seconds = CounterFamily(
      r, "tomeserve_worker_seconds_total",
      "Host seconds the device's worker thread spent per part of its loop while it had work (idle waits excluded)");
  Family<Counter>& text_cache = CounterFamily(
      r, "tomeserve_text_cache_lookups_total",
      "Text-embedding cache lookups per distinct text of an admitted call, by model and result (hit: no encoder run)");
  Family<Counter>& unet_calls = CounterFamily(
      r, "tomeserve_unet_calls_total",
      "UNet calls by how they ran: graph (a CUDA graph replayed), capture (captured after an eager warm-up on "
      "the padded rows), eager");
  Family<Counter>& graph_rows = CounterFamily(
      r, "tomeserve_unet_graph_rows_total",
      "Rows the CUDA graphs computed (replays and captures): kind=real (the calls' own) or padding (to the bucket)");
  Family<Gauge>& graph_layouts =
      GaugeFamily(r, "tomeserve_unet_graph_layouts", "Distinct UNet call layouts the CUDA graphs have seen");
  Family<Counter>& oom = CounterFamily(
      r, "tomeserve_oom_total", "Out-of-memory errors (denoising steps and decodes) by ToMe ratio and resolution");
  Family<Counter>& evictions = CounterFamily(
      r, "tomeserve_oom_evictions_total",
      "Samples evicted from a running batch after an out-of-memory step (state kept, rejoined later)");
  Family<Counter>& slo_decisions = CounterFamily(
      r, "tomeserve_slo_decisions_total",
      "SLO ratio controller decisions by chosen ToMe ratio and whether a ratio was predicted to meet the target");
  Family<Counter>& tenant_requests = CounterFamily(r, "tomeserve_tenant_requests_total",
                                                  "Finished generate calls by tenant and status code");
  Family<Counter>& http_requests = CounterFamily(r, "tomeserve_http_requests_total",
                                                "Answered HTTP front-door requests by route and HTTP status");
  Family<Counter>& slo_requests = CounterFamily(
      r, "tomeserve_slo_requests_total", "Calls with a latency target by outcome (met: finished OK within the target)");

  Histogram* batch_hist = &batch.Add({}, Histogram::BucketBoundaries{1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64});
  Histogram* rows_hist =
      &rows.Add({}, Histogram::BucketBoundaries{1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128});
  Counter* evictions_counter = &evictions.Add({});
  Gauge* depth_gauge = &depth.Add({});
  Gauge* inflight_gauge = &inflight.Add({});
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

void Metrics::SetBuildInfo(const BuildInfo& info) {
  if (!impl_) return;
  impl_->build
      .Add({{"version", info.version},
            {"git_commit", info.git_commit},
            {"torch", info.torch},
            {"cuda", info.cuda},
            {"devices", absl::StrJoin(info.devices, ",")}})
      .Set(1);
}

void Metrics::ObserveRequest(const std::string& model, double tome_ratio, int width, int height, absl::StatusCode code, double seconds) {
  if (!impl_) return;
  impl_->requests.Add({{"model", ModelLabel(model)}, {"code", CodeName(code)}}).Increment();
  impl_->latency
      .Add({{"model", ModelLabel(model)},
            {"tome_ratio", RatioLabel(tome_ratio)},
            {"resolution", ResolutionLabel(width, height)},
            {"code", CodeName(code)}},
           LatencyBuckets())
      .Observe(seconds);
}

void Metrics::ObservePhases(const std::string& model, double queue, double text_encoding, double denoising, double decoding) {
  if (!impl_) return;
  impl_->phases.Add({{"model", ModelLabel(model)}, {"phase", "queue"}}, LatencyBuckets()).Observe(queue);
  impl_->phases.Add({{"model", ModelLabel(model)}, {"phase", "text_encoding"}}, LatencyBuckets()).Observe(text_encoding);
  impl_->phases.Add({{"model", ModelLabel(model)}, {"phase", "denoising"}}, LatencyBuckets()).Observe(denoising);
  impl_->phases.Add({{"model", ModelLabel(model)}, {"phase", "decoding"}}, LatencyBuckets()).Observe(decoding);
}

void Metrics::ObserveStep(const std::string& model, double tome_ratio, int width, int height, double seconds) {
  if (!impl_) return;
  impl_->steps
      .Add({{"model", ModelLabel(model)}, {"tome_ratio", RatioLabel(tome_ratio)}, {"resolution", ResolutionLabel(width, height)}}, StepBuckets())
      .Observe(seconds);
}

void Metrics::SetStepMarginal(const std::string& model, double tome_ratio, int width, int height, double seconds) {
  if (!impl_) return;
  impl_->marginal.Add({{"model", ModelLabel(model)}, {"tome_ratio", RatioLabel(tome_ratio)}, {"resolution", ResolutionLabel(width, height)}})
      .Set(seconds);
}

void Metrics::ObserveBatch(int images, int rows) {
  if (!impl_) return;
  impl_->batch_hist->Observe(images);
  impl_->rows_hist->Observe(rows);
}

void Metrics::CountImages(const std::string& model, double tome_ratio, int width, int height, int images) {
  if (!impl_) return;
  impl_->images.Add({{"model", ModelLabel(model)}, {"tome_ratio", RatioLabel(tome_ratio)}, {"resolution", ResolutionLabel(width, height)}})
      .Increment(images);
}

void Metrics::CountMergedTokens(const std::string& model, double tome_ratio, int64_t before, int64_t after) {
  if (!impl_) return;
  impl_->tokens.Add({{"model", ModelLabel(model)}, {"tome_ratio", RatioLabel(tome_ratio)}, {"stage", "before"}}).Increment(static_cast<double>(before));
  impl_->tokens.Add({{"model", ModelLabel(model)}, {"tome_ratio", RatioLabel(tome_ratio)}, {"stage", "after"}}).Increment(static_cast<double>(after));
}

void Metrics::SetQueueDepth(int depth) {
  if (impl_) impl_->depth_gauge->Set(depth);
}

void Metrics::SetQueueCapacity(int capacity) {
  if (impl_) impl_->capacity.Add({}).Set(capacity);
}

void Metrics::SetRunningSamples(const std::string& device, int samples) {
  if (impl_) impl_->running.Add({{"device", device}}).Set(samples);
}

void Metrics::AddInflight(int delta) {
  if (impl_) impl_->inflight_gauge->Increment(delta);
}

void Metrics::SetDeviceMemory(const std::string& device, const std::string& kind, double bytes) {
  if (impl_) impl_->memory.Add({{"device", device}, {"kind", kind}}).Set(bytes);
}

void Metrics::SetWorkerHealthy(const std::string& device, bool healthy) {
  if (impl_) impl_->healthy.Add({{"device", device}}).Set(healthy ? 1 : 0);
}

void Metrics::CountOom(const std::string& model, double tome_ratio, int width, int height) {
  if (!impl_) return;
  impl_->oom.Add({{"model", ModelLabel(model)}, {"tome_ratio", RatioLabel(tome_ratio)}, {"resolution", ResolutionLabel(width, height)}})
      .Increment();
}

void Metrics::CountTextCacheLookups(const std::string& model, int64_t hits, int64_t misses) {
  if (!impl_) return;
  if (hits > 0) impl_->text_cache.Add({{"model", ModelLabel(model)}, {"result", "hit"}}).Increment(static_cast<double>(hits));
  if (misses > 0) impl_->text_cache.Add({{"model", ModelLabel(model)}, {"result", "miss"}}).Increment(static_cast<double>(misses));
}

void Metrics::CountGraphRows(const std::string& device, int64_t real, int64_t padding) {
  if (!impl_) return;
  if (real > 0) impl_->graph_rows.Add({{"device", device}, {"kind", "real"}}).Increment(static_cast<double>(real));
  if (padding > 0) {
    impl_->graph_rows.Add({{"device", device}, {"kind", "padding"}}).Increment(static_cast<double>(padding));
  }
}

void Metrics::SetGraphLayouts(const std::string& device, int64_t layouts) {
  if (impl_) impl_->graph_layouts.Add({{"device", device}}).Set(static_cast<double>(layouts));
}

void Metrics::CountUNetCalls(const std::string& device, const std::string& path, int64_t calls) {
  if (impl_ && calls > 0) impl_->unet_calls.Add({{"device", device}, {"path", path}}).Increment(static_cast<double>(calls));
}

void Metrics::AddWorkerSeconds(const std::string& device, const std::string& part, double seconds) {
  if (impl_) impl_->worker_seconds.Add({{"device", device}, {"part", part}}).Increment(seconds);
}

void Metrics::CountEvictions(int samples) {
  if (impl_) impl_->evictions_counter->Increment(samples);
}

void Metrics::CountSloDecision(const std::string& model, double chosen_ratio, bool target_met) {
  if (!impl_) return;
  impl_->slo_decisions
      .Add({{"model", ModelLabel(model)}, {"tome_ratio", RatioLabel(chosen_ratio)}, {"target_met", target_met ? "true" : "false"}})
      .Increment();
}

void Metrics::CountHttpRequest(const std::string& route, int http_status) {
  if (impl_) impl_->http_requests.Add({{"route", route}, {"code", absl::StrCat(http_status)}}).Increment();
}

void Metrics::CountTenantRequest(const std::string& tenant, absl::StatusCode code) {
  if (impl_) impl_->tenant_requests.Add({{"tenant", tenant.empty() ? "unknown" : tenant}, {"code", CodeName(code)}}).Increment();
}

void Metrics::CountSloOutcome(const std::string& model, bool met) {
  if (impl_) impl_->slo_requests.Add({{"model", ModelLabel(model)}, {"result", met ? "met" : "missed"}}).Increment();
}

int Metrics::port() const { return impl_ && impl_->http ? impl_->http->port() : 0; }

}  // namespace tomeserve::server
