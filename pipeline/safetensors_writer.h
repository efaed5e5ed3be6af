// Writes tensors to a safetensors file (the format SafetensorsFile reads): used for --save-latents and by tests.
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/status.h"

namespace tomeserve::pipeline {

// Tensors must be F32, F16 or BF16 (any device; copied to CPU). Names must be unique. The file is written to a
// temporary name and renamed, so a reader never sees a half-written file.
absl::Status SaveSafetensors(const std::filesystem::path& path,
                             const std::vector<std::pair<std::string, at::Tensor>>& tensors);

}  // namespace tomeserve::pipeline
