// Fills a module tree from a WeightStore by name. The module's parameter and buffer names must equal the
// checkpoint keys (after `rename`); the check is strict, so a wrong architecture or a truncated checkpoint fails
// at load with the full list of what is missing and unexpected, never silently at inference.
#pragma once

#include <functional>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {

struct LoadOptions {
  // Checkpoint keys that may exist without a matching module entry (e.g. transformers' position_ids buffer).
  std::vector<std::string> ignore_unexpected;
  // Checkpoint keys under these prefixes may exist unused (e.g. "encoder." when only the VAE decoder is built).
  std::vector<std::string> ignore_unexpected_prefixes;
  // Maps a checkpoint key to the module key; used for legacy spellings. Identity when unset.
  std::function<std::string(absl::string_view)> rename;
  // Lays every 4-d parameter out channels-last before filling it (ComputeTarget::channels_last).
  bool channels_last_4d = false;
};

// Copies every parameter and buffer of `module` from `store`, converting from the storage dtype to the dtype and
// device the module was built with. Runs torch code; exceptions are mapped to Status inside.
absl::Status LoadWeights(torch::nn::Module& module, const WeightStore& store, const LoadOptions& options = {});

// One stored tensor as a CPU tensor of its storage dtype. The result owns its memory (it does not alias the
// mapping), so it outlives the store.
absl::StatusOr<at::Tensor> ReadTensor(const WeightStore& store, absl::string_view name);

}  // namespace tomeserve::pipeline
