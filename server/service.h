// The gRPC front end: tomeserve.v1.ImageGenerator on the callback API. Handlers run on gRPC threads and only
// validate (request_convert), enqueue (scheduler) and return; the scheduler or a worker finishes each call later
// through the reactor (a JobObserver). No torch code runs here.
//
// Authentication, validation, tenant limits, the job and its log line and metrics are GenerateFront's, shared
// with the HTTP front door; this file is the gRPC wire only.
//
// GenerateStream sends Queued{position, estimated start/finish} while queued, Progress{step, num_steps} after every UNet call (PNDM
// makes one call more than its step count), then one result event.
// With a TokenAuth, every call (ListModels included) first needs a valid bearer token (UNAUTHENTICATED).
// Until GenerateFront::SetCatalog() (models loaded and warmed up) every call answers UNAVAILABLE.
#pragma once

#include <atomic>
#include <memory>

#include "server/generate_front.h"
#include "tomeserve/v1/image_generator.grpc.pb.h"

namespace tomeserve::server {

class ImageGeneratorService final : public v1::ImageGenerator::CallbackService {
 public:
  // `front` must outlive the gRPC server.
  explicit ImageGeneratorService(GenerateFront* front) : front_(front) {}

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context, const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<v1::GenerateEvent>* GenerateStream(grpc::CallbackServerContext* context,
                                                              const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

 private:
  GenerateFront* const front_;
};

}  // namespace tomeserve::server
