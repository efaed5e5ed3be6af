#include "pipeline/weight_store.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
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

absl::StatusOr<WeightStore> WeightStore::OpenComponent(const std::filesystem::path& dir, absl::string_view stem,
                                                       absl::string_view variant) {
  if (!variant.empty()) {
    const std::filesystem::path file = dir / absl::StrCat(stem, ".", variant, ".safetensors");
    if (std::filesystem::exists(file)) return OpenFile(file);
    const std::filesystem::path index = dir / absl::StrCat(stem, ".safetensors.index.", variant, ".json");
    if (std::filesystem::exists(index)) return OpenIndex(dir, index);
    std::vector<std::string> present;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      const std::string name = entry.path().filename().string();
      if (absl::StartsWith(name, stem) && (absl::EndsWith(name, ".safetensors") || absl::EndsWith(name, ".json")) &&
          !absl::StrContains(name, "-of-")) {
        present.push_back(name);
      }
    }
    std::sort(present.begin(), present.end());
    return absl::NotFoundError(absl::StrCat("no \"", variant, "\" weights in ", dir.string(), ": expected ",
                                            file.filename().string(), " or ", index.filename().string(),
                                            " (the folder has: ", present.empty() ? "none" : absl::StrJoin(present, ", "),
                                            "); drop --variant to load the plain weights"));
  }
  const std::filesystem::path single = dir / absl::StrCat(stem, ".safetensors");
  if (std::filesystem::exists(single)) return OpenFile(single);

  const std::filesystem::path index_path = dir / absl::StrCat(stem, ".safetensors.index.json");
  if (std::filesystem::exists(index_path)) return OpenIndex(dir, index_path);

  // No plain weights: diffusers' variant files (Hugging Face folders often carry only fp16 ones), named
  // <stem>.<variant>.safetensors or, sharded, <stem>.safetensors.index.<variant>.json, are used when they are
  // the only variant present.
  std::map<std::string, std::filesystem::path> variants;  // variant -> its file or index
  const std::string file_prefix = absl::StrCat(stem, "."), index_prefix = absl::StrCat(stem, ".safetensors.index.");
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    std::string variant;
    if (absl::StartsWith(name, index_prefix) && absl::EndsWith(name, ".json")) {
      variant = name.substr(index_prefix.size(), name.size() - index_prefix.size() - 5);
    } else if (absl::StartsWith(name, file_prefix) && absl::EndsWith(name, ".safetensors")) {
      variant = name.substr(file_prefix.size(), name.size() - file_prefix.size() - 12);
    }
    // Shards of a sharded variant (<stem>.fp16-00001-of-00002.safetensors) are read through its index.
    if (variant.empty() || absl::StrContains(variant, '.') || absl::StrContains(variant, '-')) continue;
    variants[variant] = entry.path();
  }
  if (variants.size() == 1) {
    const std::filesystem::path& path = variants.begin()->second;
    return absl::EndsWith(path.filename().string(), ".json") ? OpenIndex(dir, path) : OpenFile(path);
  }
  if (variants.size() > 1) {
    std::vector<std::string> names;
    for (const auto& [variant, path] : variants) names.push_back(path.filename().string());
    return absl::InvalidArgumentError(absl::StrCat("several weight variants in ", dir.string(), " (",
                                                   absl::StrJoin(names, ", "), ") and no ", single.filename().string(),
                                                   ": keep one variant in the folder"));
  }
  return absl::NotFoundError(absl::StrCat("no weights in ", dir.string(), ": expected ", single.filename().string(),
                                          " or ", index_path.filename().string(),
                                          " or one variant of them such as ", stem,
                                          ".fp16.safetensors (only safetensors weights are supported)"));
}

absl::StatusOr<WeightStore> WeightStore::OpenIndex(const std::filesystem::path& dir,
                                                   const std::filesystem::path& index_path) {
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
