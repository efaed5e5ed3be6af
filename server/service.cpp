#include "server/service.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <deque>
#include <optional>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/status_convert.h"

namespace tomeserve::server {

namespace {

// The call's authorization metadata value, if any.
std::optional<absl::string_view> Authorization(const grpc::CallbackServerContext* call) {
  const auto& metadata = call->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return std::nullopt;
  return absl::string_view(it->second.data(), it->second.size());
}

}  // namespace

struct ImageGeneratorService::Context {
  RequestLimits limits;
  Scheduler* scheduler;
  Metrics* metrics;
  TokenAuth* auth;  // null: no authentication
  TenantLimits tenant_limits;
  bool log_prompts = false;
  RandomSource random = RandomSource::Default();
  std::atomic<const ModelCatalog*> catalog{nullptr};
  std::unique_ptr<ModelCatalog> catalog_storage;

  // " prompt=\"...\" negative_prompt=\"...\"" for --log-prompts: escaped, so a prompt cannot break the
  // one-line-per-call format, and at most 256 bytes each.
  static std::string PromptsForLog(const v1::GenerateRequest& request) {
    const auto quoted = [](const std::string& text) {
      return absl::StrCat("\"", absl::CHexEscape(text.substr(0, 256)), text.size() > 256 ? "...\"" : "\"");
    };
    return absl::StrCat(" prompt=", quoted(request.prompt()), " negative_prompt=", quoted(request.negative_prompt()));
  }

  // A call's cancellation (any gRPC thread): mark the job and let the scheduler drop it if it is still queued;
  // a running job leaves its batch at the next step boundary. `job` may be null (rejected before enqueue).
  void Cancel(Job* job) {
    if (job == nullptr) return;
    job->Cancel();
    scheduler->Wake();
  }

  // The caller's tenant ("default" without authentication), or UNAUTHENTICATED.
  absl::StatusOr<TenantSpec> Authenticate(const grpc::CallbackServerContext* call) const {
    if (auth == nullptr) return TenantSpec{};
    return auth->Check(Authorization(call));
  }

  // Authenticates, validates and builds the job; on error returns the status to answer with. `tenant_name` is
  // set once the caller is authenticated (for Record, also when the call is refused after that).
  absl::StatusOr<std::shared_ptr<Job>> MakeJob(grpc::CallbackServerContext* ctx, const v1::GenerateRequest& request,
                                               JobObserver* observer, std::string* tenant_name) {
    absl::StatusOr<TenantSpec> tenant = Authenticate(ctx);
    if (!tenant.ok()) return tenant.status();
    *tenant_name = tenant->name;
    const ModelCatalog* models = catalog.load();
    if (models == nullptr) return absl::UnavailableError("the server is loading its models; retry shortly");
    absl::StatusOr<GenerationRequest> converted = ConvertRequest(request, *models, limits, random);
    if (!converted.ok()) return converted.status();
    converted->tenant = tenant->name;
    // Fair sharing needs two tenants to share between.
    converted->tenant_weight = auth != nullptr && auth->tenants() > 1 ? tenant->weight : 0;
    // Held until Record, which every job reaches exactly once.
    if (absl::Status s = tenant_limits.Acquire(*tenant, absl::Now()); !s.ok()) return s;
    absl::Time deadline = absl::InfiniteFuture();
    const auto grpc_deadline = ctx->deadline();
    if (grpc_deadline != std::chrono::system_clock::time_point::max())
      deadline = absl::FromChrono(grpc_deadline);
    metrics->AddInflight(1);  // balanced in Record, which every job reaches exactly once
    return std::make_shared<Job>(*std::move(converted), deadline, observer);
  }

  // One log line and the metrics of a finished generate call.
  void Record(const std::string& rpc, const v1::GenerateRequest& request, const Job* job, const std::string& tenant,
              const absl::StatusOr<GenerationResult>& result, absl::Time started) {
    const absl::StatusCode code = result.status().code();
    const double total = absl::ToDoubleSeconds(absl::Now() - started);
    // The effective canonical ratio (the controller's choice): settings with no effect count as 0. Calls
    // rejected before a job existed have no size ("unknown" resolution).
    const double ratio = job != nullptr ? tome::Canonical(job->effective_tome()).ratio : 0;
    const std::string model = job != nullptr ? job->key().model : "";
    metrics->ObserveRequest(model, ratio, job != nullptr ? job->key().width : 0, job != nullptr ? job->key().height : 0,
                            code, total);
    metrics->CountTenantRequest(tenant, code);
    if (job != nullptr) {
      tenant_limits.Release(job->request().tenant);
      metrics->AddInflight(-1);
      if (job->request().latency_target_seconds > 0)
        metrics->CountSloOutcome(model, result.ok() && total <= job->request().latency_target_seconds);
    }
    if (result.ok() && result->slo.applied) metrics->CountSloDecision(model, ratio, result->slo.target_met);
    const std::string id = job != nullptr ? job->request().request_id : request.request_id();
    std::string key = job != nullptr ? ToString(job->key()) : "-";
    if (log_prompts) absl::StrAppend(&key, PromptsForLog(request));
    if (result.ok()) {
      spdlog::info(
          "{} id={} {} ratio={} images={} batch_size={} queue={:.3f}s text={:.3f}s denoise={:.3f}s "
          "decode={:.3f}s total={:.3f}s status=OK",
          rpc, id, key, RatioLabel(result->tome.ratio), result->images.size(), result->batch_size, result->queue_seconds,
          result->text_encoding_seconds, result->denoising_seconds, result->decoding_seconds, total);
    } else {
      spdlog::info("{} id={} {} total={:.3f}s status={} message=\"{}\"", rpc, id, key, total,
                   absl::StatusCodeToString(code), std::string(result.status().message()));
    }
  }
};

namespace {

// Generate: answered by whichever thread finishes the job.
class GenerateReactor final : public grpc::ServerUnaryReactor, public JobObserver {
 public:
  GenerateReactor(std::shared_ptr<ImageGeneratorService::Context> ctx, grpc::CallbackServerContext* call,
                  const v1::GenerateRequest* request, v1::GenerateResponse* response)
      : ctx_(std::move(ctx)), request_(request), response_(response) {
    absl::StatusOr<std::shared_ptr<Job>> job = ctx_->MakeJob(call, *request, this, &tenant_);
    if (!job.ok()) {
      OnDone(job.status());
      return;
    }
    job_ = *job;
    // A local reference: Finish may end the call and delete this reactor (and its job_) before it returns.
    std::shared_ptr<Job> keep = job_;
    if (absl::Status s = ctx_->scheduler->Enqueue(keep); !s.ok()) keep->Finish(s);
  }

  void OnDone(const absl::StatusOr<GenerationResult>& result) override {
    ctx_->Record("Generate", *request_, job_.get(), tenant_, result, started_);
    if (result.ok()) ToProto(job_->request(), *result, response_);
    Finish(ToGrpcStatus(result.status()));
  }

  void OnCancel() override { ctx_->Cancel(job_.get()); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<ImageGeneratorService::Context> ctx_;
  const v1::GenerateRequest* request_;
  v1::GenerateResponse* response_;
  std::shared_ptr<Job> job_;
  std::string tenant_;  // empty until authenticated
  const absl::Time started_ = absl::Now();
};

// GenerateStream: queue positions and progress as they happen (a newer progress event replaces one not yet
// sent), then the result, then Finish. One write in flight at a time; events queue behind it.
class GenerateStreamReactor final : public grpc::ServerWriteReactor<v1::GenerateEvent>, public JobObserver {
 public:
  GenerateStreamReactor(std::shared_ptr<ImageGeneratorService::Context> ctx,
                        grpc::CallbackServerContext* call, const v1::GenerateRequest* request)
      : ctx_(std::move(ctx)), request_(request) {
    absl::StatusOr<std::shared_ptr<Job>> job = ctx_->MakeJob(call, *request, this, &tenant_);
    if (!job.ok()) {
      OnDone(job.status());
      return;
    }
    job_ = *job;
    // A local reference: Finish may end the call and delete this reactor (and its job_) before it returns.
    std::shared_ptr<Job> keep = job_;
    if (absl::Status s = ctx_->scheduler->Enqueue(keep); !s.ok()) keep->Finish(s);
  }

  void OnQueued(const QueuedInfo& info) override {
    v1::GenerateEvent e;
    e.mutable_queued()->set_position(static_cast<uint32_t>(info.position));
    if (info.estimated_start_seconds >= 0) e.mutable_queued()->set_estimated_start_seconds(info.estimated_start_seconds);
    if (info.estimated_finish_seconds >= 0)
      e.mutable_queued()->set_estimated_finish_seconds(info.estimated_finish_seconds);
    Send(std::move(e), /*replaceable=*/true);
  }
  void OnProgress(int step, int num_steps) override {
    v1::GenerateEvent e;
    e.mutable_progress()->set_step(static_cast<uint32_t>(step));
    e.mutable_progress()->set_num_steps(static_cast<uint32_t>(num_steps));
    Send(std::move(e), /*replaceable=*/true);
  }
  void OnDone(const absl::StatusOr<GenerationResult>& result) override {
    ctx_->Record("GenerateStream", *request_, job_.get(), tenant_, result, started_);
    Next next;
    grpc::Status status = ToGrpcStatus(result.status());
    {
      absl::MutexLock lock(&mu_);
      if (result.ok()) {
        v1::GenerateEvent e;
        ToProto(job_->request(), *result, e.mutable_result());
        pending_.push_back({std::move(e), false});
      }
      finishing_ = true;
      final_status_ = status;
      next = DecideLocked();
    }
    Carry(next, status);
  }

  void OnWriteDone(bool ok) override {
    Next next;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) pending_.clear();  // the stream is broken: nothing more can be sent
      next = DecideLocked();
      status = final_status_;
    }
    Carry(next, status);
  }
  void OnCancel() override { ctx_->Cancel(job_.get()); }
  void OnDone() override { delete this; }

 private:
  struct Pending {
    v1::GenerateEvent event;
    bool replaceable;
  };

  void Send(v1::GenerateEvent event, bool replaceable) {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      if (finishing_) return;
      if (!pending_.empty() && pending_.back().replaceable) pending_.pop_back();
      pending_.push_back({std::move(event), replaceable});
      next = DecideLocked();
    }
    Carry(next, grpc::Status::OK);
  }

  // What to do after leaving the lock: start the next write, Finish once everything is written, or nothing
  // (a write is in flight; its OnWriteDone continues). The decision is made under the lock and carried out
  // without it (a reaction may run inline); a thread that decided "nothing" must not touch the object again,
  // because after Finish gRPC may delete it (OnDone) at any moment.
  enum class Next { kNothing, kWrite, kFinish };
  Next DecideLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return Next::kNothing;
    if (!pending_.empty()) {
      current_ = std::move(pending_.front().event);
      pending_.pop_front();
      writing_ = true;
      return Next::kWrite;
    }
    if (finishing_) {
      finished_ = true;
      return Next::kFinish;
    }
    return Next::kNothing;
  }
  void Carry(Next next, grpc::Status status) {
    if (next == Next::kWrite) StartWrite(&current_);
    if (next == Next::kFinish) Finish(status);
  }

  std::shared_ptr<ImageGeneratorService::Context> ctx_;
  const v1::GenerateRequest* request_;
  std::shared_ptr<Job> job_;
  std::string tenant_;  // empty until authenticated
  const absl::Time started_ = absl::Now();
  absl::Mutex mu_;
  std::deque<Pending> pending_ ABSL_GUARDED_BY(mu_);
  v1::GenerateEvent current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

void ImageGeneratorService::set_log_prompts(bool on) { context_->log_prompts = on; }

ImageGeneratorService::ImageGeneratorService(RequestLimits limits, Scheduler* scheduler, Metrics* metrics,
                                             TokenAuth* auth)
    : context_(std::make_shared<Context>()) {
  context_->auth = auth;
  context_->limits = limits;
  context_->scheduler = scheduler;
  context_->metrics = metrics;
}

void ImageGeneratorService::SetCatalog(ModelCatalog catalog) {
  context_->catalog_storage = std::make_unique<ModelCatalog>(std::move(catalog));
  context_->catalog.store(context_->catalog_storage.get());
}

grpc::ServerUnaryReactor* ImageGeneratorService::Generate(grpc::CallbackServerContext* context,
                                                          const v1::GenerateRequest* request,
                                                          v1::GenerateResponse* response) {
  return new GenerateReactor(context_, context, request, response);
}

grpc::ServerWriteReactor<v1::GenerateEvent>* ImageGeneratorService::GenerateStream(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return new GenerateStreamReactor(context_, context, request);
}

grpc::ServerUnaryReactor* ImageGeneratorService::ListModels(grpc::CallbackServerContext* context,
                                                            const v1::ListModelsRequest*,
                                                            v1::ListModelsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status s = context_->Authenticate(context).status(); !s.ok()) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  const ModelCatalog* models = context_->catalog.load();
  if (models == nullptr) {
    reactor->Finish(ToGrpcStatus(absl::UnavailableError("the server is loading its models; retry shortly")));
    return reactor;
  }
  for (const ModelDescription& m : models->models) {
    v1::ModelInfo* info = response->add_models();
    info->set_name(m.name);
    info->set_native_width(static_cast<uint32_t>(m.native_width));
    info->set_native_height(static_cast<uint32_t>(m.native_height));
    info->set_default_scheduler(ToProto(m.default_scheduler));
    for (const std::string& d : m.devices) info->add_devices(d);
    info->set_dtype(m.dtype);
    const RequestLimits& l = context_->limits;
    info->set_default_tome_ratio(static_cast<float>(l.default_tome_ratio));
    v1::RequestLimits* limits = info->mutable_limits();
    limits->set_max_side(static_cast<uint32_t>(l.max_side));
    limits->set_max_pixels(static_cast<uint64_t>(l.max_pixels));
    limits->set_max_steps(static_cast<uint32_t>(l.max_steps));
    limits->set_max_images(static_cast<uint32_t>(l.max_images));
    limits->set_max_prompt_tokens(static_cast<uint32_t>(l.max_prompt_tokens));
    limits->set_max_prompt_bytes(static_cast<uint32_t>(l.max_prompt_bytes));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace tomeserve::server
