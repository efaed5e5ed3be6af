#include "pipeline/weight_store.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {

absl::Status WeightStore::AddFile(std::unique_ptr<SafetensorsFile> file) {
  for (const TensorRecord& rec : file->tensors()) {
    auto [it, inserted] = entries_.emplace(rec.name, Entry{file.get(), &rec});
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", rec.name, "\" appears in both ",
                                                     it->second.file->path().string(), " and ",
                                                     file->path().string()));
    }
  }
  files_.push_back(std::move(file));
  return absl::OkStatus();
}

absl::StatusOr<WeightStore> WeightStore::OpenFile(const std::filesystem::path& path) {
  WeightStore store;
  store.source_ = path.string();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  if (absl::Status s = store.AddFile(*std::move(file)); !s.ok()) return s;
  return store;
}

absl::StatusOr<WeightStore> WeightStore::OpenComponent(const std::filesystem::path& dir, absl::string_view stem) {
  const std::filesystem::path single = dir / absl::StrCat(stem, ".safetensors");
  if (std::filesystem::exists(single)) return OpenFile(single);

  const std::filesystem::path index_path = dir / absl::StrCat(stem, ".safetensors.index.json");
  if (!std::filesystem::exists(index_path)) {
    return absl::NotFoundError(absl::StrCat("no weights in ", dir.string(), ": expected ", single.filename().string(),
                                            " or ", index_path.filename().string(),
                                            " (only safetensors weights are supported)"));
  }
  std::ifstream in(index_path);
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json index = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
      !index["weight_map"].is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path.string(), ": not a safetensors index (need an object with \"weight_map\")"));
  }
  // shard file -> tensors the index says it holds
  std::map<std::string, std::vector<std::string>> shards;
  for (auto& [name, shard] : index["weight_map"].items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map[\"", name, "\"] is not a string"));
    }
    const std::string file = shard.get<std::string>();
    if (file.find('/') != std::string::npos || file == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": shard name \"", file, "\" must be a plain file name"));
    }
    shards[file].push_back(name);
  }
  WeightStore store;
  store.source_ = index_path.string();
  for (auto& [file, names] : shards) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> shard = SafetensorsFile::Open(dir / file);
    if (!shard.ok()) return shard.status();
    for (const std::string& name : names) {
      if ((*shard)->Find(name) == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": tensor \"", name, "\" is mapped to ",
                                                       file, " but that shard does not contain it"));
      }
    }
    if (absl::Status s = store.AddFile(*std::move(shard)); !s.ok()) return s;
  }
  return store;
}

const WeightStore::Entry* WeightStore::Find(absl::string_view name) const {
  auto it = entries_.find(std::string(name));
  return it == entries_.end() ? nullptr : &it->second;
}

std::vector<std::string> WeightStore::Names() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace tomeserve::pipeline
