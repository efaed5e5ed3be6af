#include "pipeline/vae_config.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pipeline/model_config.h"

namespace tomeserve::pipeline {

using json = nlohmann::json;
using config_json::Find;
using config_json::GetBool;
using config_json::GetInt;
using config_json::GetNumber;
using config_json::Invalid;

absl::StatusOr<VaeConfig> VaeConfig::FromJson(const json& j, const std::string& where) {
  VaeConfig c;
  for (auto [key, field] :
       {std::pair{"layers_per_block", &c.layers_per_block}, std::pair{"latent_channels", &c.latent_channels},
        std::pair{"norm_num_groups", &c.norm_num_groups}, std::pair{"out_channels", &c.out_channels}}) {
    if (absl::Status s = GetInt(j, key, where, 1, field); !s.ok()) return s;
  }
  for (auto [key, field] : {std::pair{"mid_block_add_attention", &c.mid_block_add_attention},
                            std::pair{"use_post_quant_conv", &c.use_post_quant_conv},
                            std::pair{"force_upcast", &c.force_upcast}}) {
    if (absl::Status s = GetBool(j, key, where, field); !s.ok()) return s;
  }
  if (const json* v = Find(j, "block_out_channels")) {
    // More than 8 levels would mean a 128x upscale and shifts past int range in upscale_factor().
    if (!v->is_array() || v->empty() || v->size() > 8) {
      return Invalid(where, "block_out_channels", "must be a list of 1 to 8 entries");
    }
    c.block_out_channels.clear();
    for (const json& e : *v) {
      if (!e.is_number_integer() || e.get<int64_t>() <= 0) {
        return Invalid(where, "block_out_channels", "must hold positive integers");
      }
      c.block_out_channels.push_back(e.get<int64_t>());
    }
  }
  if (const json* v = Find(j, "up_block_types")) {
    if (!v->is_array()) return Invalid(where, "up_block_types", "must be a list");
    c.up_block_types.clear();
    for (const json& e : *v) c.up_block_types.push_back(e.is_string() ? e.get<std::string>() : e.dump());
  }
  if (const json* v = Find(j, "sample_size")) {
    const json* size = v->is_array() && !v->empty() ? &(*v)[0] : v;
    if (!size->is_number_integer() || size->get<int64_t>() <= 0) {
      return Invalid(where, "sample_size", "must be a positive integer or a [height, width] list");
    }
    c.sample_size = size->get<int64_t>();
  }
  if (const json* v = Find(j, "scaling_factor")) {
    if (!v->is_number() || v->get<double>() <= 0)
      return Invalid(where, "scaling_factor", "must be a positive number");
    c.scaling_factor = v->get<double>();
  }
  // SD 1.x latents are only scaled. A shift (SD3, Flux) or per-channel statistics (SDXL-era configs) would
  // need a different latent transform in the pipeline; refuse rather than decode wrongly.
  if (const json* v = Find(j, "shift_factor"); v != nullptr && (!v->is_number() || v->get<double>() != 0.0)) {
    return Invalid(where, "shift_factor", "must be null or 0 (SD 1.x VAEs only scale their latents)");
  }
  for (const char* key : {"latents_mean", "latents_std"}) {
    if (Find(j, key) != nullptr)
      return Invalid(where, key, "must be null (SD 1.x VAEs only scale their latents)");
  }
  if (const json* v = Find(j, "act_fn"); v != nullptr && *v != "silu" && *v != "swish") {
    return Invalid(where, "act_fn", "is not supported (silu only)");
  }
  if (c.up_block_types.size() != c.block_out_channels.size()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", c.up_block_types.size(),
                                                   " up_block_types for ", c.block_out_channels.size(),
                                                   " block_out_channels"));
  }
  for (const std::string& type : c.up_block_types) {
    if (type != "UpDecoderBlock2D") {
      return Invalid(where, "up_block_types",
                     absl::StrCat("holds \"", type, "\"; only UpDecoderBlock2D is supported"));
    }
  }
  for (int64_t channels : c.block_out_channels) {
    if (channels % c.norm_num_groups != 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": block_out_channels ", channels,
                                                     " is not divisible by norm_num_groups ",
                                                     c.norm_num_groups));
    }
  }
  return c;
}

absl::StatusOr<VaeConfig> VaeConfig::Load(const std::filesystem::path& config_json) {
  return LoadJsonConfig<VaeConfig>(config_json);
}

}  // namespace tomeserve::pipeline
