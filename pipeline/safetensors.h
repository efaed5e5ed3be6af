// Read-only, memory-mapped safetensors files. Torch-free on purpose: the parser is fuzzed and run under
// AddressSanitizer on its own, and the torch conversion lives in weights.cpp.
//
// Format: 8-byte little-endian header length N, N bytes of JSON header, then the data buffer. The header maps
// tensor names to {dtype, shape, data_offsets: [begin, end)} relative to the data buffer; "__metadata__" holds
// free-form strings. Every offset is checked before any byte of tensor data is exposed: a SafetensorsFile that
// Open() returned only hands out spans that lie inside the mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include "absl/strings/string_view.h"
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace tomeserve::pipeline {

// Every dtype of the safetensors spec is parsed (so sizes and offsets are validated and files such as real SD 1.x
// text encoders, which carry an int64 position_ids buffer, open), but only F32/F16/BF16 can be loaded as weights:
// IsLoadable() says which, and the loader rejects the others naming the tensor. A dtype string outside the spec
// is an error at Open().
enum class StorageDType {
  kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU64, kU32, kU16, kU8, kBool, kF8E4M3, kF8E5M2
};
absl::string_view StorageDTypeName(StorageDType dtype);
size_t StorageDTypeSize(StorageDType dtype);
bool IsLoadable(StorageDType dtype);

struct TensorRecord {
  std::string name;
  StorageDType dtype;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;  // points into the owning SafetensorsFile's mapping
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Headers above this size are rejected before parsing (the reference implementation uses the same bound).
  static constexpr uint64_t kMaxHeaderBytes = 100'000'000;

  // Maps and validates `path`. Errors name the file and, where one is at fault, the tensor.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::filesystem::path& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::filesystem::path& path() const { return path_; }
  // Tensors in data-offset order. Spans stay valid for the lifetime of this object.
  const std::vector<TensorRecord>& tensors() const { return tensors_; }
  const TensorRecord* Find(absl::string_view name) const;
  const std::unordered_map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile(std::filesystem::path path, void* map, size_t map_size)
      : path_(std::move(path)), map_(map), map_size_(map_size) {}
  absl::Status Parse();

  std::filesystem::path path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorRecord> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::unordered_map<std::string, std::string> metadata_;
};

}  // namespace tomeserve::pipeline
