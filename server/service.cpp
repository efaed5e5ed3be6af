#include "server/service.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <deque>
#include <optional>

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

// The call's deadline; infinite when the client set none.
absl::Time Deadline(const grpc::CallbackServerContext* call) {
  const auto deadline = call->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

// Generate: answered by whichever thread finishes the job.
class GenerateReactor final : public grpc::ServerUnaryReactor, public JobObserver {
 public:
  GenerateReactor(GenerateFront* front, grpc::CallbackServerContext* call, const v1::GenerateRequest* request,
                  v1::GenerateResponse* response)
      : front_(front), request_(request), response_(response) {
    absl::StatusOr<std::shared_ptr<Job>> job =
        front_->MakeJob(Authorization(call), Deadline(call), *request, this, &tenant_);
    if (!job.ok()) {
      OnDone(job.status());  // may end the call: nothing touches this reactor afterwards
      return;
    }
    // Set before Submit: the job may finish (and OnDone read job_) on another thread at once.
    job_ = *std::move(job);
    front_->Submit(job_);
  }

  void OnDone(const absl::StatusOr<GenerationResult>& result) override {
    front_->Record("Generate", *request_, job_.get(), tenant_, result, started_);
    if (result.ok()) ToProto(job_->request(), *result, response_);
    Finish(ToGrpcStatus(result.status()));
  }

  void OnCancel() override { front_->Cancel(job_.get()); }
  void OnDone() override { delete this; }

 private:
  GenerateFront* const front_;
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
  GenerateStreamReactor(GenerateFront* front, grpc::CallbackServerContext* call, const v1::GenerateRequest* request)
      : front_(front), request_(request) {
    absl::StatusOr<std::shared_ptr<Job>> job =
        front_->MakeJob(Authorization(call), Deadline(call), *request, this, &tenant_);
    if (!job.ok()) {
      OnDone(job.status());  // may end the call: nothing touches this reactor afterwards
      return;
    }
    // Set before Submit: the job may finish (and OnDone read job_) on another thread at once.
    job_ = *std::move(job);
    front_->Submit(job_);
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
    front_->Record("GenerateStream", *request_, job_.get(), tenant_, result, started_);
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
  void OnCancel() override { front_->Cancel(job_.get()); }
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

  GenerateFront* const front_;
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

grpc::ServerUnaryReactor* ImageGeneratorService::Generate(grpc::CallbackServerContext* context,
                                                          const v1::GenerateRequest* request,
                                                          v1::GenerateResponse* response) {
  return new GenerateReactor(front_, context, request, response);
}

grpc::ServerWriteReactor<v1::GenerateEvent>* ImageGeneratorService::GenerateStream(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return new GenerateStreamReactor(front_, context, request);
}

grpc::ServerUnaryReactor* ImageGeneratorService::ListModels(grpc::CallbackServerContext* context,
                                                            const v1::ListModelsRequest*,
                                                            v1::ListModelsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status s = front_->Authenticate(Authorization(context)).status(); !s.ok()) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  const ModelCatalog* models = front_->catalog();
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
    info->set_family(m.family);
    for (int d : m.tome_downsamples) info->add_tome_downsamples(static_cast<uint32_t>(d));
    const RequestLimits& l = front_->limits();
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
