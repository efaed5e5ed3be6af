// Where and in which precision a model runs. Parsed from user strings ("cpu", "cuda:1", "fp16") once, at load.
#pragma once

#include <optional>
#include <string>
#include "absl/strings/string_view.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"

namespace tomeserve::pipeline {

struct ComputeTarget {
  c10::Device device = c10::Device(c10::kCPU);
  c10::ScalarType dtype = c10::kFloat;
  // Convolution weights (the UNet's and VAE's 4-d parameters) stored channels-last, so oneDNN / cuDNN run the
  // convolutions NHWC. Unset: on the CPU (oneDNN is 8-12% faster NHWC there; docs/benchmarks.md), off on CUDA
  // (no gain measured on an H200, 5% slower at 1024x1024 batch 4).
  std::optional<bool> channels_last;

  bool use_channels_last() const { return channels_last.value_or(device.is_cpu()); }
};

// "cpu", "cuda" (= cuda:0) or "cuda:N". A CUDA device that is absent or out of range is an error here, so a
// misconfigured server fails at startup rather than on its first request.
absl::StatusOr<c10::Device> ParseDevice(absl::string_view text);
// "fp32" | "fp16" | "bf16" (also "float32", "float16", "bfloat16").
absl::StatusOr<c10::ScalarType> ParseComputeDType(absl::string_view text);
std::string ComputeDTypeName(c10::ScalarType dtype);

// `host` (a CPU tensor) on `device`, without making the host wait. On CUDA it is copied through pinned memory
// with a non-blocking copy on the current stream: a plain .to() from pageable memory waits for the stream to
// drain, so the CPU stops queueing the rest of a step ahead of the GPU (and stream capture is impossible). The
// pinned buffer outlives the copy (the caching host allocator records the stream before reusing it). Returns
// `host` itself when `device` is the CPU.
at::Tensor ToDeviceAsync(const at::Tensor& host, const c10::Device& device);

}  // namespace tomeserve::pipeline
