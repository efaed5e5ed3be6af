#include "pipeline/load_weights.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <set>
#include <unordered_map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pipeline/huge_pages.h"
#include "pipeline/torch_status.h"

namespace tomeserve::pipeline {
namespace {

c10::ScalarType TorchDType(StorageDType dtype) {
  switch (dtype) {
    case StorageDType::kF16: return c10::kHalf;
    case StorageDType::kBF16: return c10::kBFloat16;
    default: return c10::kFloat;  // callers check IsLoadable() first
  }
}

absl::Status CheckLoadable(const WeightStore::Entry& entry) {
  if (IsLoadable(entry.record->dtype)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(entry.file->path().string(), ": tensor \"", entry.record->name,
                                                 "\" has dtype ", StorageDTypeName(entry.record->dtype),
                                                 "; weights must be F32, F16 or BF16"));
}

// A CPU view of the mapped bytes when they are suitably aligned (the usual case: writers pad the header to 8
// bytes), else an aligned copy. Only valid while the store is alive; callers copy out of it immediately.
at::Tensor ViewRecord(const TensorRecord& rec) {
  const auto dtype = TorchDType(rec.dtype);
  void* ptr = const_cast<std::byte*>(rec.data.data());
  if (reinterpret_cast<uintptr_t>(ptr) % StorageDTypeSize(rec.dtype) == 0) {
    return at::from_blob(ptr, rec.shape, at::TensorOptions().dtype(dtype));
  }
  at::Tensor out = at::empty(rec.shape, at::TensorOptions().dtype(dtype));
  std::memcpy(out.data_ptr(), rec.data.data(), rec.data.size());
  return out;
}

std::string ListSome(const std::vector<std::string>& names) {
  constexpr size_t kShown = 12;
  std::vector<std::string> shown(names.begin(), names.begin() + std::min(names.size(), kShown));
  std::string out = absl::StrJoin(shown, ", ");
  if (names.size() > kShown) absl::StrAppend(&out, ", ... (", names.size() - kShown, " more)");
  return out;
}

// CPU weights live in one arena that asks the kernel for transparent huge pages (MADV_HUGEPAGE; most kernels
// default THP to "madvise"), instead of one 4 KiB-paged allocation each. The UNet's low-resolution convolutions
// read up to 59 MB of weights per call for a few output pixels, and with 4 KiB pages the TLB misses made them ~1.6x
// slower than diffusers' (whose weights stay in the safetensors file's page cache, in large folios); see
// docs/benchmarks.md. Each tensor starts on a 64-byte boundary; the arena lives as long as any tensor in it.
// Falls back to leaving the tensors where they are when the arena cannot be allocated.
void MoveIntoHugePageArena(const std::vector<at::Tensor>& tensors) {
  constexpr size_t kAlign = 64;
  const auto aligned = [](size_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
  size_t total = 0;
  for (const at::Tensor& t : tensors) total += aligned(t.nbytes());
  if (total == 0) return;
  std::shared_ptr<void> arena = AllocateHugePages(total);
  if (arena == nullptr) return;
  size_t offset = 0;
  for (const at::Tensor& t : tensors) {
    void* data = static_cast<std::byte*>(arena.get()) + offset;
    offset += aligned(t.nbytes());
    at::Tensor placed = at::from_blob(data, t.sizes(), t.strides(), [arena](void*) {}, t.options());
    // set_data swaps the storage of the module's own tensor (parameter or buffer), so the module sees it.
    at::Tensor(t).set_data(placed);
  }
}

}  // namespace

absl::StatusOr<at::Tensor> ReadTensor(const WeightStore& store, absl::string_view name) {
  const WeightStore::Entry* entry = store.Find(name);
  if (entry == nullptr) return absl::NotFoundError(absl::StrCat(store.source(), ": no tensor \"", name, "\""));
  if (absl::Status s = CheckLoadable(*entry); !s.ok()) return s;
  return GuardTorch(absl::StrCat(entry->file->path().string(), ": tensor \"", name, "\""),
                    [&]() -> absl::StatusOr<at::Tensor> { return ViewRecord(*entry->record).clone(); });
}

absl::Status LoadWeights(torch::nn::Module& module, const WeightStore& store, const LoadOptions& options) {
  return GuardTorch(absl::StrCat("loading ", store.source()), [&]() -> absl::Status {
    std::unordered_map<std::string, at::Tensor> targets;
    for (const auto& item : module.named_parameters(/*recurse=*/true)) targets.emplace(item.key(), item.value());
    for (const auto& item : module.named_buffers(/*recurse=*/true)) targets.emplace(item.key(), item.value());
    const std::set<std::string> ignored(options.ignore_unexpected.begin(), options.ignore_unexpected.end());

    std::vector<std::string> unexpected;
    std::set<std::string> seen;
    std::vector<std::pair<at::Tensor, const WeightStore::Entry*>> copies;
    for (const std::string& key : store.Names()) {
      const std::string target = options.rename ? options.rename(key) : key;
      auto it = targets.find(target);
      if (it == targets.end()) {
        const bool prefixed = std::any_of(options.ignore_unexpected_prefixes.begin(),
                                          options.ignore_unexpected_prefixes.end(),
                                          [&](const std::string& p) { return absl::StartsWith(key, p); });
        if (!ignored.contains(key) && !prefixed) unexpected.push_back(key);
        continue;
      }
      if (!seen.insert(target).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(store.source(), ": two checkpoint tensors map to \"", target, "\" (one is \"", key, "\")"));
      }
      copies.emplace_back(it->second, store.Find(key));
    }
    std::vector<std::string> missing;
    for (const auto& [name, tensor] : targets) {
      if (!seen.contains(name)) missing.push_back(name);
    }
    std::sort(missing.begin(), missing.end());
    if (!missing.empty() || !unexpected.empty()) {
      std::string msg = absl::StrCat(store.source(), ": checkpoint does not match the architecture in config.json");
      if (!missing.empty()) absl::StrAppend(&msg, "; missing ", missing.size(), ": ", ListSome(missing));
      if (!unexpected.empty()) absl::StrAppend(&msg, "; unexpected ", unexpected.size(), ": ", ListSome(unexpected));
      return absl::InvalidArgumentError(msg);
    }

    at::NoGradGuard no_grad;
    if (options.channels_last_4d) {
      // Only the layout changes here (the values are copied in below); set_data keeps the module's own tensor.
      for (const auto& item : module.named_parameters(/*recurse=*/true)) {
        at::Tensor p = item.value();
        if (p.dim() == 4) p.set_data(at::empty_like(p, p.options(), at::MemoryFormat::ChannelsLast));
      }
    }
    std::vector<at::Tensor> cpu_targets;
    for (const auto& [name, tensor] : targets) {
      if (tensor.device().is_cpu()) cpu_targets.push_back(tensor);
    }
    MoveIntoHugePageArena(cpu_targets);
    for (auto& [target, entry] : copies) {
      const TensorRecord& rec = *entry->record;
      if (absl::Status s = CheckLoadable(*entry); !s.ok()) return s;
      if (target.sizes() != at::IntArrayRef(rec.shape)) {
        return absl::InvalidArgumentError(absl::StrCat(entry->file->path().string(), ": tensor \"", rec.name,
                                                       "\" has shape [", absl::StrJoin(rec.shape, ", "),
                                                       "] but the model expects [", absl::StrJoin(target.sizes(), ", "),
                                                       "]"));
      }
      target.copy_(ViewRecord(rec));
    }
    return absl::OkStatus();
  });
}

}  // namespace tomeserve::pipeline
