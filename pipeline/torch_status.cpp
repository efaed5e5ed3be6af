#include "pipeline/torch_status.h"

namespace tomeserve::pipeline {

absl::string_view FirstLine(absl::string_view message) {
  const size_t nl = message.find('\n');
  return nl == absl::string_view::npos ? message : message.substr(0, nl);
}

}  // namespace tomeserve::pipeline
