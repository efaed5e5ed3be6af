// The weights of one model component (text_encoder/, unet/, vae/): a single safetensors file or a sharded set
// described by an index json. Torch-free; tensors are handed out as TensorRecords that point into the mapped files.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "pipeline/safetensors.h"

namespace tomeserve::pipeline {

class WeightStore {
 public:
  // Opens `dir/<stem>.safetensors`, or, when that is absent, `dir/<stem>.safetensors.index.json` and every shard
  // its weight_map names. `stem` is "model" for transformers components and "diffusion_pytorch_model" for
  // diffusers ones. A tensor listed twice, or listed in the index but missing from its shard, is an error.
  // Without either, diffusers' variant files (`<stem>.fp16.safetensors`, `<stem>.safetensors.index.fp16.json`)
  // are used when exactly one variant is present; several variants are an error naming them. A non-empty
  // `variant` (diffusers' `variant=`) asks for that one: `<stem>.<variant>.safetensors` or its sharded index,
  // else NOT_FOUND naming both names and the variants the folder has.
  static absl::StatusOr<WeightStore> OpenComponent(const std::filesystem::path& dir, absl::string_view stem,
                                                   absl::string_view variant = "");

  // A store over one already-opened file (tests, --init-latents).
  static absl::StatusOr<WeightStore> OpenFile(const std::filesystem::path& file);

  struct Entry {
    const SafetensorsFile* file;
    const TensorRecord* record;
  };
  const Entry* Find(absl::string_view name) const;
  // Tensor names in sorted order.
  std::vector<std::string> Names() const;
  size_t size() const { return entries_.size(); }
  // Human-readable origin for error messages: the single file, or the index json.
  const std::string& source() const { return source_; }

 private:
  // `index_path` and every shard (in `dir`) its weight_map names.
  static absl::StatusOr<WeightStore> OpenIndex(const std::filesystem::path& dir, const std::filesystem::path& index_path);
  absl::Status AddFile(std::unique_ptr<SafetensorsFile> file);

  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;  // owns the mappings the entries point into
  std::unordered_map<std::string, Entry> entries_;
};

}  // namespace tomeserve::pipeline
