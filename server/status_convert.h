// The one place an absl::Status becomes a wire status: a grpc::Status (the codes line up one to one) or an
// HTTP status code (the HTTP front door; the mapping of google.rpc.Code to HTTP that grpc-gateway uses).
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace tomeserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

// 200 for OK; INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE 400; UNAUTHENTICATED 401; PERMISSION_DENIED 403;
// NOT_FOUND 404; ALREADY_EXISTS, ABORTED 409; RESOURCE_EXHAUSTED 429; CANCELLED 499; UNIMPLEMENTED 501;
// UNAVAILABLE 503; DEADLINE_EXCEEDED 504; the rest 500.
int HttpStatusCode(absl::StatusCode code);

}  // namespace tomeserve::server
