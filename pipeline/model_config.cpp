#include "pipeline/model_config.h"

#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tomeserve::pipeline {
namespace {

using json = nlohmann::json;

}  // namespace

namespace config_json {

const json* Find(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

absl::Status Invalid(const std::string& where, absl::string_view key, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": \"", key, "\" ", what));
}

absl::Status GetInt(const json& j, const char* key, const std::string& where, int64_t min, int64_t* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_number_integer() || v->get<int64_t>() < min) {
    return Invalid(where, key, absl::StrCat("must be an integer >= ", min));
  }
  *out = v->get<int64_t>();
  return absl::OkStatus();
}

absl::Status GetNumber(const json& j, const char* key, const std::string& where, bool positive, double* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_number() || (positive && v->get<double>() <= 0)) {
    return Invalid(where, key, positive ? "must be a positive number" : "must be a number");
  }
  *out = v->get<double>();
  return absl::OkStatus();
}

absl::Status GetBool(const json& j, const char* key, const std::string& where, bool* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_boolean()) return Invalid(where, key, "must be true or false");
  *out = v->get<bool>();
  return absl::OkStatus();
}

}  // namespace config_json

absl::StatusOr<json> ReadJsonFile(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not valid JSON"));
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": expected a JSON object"));
  return j;
}

absl::StatusOr<ClipTextConfig> ClipTextConfig::FromJson(const json& j, const std::string& where) {
  ClipTextConfig c;
  for (auto [key, field] : {std::pair{"vocab_size", &c.vocab_size}, std::pair{"hidden_size", &c.hidden_size},
                            std::pair{"intermediate_size", &c.intermediate_size},
                            std::pair{"num_hidden_layers", &c.num_hidden_layers},
                            std::pair{"num_attention_heads", &c.num_attention_heads},
                            std::pair{"max_position_embeddings", &c.max_position_embeddings}}) {
    if (absl::Status s = config_json::GetInt(j, key, where, 1, field); !s.ok()) return s;
  }
  if (auto it = j.find("layer_norm_eps"); it != j.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": \"layer_norm_eps\" must be a positive number"));
    }
    c.layer_norm_eps = it->get<double>();
  }
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    const std::string act = it->is_string() ? it->get<std::string>() : "";
    if (act == "quick_gelu") {
      c.hidden_act = Activation::kQuickGelu;
    } else if (act == "gelu") {
      c.hidden_act = Activation::kGelu;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": \"hidden_act\" \"", act, "\" is not supported (quick_gelu or gelu)"));
    }
  }
  if (absl::Status s = config_json::GetInt(j, "eos_token_id", where, 0, &c.eos_token_id); !s.ok()) return s;
  if (auto it = j.find("architectures"); it != j.end() && it->is_array()) {
    for (const json& a : *it) {
      if (a.is_string() && a.get<std::string>() == "CLIPTextModelWithProjection") {
        c.projection_dim = c.hidden_size;  // transformers' default when the key is absent
        if (absl::Status s = config_json::GetInt(j, "projection_dim", where, 1, &c.projection_dim); !s.ok()) return s;
      }
    }
  }
  if (c.hidden_size % c.num_attention_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": hidden_size ", c.hidden_size,
                                                   " is not divisible by num_attention_heads ", c.num_attention_heads));
  }
  return c;
}

absl::StatusOr<ClipTextConfig> ClipTextConfig::Load(const std::filesystem::path& config_json) {
  return LoadJsonConfig<ClipTextConfig>(config_json);
}

}  // namespace tomeserve::pipeline
