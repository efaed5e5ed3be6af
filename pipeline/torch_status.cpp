#include "pipeline/torch_status.h"

#include "absl/strings/cord.h"
#include "absl/strings/match.h"

namespace tomeserve::pipeline {

absl::string_view FirstLine(absl::string_view message) {
  const size_t nl = message.find('\n');
  return nl == absl::string_view::npos ? message : message.substr(0, nl);
}

absl::Status OutOfMemoryError(absl::string_view message) {
  absl::Status status = absl::ResourceExhaustedError(message);
  status.SetPayload(kOutOfMemoryPayload, absl::Cord("1"));
  return status;
}

bool IsOutOfMemory(const absl::Status& status) {
  return status.code() == absl::StatusCode::kResourceExhausted &&
         status.GetPayload(kOutOfMemoryPayload).has_value();
}

}  // namespace tomeserve::pipeline

namespace tomeserve::pipeline {

absl::Status DeviceFatalError(absl::string_view message) {
  absl::Status status = absl::InternalError(message);
  status.SetPayload(kDeviceFatalPayload, absl::Cord("1"));
  return status;
}

bool IsDeviceFatal(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInternal && status.GetPayload(kDeviceFatalPayload).has_value();
}

bool LooksDeviceFatal(absl::string_view message) {
  for (absl::string_view marker : {"CUDA error", "cudaError", "device-side assert", "illegal memory access",
                                   "CUBLAS_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_EXECUTION_FAILED",
                                   "unspecified launch failure", "uncorrectable ECC error"}) {
    if (absl::StrContains(message, marker)) return true;
  }
  return false;
}

}  // namespace tomeserve::pipeline
