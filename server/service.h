// The gRPC front end: tomeserve.v1.ImageGenerator on the callback API. Handlers run on gRPC threads and only
// validate (request_convert), enqueue (scheduler) and return; the scheduler or a worker finishes each call later
// through the reactor (a JobObserver). No torch code runs here.
//
// GenerateStream sends Queued{position, estimated start/finish} while queued, Progress{step, num_steps} after every UNet call (PNDM
// makes one call more than its step count), then one result event.
// With a TokenAuth, every call (ListModels included) first needs a valid bearer token (UNAUTHENTICATED).
// Until SetCatalog() (models loaded and warmed up) every call answers UNAVAILABLE. Every finished generate
// call is logged (one line: id, key, batch size, timings, status) and counted in Metrics.
#pragma once

#include <atomic>
#include <memory>

#include "server/scheduler.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/model_catalog.h"
#include "server/request_convert.h"
#include "tomeserve/v1/image_generator.grpc.pb.h"

namespace tomeserve::server {

class ImageGeneratorService final : public v1::ImageGenerator::CallbackService {
 public:
  // `scheduler`, `metrics` and `auth` (null: no authentication) must outlive the gRPC server.
  ImageGeneratorService(RequestLimits limits, Scheduler* scheduler, Metrics* metrics, TokenAuth* auth = nullptr);

  // Prompts in the per-call log line (--log-prompts); off by default: prompts are never logged. Call before
  // the server starts.
  void set_log_prompts(bool on);

  // Publishes the loaded models; called once, before health turns SERVING.
  void SetCatalog(ModelCatalog catalog);

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context, const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<v1::GenerateEvent>* GenerateStream(grpc::CallbackServerContext* context,
                                                              const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

  // Shared by the reactors (service.cpp).
  struct Context;

 private:
  std::shared_ptr<Context> context_;
};

}  // namespace tomeserve::server
