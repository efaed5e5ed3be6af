// What the gRPC side knows about the loaded models: a torch-free description per model, filled once by main
// after loading (before health turns SERVING) and read-only afterwards, so any thread may read it.
#pragma once

#include <string>
#include <vector>

#include "pipeline/clip_tokenizer.h"
#include "pipeline/scheduler_config.h"

namespace tomeserve::server {

struct ModelDescription {
  std::string name;
  int native_width = 512;
  int native_height = 512;
  pipeline::SchedulerKind default_scheduler = pipeline::SchedulerKind::kPndm;
  std::string family = "sd1";  // pipeline::ModelFamilyName: "sd1" or "sdxl"
  // The UNet's levels with transformer blocks, as Token Merging downsample factors, ascending
  // (UNet2DConditionConfig::AttentionDownsamples): SD 1.5 {1, 2, 4, 8}, SDXL {2, 4}. The first is the default
  // tome.max_downsample, so a ratio always merges something.
  std::vector<int> tome_downsamples = {1, 2, 4, 8};
  std::vector<std::string> devices;
  std::string dtype;
  // Counts prompt tokens for validation; owned by the first replica (lives as long as the workers). May be
  // null in tests (then token limits are not checked).
  const pipeline::ClipTokenizer* tokenizer = nullptr;
};

struct ModelCatalog {
  std::string default_model;
  std::vector<ModelDescription> models;

  const ModelDescription* Find(const std::string& name) const {
    for (const ModelDescription& m : models) {
      if (m.name == name) return &m;
    }
    return nullptr;
  }
};

}  // namespace tomeserve::server
