#include "pipeline/safetensors_writer.h"

#include <cstdio>
#include <fstream>
#include <set>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "pipeline/torch_status.h"

namespace tomeserve::pipeline {

absl::Status SaveSafetensors(const std::filesystem::path& path,
                             const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  return GuardTorch(absl::StrCat("writing ", path.string()), [&]() -> absl::Status {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    std::vector<at::Tensor> cpu;
    std::set<std::string> names;
    uint64_t offset = 0;
    for (const auto& [name, t] : tensors) {
      if (name == "__metadata__" || !names.insert(name).second) {
        return absl::InvalidArgumentError(absl::StrCat("duplicate or reserved tensor name \"", name, "\""));
      }
      const char* dtype = t.scalar_type() == at::kFloat      ? "F32"
                          : t.scalar_type() == at::kHalf     ? "F16"
                          : t.scalar_type() == at::kBFloat16 ? "BF16"
                                                             : nullptr;
      if (dtype == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\": dtype must be F32, F16 or BF16"));
      }
      at::Tensor c = t.detach().to(at::kCPU).contiguous();
      const uint64_t n = c.numel() * c.element_size();
      header[name] = {{"dtype", dtype}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
      offset += n;
      cpu.push_back(std::move(c));
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // keep the data buffer 8-byte aligned
    const std::filesystem::path tmp = path.string() + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) return absl::PermissionDeniedError(absl::StrCat(tmp.string(), ": cannot open for writing"));
      const uint64_t len = text.size();
      for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
      out.write(text.data(), static_cast<std::streamsize>(text.size()));
      for (const at::Tensor& c : cpu) {
        out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
      }
      if (!out.good()) return absl::DataLossError(absl::StrCat(tmp.string(), ": write failed"));
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) return absl::InternalError(absl::StrCat(path.string(), ": rename failed: ", ec.message()));
    return absl::OkStatus();
  });
}

}  // namespace tomeserve::pipeline
