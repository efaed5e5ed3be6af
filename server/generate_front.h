// The transport-neutral half of a generate call, shared by the gRPC service (server/service.h) and the HTTP front
// door (server/http_server.h), so both take one path to the scheduler: authenticate the caller, validate the
// request (request_convert), hold the tenant's limits, build and enqueue the Job; when it finishes, one log line
// and the call's metrics. A transport only translates its wire format into a v1::GenerateRequest and the result
// back. Torch-free; every method may be called from any thread.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/auth.h"
#include "server/job.h"
#include "server/metrics.h"
#include "server/model_catalog.h"
#include "server/request_convert.h"
#include "server/scheduler.h"
#include "server/tenants.h"
#include "tomeserve/v1/image_generator.pb.h"

namespace tomeserve::server {

class GenerateFront {
 public:
  // `scheduler`, `metrics` and `auth` (null: no authentication) must outlive every transport using this.
  GenerateFront(RequestLimits limits, Scheduler* scheduler, Metrics* metrics, TokenAuth* auth);

  // Prompts in the per-call log line (--log-prompts); off by default. Call before serving.
  void set_log_prompts(bool on) { log_prompts_ = on; }
  // Publishes the loaded models; called once, before health turns SERVING.
  void SetCatalog(ModelCatalog catalog);
  // The loaded models, or null while they load.
  const ModelCatalog* catalog() const { return catalog_.load(); }
  const RequestLimits& limits() const { return limits_; }
  // The caller's tenant ("default" without authentication), or UNAUTHENTICATED. `authorization` is the
  // call's "authorization" header or metadata value, if any.
  absl::StatusOr<TenantSpec> Authenticate(std::optional<absl::string_view> authorization) const;

  // Authenticates, validates and builds the job (a tenant slot and an in-flight count held until Record). On
  // error returns the status to answer with and no job exists. `tenant_name` is set once the caller is
  // authenticated (for Record, also when the call is refused after that).
  absl::StatusOr<std::shared_ptr<Job>> MakeJob(std::optional<absl::string_view> authorization, absl::Time deadline,
                                               const v1::GenerateRequest& request, JobObserver* observer,
                                               std::string* tenant_name);
  // Queues a job from MakeJob; when the scheduler refuses it (queue full, stopped) the job finishes with that
  // status (its observer's OnDone runs on this thread).
  void Submit(const std::shared_ptr<Job>& job);
  // A call's cancellation: the job is dropped if still queued or leaves its batch at the next step boundary.
  // `job` may be null (refused before it existed).
  void Cancel(Job* job);
  // One log line and the metrics of a finished generate call; every call that reached MakeJob comes here
  // exactly once. `rpc` names the route in the log ("Generate", "POST /v1/images/generations").
  void Record(absl::string_view rpc, const v1::GenerateRequest& request, const Job* job, const std::string& tenant,
              const absl::StatusOr<GenerationResult>& result, absl::Time started);

 private:
  const RequestLimits limits_;
  Scheduler* const scheduler_;
  Metrics* const metrics_;
  TokenAuth* const auth_;
  TenantLimits tenant_limits_;
  bool log_prompts_ = false;
  const RandomSource random_ = RandomSource::Default();
  std::unique_ptr<ModelCatalog> catalog_storage_;
  std::atomic<const ModelCatalog*> catalog_{nullptr};
};

}  // namespace tomeserve::server
