#include "pipeline/device.h"

#include <charconv>

#include <ATen/ATen.h>
#include <torch/cuda.h>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace tomeserve::pipeline {

absl::StatusOr<c10::Device> ParseDevice(absl::string_view text) {
  if (text == "cpu") return c10::Device(c10::kCPU);
  int index = 0;
  if (absl::StartsWith(text, "cpu:")) {
    // A name for one of several CPU workers (the server's --devices cpu:0,cpu:1); the device is the CPU.
    absl::string_view digits = text.substr(4);
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
    if (ec != std::errc() || end != digits.data() + digits.size() || digits.empty() || index < 0 || index > 255) {
      return absl::InvalidArgumentError(absl::StrCat("device \"", text, "\": expected cpu, cpu:N, cuda or cuda:N"));
    }
    return c10::Device(c10::kCPU);
  }
  if (text == "cuda") {
    index = 0;
  } else if (absl::StartsWith(text, "cuda:")) {
    absl::string_view digits = text.substr(5);
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
    if (ec != std::errc() || end != digits.data() + digits.size() || digits.empty() || index < 0 || index > 255) {
      return absl::InvalidArgumentError(absl::StrCat("device \"", text, "\": expected cpu, cpu:N, cuda or cuda:N"));
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat("device \"", text, "\": expected cpu, cpu:N, cuda or cuda:N"));
  }
  const int64_t count = torch::cuda::is_available() ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
  if (index >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("device \"", text, "\": only ", count, " CUDA device(s) visible"));
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

absl::StatusOr<c10::ScalarType> ParseComputeDType(absl::string_view text) {
  if (text == "fp32" || text == "float32") return c10::kFloat;
  if (text == "fp16" || text == "float16") return c10::kHalf;
  if (text == "bf16" || text == "bfloat16") return c10::kBFloat16;
  return absl::InvalidArgumentError(absl::StrCat("dtype \"", text, "\": expected fp32, fp16 or bf16"));
}

at::Tensor ToDeviceAsync(const at::Tensor& host, const c10::Device& device) {
  if (host.device() == device) return host;
  if (!device.is_cuda() || !host.device().is_cpu()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

std::string ComputeDTypeName(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat: return "fp32";
    case c10::kHalf: return "fp16";
    case c10::kBFloat16: return "bf16";
    default: return c10::toString(dtype);
  }
}

}  // namespace tomeserve::pipeline
