#include "pipeline/torch_status.h"

#include "absl/strings/cord.h"

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
