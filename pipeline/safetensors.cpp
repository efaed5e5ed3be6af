#include "pipeline/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {
namespace {

using json = nlohmann::json;

struct DTypeInfo {
  StorageDType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {StorageDType::kF32, "F32", 4},   {StorageDType::kF16, "F16", 2},   {StorageDType::kBF16, "BF16", 2},
    {StorageDType::kF64, "F64", 8},   {StorageDType::kI64, "I64", 8},   {StorageDType::kI32, "I32", 4},
    {StorageDType::kI16, "I16", 2},   {StorageDType::kI8, "I8", 1},     {StorageDType::kU64, "U64", 8},
    {StorageDType::kU32, "U32", 4},   {StorageDType::kU16, "U16", 2},   {StorageDType::kU8, "U8", 1},
    {StorageDType::kBool, "BOOL", 1}, {StorageDType::kF8E4M3, "F8_E4M3", 1}, {StorageDType::kF8E5M2, "F8_E5M2", 1},
};

absl::StatusOr<StorageDType> ParseDType(const std::string& s) {
  for (const DTypeInfo& d : kDTypes) {
    if (s == d.name) return d.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", s, "\""));
}

const DTypeInfo& Info(StorageDType dtype) {
  for (const DTypeInfo& d : kDTypes) {
    if (d.dtype == dtype) return d;
  }
  return kDTypes[0];
}

// Reads a JSON non-negative integer that fits in uint64_t.
bool AsU64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

}  // namespace

absl::string_view StorageDTypeName(StorageDType dtype) { return Info(dtype).name; }

size_t StorageDTypeSize(StorageDType dtype) { return Info(dtype).size; }

bool IsLoadable(StorageDType dtype) {
  return dtype == StorageDType::kF32 || dtype == StorageDType::kF16 || dtype == StorageDType::kBF16;
}

int64_t TensorRecord::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::filesystem::path& path) {
  const std::string where = path.string();
  int fd = ::open(where.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(where, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(where, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": truncated safetensors file (", size, " bytes, need at least 8 for the header length)"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return absl::InternalError(absl::StrCat(where, ": mmap failed: ", std::strerror(errno)));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile(path, map, size));
  if (absl::Status s = file->Parse(); !s.ok()) return s;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorRecord* SafetensorsFile::Find(absl::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status SafetensorsFile::Parse() {
  const std::string where = path_.string();
  const auto* bytes = static_cast<const std::byte*>(map_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::to_integer<uint64_t>(bytes[i]);
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header length ", header_len, " exceeds the limit of ", kMaxHeaderBytes, " bytes"));
  }
  if (header_len > map_size_ - 8) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": header length ", header_len,
                                                   " runs past the end of the file (", map_size_, " bytes)"));
  }
  const auto* header = reinterpret_cast<const char*>(bytes + 8);
  json doc = json::parse(header, header + header_len, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(where, ": header is not valid JSON"));
  if (!doc.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": header is not a JSON object"));

  const std::byte* data = bytes + 8 + header_len;
  const uint64_t data_size = map_size_ - 8 - header_len;
  struct Pending {
    TensorRecord record;
    uint64_t begin, end;
  };
  std::vector<Pending> pending;
  pending.reserve(doc.size());

  for (auto& item : doc.items()) {
    // Named, not a structured binding: lambdas below capture it (clang before 16 cannot capture bindings).
    const std::string& name = item.key();
    const nlohmann::json& entry = item.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": __metadata__ is not an object"));
      for (auto& [k, v] : entry.items()) {
        if (v.is_string()) metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    auto bad = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor \"", name, "\": ", what));
    };
    if (!entry.is_object()) return bad("entry is not an object");
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto off = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string()) return bad("missing or non-string \"dtype\"");
    if (sh == entry.end() || !sh->is_array()) return bad("missing or non-array \"shape\"");
    if (off == entry.end() || !off->is_array() || off->size() != 2) return bad("\"data_offsets\" must be [begin, end]");

    absl::StatusOr<StorageDType> dtype = ParseDType(dt->get<std::string>());
    if (!dtype.ok()) return bad(dtype.status().message());

    TensorRecord rec{name, *dtype, {}, {}};
    // Element count with overflow checks: a hostile shape must not wrap into a small, "valid" size.
    uint64_t numel = 1;
    for (const json& d : *sh) {
      uint64_t dim = 0;
      if (!AsU64(d, &dim) || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return bad("shape entries must be non-negative integers");
      }
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim) return bad("shape overflows");
      numel *= dim;
      rec.shape.push_back(static_cast<int64_t>(dim));
    }
    const uint64_t elem = StorageDTypeSize(*dtype);
    if (numel > std::numeric_limits<uint64_t>::max() / elem) return bad("shape overflows");
    uint64_t begin = 0, end = 0;
    if (!AsU64((*off)[0], &begin) || !AsU64((*off)[1], &end)) return bad("data_offsets must be non-negative integers");
    if (end < begin) return bad(absl::StrCat("data_offsets [", begin, ", ", end, ") are reversed"));
    if (end > data_size) {
      return bad(absl::StrCat("data_offsets [", begin, ", ", end, ") lie outside the data buffer of ", data_size,
                              " bytes (file truncated?)"));
    }
    if (end - begin != numel * elem) {
      return bad(absl::StrCat("shape [", absl::StrJoin(rec.shape, ", "), "] x ", StorageDTypeName(*dtype), " needs ",
                              numel * elem, " bytes but data_offsets span ", end - begin));
    }
    rec.data = std::span<const std::byte>(data + begin, end - begin);
    pending.push_back({std::move(rec), begin, end});
  }

  // Tensors must tile the data buffer: ordered, non-overlapping, no holes, nothing after the last one.
  std::stable_sort(pending.begin(), pending.end(), [](const Pending& a, const Pending& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  for (const Pending& p : pending) {
    if (p.begin < cursor) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor \"", p.record.name, "\": data_offsets [",
                                                     p.begin, ", ", p.end, ") overlap the previous tensor"));
    }
    if (p.begin > cursor) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor \"", p.record.name,
                                                     "\": gap in the data buffer before offset ", p.begin));
    }
    cursor = p.end;
  }
  if (cursor != data_size) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": data buffer has ", data_size - cursor,
                                                   " trailing bytes not covered by any tensor"));
  }
  tensors_.reserve(pending.size());
  for (Pending& p : pending) {
    index_.emplace(p.record.name, tensors_.size());
    tensors_.push_back(std::move(p.record));
  }
  return absl::OkStatus();
}

}  // namespace tomeserve::pipeline
