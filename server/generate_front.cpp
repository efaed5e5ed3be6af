#include "server/generate_front.h"

#include <spdlog/spdlog.h>

#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace tomeserve::server {

namespace {

// " prompt=\"...\" negative_prompt=\"...\"" for --log-prompts: escaped, so a prompt cannot break the
// one-line-per-call format, and at most 256 bytes each.
std::string PromptsForLog(const v1::GenerateRequest& request) {
  const auto quoted = [](const std::string& text) {
    return absl::StrCat("\"", absl::CHexEscape(text.substr(0, 256)), text.size() > 256 ? "...\"" : "\"");
  };
  return absl::StrCat(" prompt=", quoted(request.prompt()), " negative_prompt=", quoted(request.negative_prompt()));
}

}  // namespace

GenerateFront::GenerateFront(RequestLimits limits, Scheduler* scheduler, Metrics* metrics, TokenAuth* auth)
    : limits_(limits), scheduler_(scheduler), metrics_(metrics), auth_(auth) {}

void GenerateFront::SetCatalog(ModelCatalog catalog) {
  catalog_storage_ = std::make_unique<ModelCatalog>(std::move(catalog));
  catalog_.store(catalog_storage_.get());
}

absl::StatusOr<TenantSpec> GenerateFront::Authenticate(std::optional<absl::string_view> authorization) const {
  if (auth_ == nullptr) return TenantSpec{};
  return auth_->Check(authorization);
}

absl::StatusOr<std::shared_ptr<Job>> GenerateFront::MakeJob(std::optional<absl::string_view> authorization,
                                                            absl::Time deadline, const v1::GenerateRequest& request,
                                                            JobObserver* observer, std::string* tenant_name) {
  absl::StatusOr<TenantSpec> tenant = Authenticate(authorization);
  if (!tenant.ok()) return tenant.status();
  *tenant_name = tenant->name;
  const ModelCatalog* models = catalog();
  if (models == nullptr) return absl::UnavailableError("the server is loading its models; retry shortly");
  absl::StatusOr<GenerationRequest> converted = ConvertRequest(request, *models, limits_, random_);
  if (!converted.ok()) return converted.status();
  converted->tenant = tenant->name;
  // Fair sharing needs two tenants to share between.
  converted->tenant_weight = auth_ != nullptr && auth_->tenants() > 1 ? tenant->weight : 0;
  // Held until Record, which every job reaches exactly once.
  if (absl::Status s = tenant_limits_.Acquire(*tenant, absl::Now()); !s.ok()) return s;
  metrics_->AddInflight(1);  // balanced in Record
  return std::make_shared<Job>(*std::move(converted), deadline, observer);
}

void GenerateFront::Submit(const std::shared_ptr<Job>& job) {
  // A local reference: Finish may end the call and release the transport's reference before it returns.
  std::shared_ptr<Job> keep = job;
  if (absl::Status s = scheduler_->Enqueue(keep); !s.ok()) keep->Finish(s);
}

void GenerateFront::Cancel(Job* job) {
  if (job == nullptr) return;
  job->Cancel();
  scheduler_->Wake();
}

void GenerateFront::Record(absl::string_view rpc, const v1::GenerateRequest& request, const Job* job,
                           const std::string& tenant, const absl::StatusOr<GenerationResult>& result,
                           absl::Time started) {
  const absl::StatusCode code = result.status().code();
  const double total = absl::ToDoubleSeconds(absl::Now() - started);
  // The effective canonical ratio (the controller's choice): settings with no effect count as 0. Calls
  // rejected before a job existed have no size ("unknown" resolution).
  const double ratio = job != nullptr ? tome::Canonical(job->effective_tome()).ratio : 0;
  const std::string model = job != nullptr ? job->key().model : "";
  metrics_->ObserveRequest(model, ratio, job != nullptr ? job->key().width : 0, job != nullptr ? job->key().height : 0,
                           code, total);
  metrics_->CountTenantRequest(tenant, code);
  if (job != nullptr) {
    tenant_limits_.Release(job->request().tenant);
    metrics_->AddInflight(-1);
    if (job->request().latency_target_seconds > 0)
      metrics_->CountSloOutcome(model, result.ok() && total <= job->request().latency_target_seconds);
  }
  if (result.ok() && result->slo.applied) metrics_->CountSloDecision(model, ratio, result->slo.target_met);
  const std::string id = job != nullptr ? job->request().request_id : request.request_id();
  std::string key = job != nullptr ? ToString(job->key()) : "-";
  if (log_prompts_) absl::StrAppend(&key, PromptsForLog(request));
  if (result.ok()) {
    spdlog::info(
        "{} id={} {} ratio={} images={} batch_size={} queue={:.3f}s text={:.3f}s denoise={:.3f}s "
        "decode={:.3f}s total={:.3f}s status=OK",
        std::string(rpc), id, key, RatioLabel(result->tome.ratio), result->images.size(), result->batch_size, result->queue_seconds,
        result->text_encoding_seconds, result->denoising_seconds, result->decoding_seconds, total);
  } else {
    spdlog::info("{} id={} {} total={:.3f}s status={} message=\"{}\"", std::string(rpc), id, key, total,
                 absl::StatusCodeToString(code), std::string(result.status().message()));
  }
}

}  // namespace tomeserve::server
