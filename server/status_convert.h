// The one place an absl::Status becomes a grpc::Status (the codes line up one to one).
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace tomeserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace tomeserve::server
