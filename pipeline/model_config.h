// Architecture configs read from a diffusers folder's config.json files. Torch-free. Missing keys take the
// defaults of the library that wrote the file (transformers / diffusers), so configs written by older versions
// load the same way the reference loads them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {

// Reads and parses a JSON file; errors name the file.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::filesystem::path& path);

// Field readers shared by the config parsers. An absent or null key keeps the caller's default (that is what
// "missing" means to diffusers and transformers); a present key of the wrong type or range is an error naming
// `where` (the file) and the key.
namespace config_json {
const nlohmann::json* Find(const nlohmann::json& j, const char* key);
absl::Status Invalid(const std::string& where, absl::string_view key, absl::string_view what);
absl::Status GetInt(const nlohmann::json& j, const char* key, const std::string& where, int64_t min, int64_t* out);
absl::Status GetNumber(const nlohmann::json& j, const char* key, const std::string& where, bool positive,
                       double* out);
absl::Status GetBool(const nlohmann::json& j, const char* key, const std::string& where, bool* out);
}  // namespace config_json

// Reads `config_json` and parses it with Config::FromJson(json, file name for messages): the Load() of every
// config struct.
template <typename Config>
absl::StatusOr<Config> LoadJsonConfig(const std::filesystem::path& config_json) {
  absl::StatusOr<nlohmann::json> j = ReadJsonFile(config_json);
  if (!j.ok()) return j.status();
  return Config::FromJson(*j, config_json.string());
}

enum class Activation { kQuickGelu, kGelu };

// transformers' CLIPTextConfig (text_encoder/config.json). Defaults are CLIPTextConfig's.
struct ClipTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;
  int64_t max_position_embeddings = 77;
  double layer_norm_eps = 1e-5;
  Activation hidden_act = Activation::kQuickGelu;
  // transformers pools at the first eos_token_id, or at argmax(input_ids) for the legacy value 2 that SD 1.x and
  // SDXL configs carry (the first <|endoftext|>, the vocabulary's highest id).
  int64_t eos_token_id = 2;
  // CLIPTextModelWithProjection (SDXL's text_encoder_2, "architectures"): the pooled output goes through
  // text_projection [projection_dim, hidden_size]; 0 for a plain CLIPTextModel.
  int64_t projection_dim = 0;

  static absl::StatusOr<ClipTextConfig> FromJson(const nlohmann::json& j, const std::string& where);
  static absl::StatusOr<ClipTextConfig> Load(const std::filesystem::path& config_json);
};

}  // namespace tomeserve::pipeline
