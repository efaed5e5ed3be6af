#include "pipeline/unet_config.h"

#include <algorithm>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "pipeline/model_config.h"

namespace tomeserve::pipeline {
namespace {

using json = nlohmann::json;
using config_json::Find;
using config_json::GetBool;
using config_json::GetInt;
using config_json::GetNumber;
using config_json::Invalid;

absl::Status Unsupported(const std::string& where, absl::string_view key, const json& value,
                         absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": \"", key, "\" = ", value.dump(), " is not supported (", why, ")"));
}

// An int (same for every level) or a list with one positive int per level.
absl::Status GetPerLevel(const json& j, const char* key, const std::string& where, size_t levels,
                         std::vector<int64_t>* out) {
  const json* v = Find(j, key);
  if (!v) {
    if (out->size() != levels) out->assign(levels, out->empty() ? 1 : out->front());
    return absl::OkStatus();
  }
  if (v->is_number_integer() && v->get<int64_t>() > 0) {
    out->assign(levels, v->get<int64_t>());
    return absl::OkStatus();
  }
  if (!v->is_array() || v->size() != levels) {
    return Invalid(where, key, absl::StrCat("must be a positive integer or a list of ", levels, " of them"));
  }
  out->clear();
  for (const json& e : *v) {
    if (!e.is_number_integer() || e.get<int64_t>() <= 0) {
      return Invalid(where, key,
                     absl::StrCat("must be a positive integer or a list of ", levels, " of them"));
    }
    out->push_back(e.get<int64_t>());
  }
  return absl::OkStatus();
}

// Block type names as get_down_block / get_up_block accept them (a "UNetRes" prefix is stripped there too).
absl::Status GetBlockTypes(const json& j, const char* key, const std::string& where,
                           absl::string_view cross_attn, absl::string_view plain,
                           std::vector<UNetBlockKind>* out) {
  const json* v = Find(j, key);
  if (!v) return absl::OkStatus();
  if (!v->is_array() || v->empty())
    return Invalid(where, key, "must be a non-empty list of block type names");
  out->clear();
  for (const json& e : *v) {
    std::string name = e.is_string() ? e.get<std::string>() : e.dump();
    absl::string_view stripped(name);
    if (stripped.substr(0, 7) == "UNetRes") stripped.remove_prefix(7);
    if (stripped == cross_attn) {
      out->push_back(UNetBlockKind::kCrossAttn);
    } else if (stripped == plain) {
      out->push_back(UNetBlockKind::kPlain);
    } else {
      return Unsupported(where, key, *v,
                         absl::StrCat("block type \"", name, "\"; supported: ", cross_attn, ", ", plain));
    }
  }
  return absl::OkStatus();
}

// Keys that must be null or absent: each one, when set, adds layers or inputs the SD 1.x math does not have.
constexpr std::initializer_list<const char*> kMustBeNull = {
    "class_embed_type",  "num_class_embeds",
    "encoder_hid_dim",   "encoder_hid_dim_type", "time_embedding_act_fn",
    "timestep_post_act", "time_cond_proj_dim",   "reverse_transformer_layers_per_block",
};

absl::Status CheckUnsupported(const json& j, const std::string& where) {
  for (const char* key : kMustBeNull) {
    if (const json* v = Find(j, key)) return Unsupported(where, key, *v, "only null is");
  }
  if (const json* v = Find(j, "num_attention_heads")) {
    return Unsupported(where, "num_attention_heads", *v,
                       "diffusers rejects it too; the head count is read from \"attention_head_dim\"");
  }
  for (const char* key : {"dual_cross_attention", "class_embeddings_concat"}) {
    if (const json* v = Find(j, key); v && !(v->is_boolean() && !v->get<bool>())) {
      return Unsupported(where, key, *v, "only false is");
    }
  }
  if (const json* v = Find(j, "only_cross_attention")) {
    const bool all_false = v->is_array()
                               ? std::all_of(v->begin(), v->end(),
                                             [](const json& e) { return e.is_boolean() && !e.get<bool>(); })
                               : v->is_boolean() && !v->get<bool>();
    if (!all_false) return Unsupported(where, "only_cross_attention", *v, "only false is");
  }
  struct Fixed {
    const char* key;
    std::initializer_list<const char*> allowed;
  };
  for (const Fixed& f :
       {Fixed{"_class_name", {"UNet2DConditionModel"}}, Fixed{"mid_block_type", {"UNetMidBlock2DCrossAttn"}},
        Fixed{"resnet_time_scale_shift", {"default"}}, Fixed{"time_embedding_type", {"positional"}},
        Fixed{"attention_type", {"default"}}, Fixed{"act_fn", {"silu", "swish"}}}) {
    auto it = j.find(f.key);
    if (it == j.end()) continue;  // absent: diffusers' default, which is the supported value
    const bool ok = it->is_string() && std::any_of(f.allowed.begin(), f.allowed.end(), [&](const char* a) {
                      return it->get<std::string>() == a;
                    });
    if (!ok)
      return Unsupported(where, f.key, *it, absl::StrCat("supported: ", absl::StrJoin(f.allowed, ", ")));
  }
  // transformer_layers_per_block given as a list of lists (asymmetric UNets) needs reverse_... as well.
  if (const json* v = Find(j, "transformer_layers_per_block"); v && v->is_array()) {
    for (const json& e : *v) {
      if (e.is_array()) return Unsupported(where, "transformer_layers_per_block", *v, "nested lists are not");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<UNet2DConditionConfig> UNet2DConditionConfig::FromJson(const json& j,
                                                                      const std::string& where) {
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": expected a JSON object"));
  if (absl::Status s = CheckUnsupported(j, where); !s.ok()) return s;
  UNet2DConditionConfig c;
  // SDXL's added conditions: the pooled text embedding and six size/crop numbers (sinusoidal,
  // addition_time_embed_dim each) through add_embedding, added to the time embedding.
  if (const json* v = Find(j, "addition_embed_type")) {
    if (!v->is_string() || v->get<std::string>() != "text_time") {
      return Unsupported(where, "addition_embed_type", *v, "only null and \"text_time\" are");
    }
    for (auto [key, field] : {std::pair{"addition_time_embed_dim", &c.addition_time_embed_dim},
                              std::pair{"projection_class_embeddings_input_dim", &c.added_cond_dim}}) {
      if (absl::Status s = GetInt(j, key, where, 1, field); !s.ok()) return s;
      if (*field == 0) {
        return Invalid(where, "addition_embed_type", absl::StrCat("\"text_time\" needs \"", key, "\" (a positive integer)"));
      }
    }
    if (c.added_cond_dim <= 6 * c.addition_time_embed_dim) {
      return Invalid(where, "projection_class_embeddings_input_dim",
                     absl::StrCat("must exceed 6 x addition_time_embed_dim (", 6 * c.addition_time_embed_dim,
                                  "): the rest is the pooled text embedding"));
    }
  }

  if (const json* v = Find(j, "block_out_channels")) {
    c.block_out_channels.clear();
    if (v->is_array()) {
      for (const json& e : *v) c.block_out_channels.push_back(e.is_number_integer() ? e.get<int64_t>() : 0);
    }
    if (c.block_out_channels.empty() || c.block_out_channels.size() > 8 ||
        std::any_of(c.block_out_channels.begin(), c.block_out_channels.end(), [](int64_t x) { return x <= 0; })) {
      return Invalid(where, "block_out_channels", "must be a list of 1 to 8 positive integers");
    }
  }
  const size_t n = c.block_out_channels.size();
  if (absl::Status s = GetBlockTypes(j, "down_block_types", where, "CrossAttnDownBlock2D", "DownBlock2D",
                                     &c.down_block_types);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          GetBlockTypes(j, "up_block_types", where, "CrossAttnUpBlock2D", "UpBlock2D", &c.up_block_types);
      !s.ok()) {
    return s;
  }
  if (c.down_block_types.size() != n || c.up_block_types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": \"down_block_types\" (", c.down_block_types.size(), "), \"up_block_types\" (",
        c.up_block_types.size(), ") and \"block_out_channels\" (", n, ") must have equal lengths"));
  }

  for (auto [key, field] : {std::pair{"layers_per_block", &c.layers_per_block},
                            std::pair{"attention_head_dim", &c.num_attention_heads},
                            std::pair{"cross_attention_dim", &c.cross_attention_dim},
                            std::pair{"transformer_layers_per_block", &c.transformer_layers_per_block}}) {
    if (absl::Status s = GetPerLevel(j, key, where, n, field); !s.ok()) return s;
  }
  for (auto [key, min, field] : {std::tuple{"in_channels", int64_t{1}, &c.in_channels},
                                 std::tuple{"out_channels", int64_t{1}, &c.out_channels},
                                 std::tuple{"downsample_padding", int64_t{0}, &c.downsample_padding},
                                 std::tuple{"norm_num_groups", int64_t{1}, &c.norm_num_groups},
                                 std::tuple{"time_embedding_dim", int64_t{1}, &c.time_embedding_dim},
                                 std::tuple{"conv_in_kernel", int64_t{1}, &c.conv_in_kernel},
                                 std::tuple{"conv_out_kernel", int64_t{1}, &c.conv_out_kernel}}) {
    if (absl::Status s = GetInt(j, key, where, min, field); !s.ok()) return s;
  }
  if (auto it = j.find("norm_num_groups"); it != j.end() && it->is_null()) {
    return Unsupported(where, "norm_num_groups", *it, "null skips conv_norm_out; a group count is required");
  }
  for (auto [key, positive, field] :
       {std::tuple{"norm_eps", true, &c.norm_eps}, std::tuple{"freq_shift", false, &c.freq_shift},
        std::tuple{"mid_block_scale_factor", true, &c.mid_block_scale_factor}}) {
    if (absl::Status s = GetNumber(j, key, where, positive, field); !s.ok()) return s;
  }
  for (auto [key, field] : {std::pair{"center_input_sample", &c.center_input_sample},
                            std::pair{"flip_sin_to_cos", &c.flip_sin_to_cos},
                            std::pair{"use_linear_projection", &c.use_linear_projection},
                            std::pair{"upcast_attention", &c.upcast_attention}}) {
    if (absl::Status s = GetBool(j, key, where, field); !s.ok()) return s;
  }
  if (const json* v = Find(j, "sample_size")) {
    if (v->is_number_integer() && v->get<int64_t>() > 0) {
      c.sample_height = c.sample_width = v->get<int64_t>();
    } else if (v->is_array() && v->size() == 2 && (*v)[0].is_number_integer() &&
               (*v)[1].is_number_integer()) {
      c.sample_height = (*v)[0].get<int64_t>();
      c.sample_width = (*v)[1].get<int64_t>();
    } else {
      return Invalid(where, "sample_size", "must be a positive integer or [height, width]");
    }
  }

  for (int64_t kernel : {c.conv_in_kernel, c.conv_out_kernel}) {
    if (kernel % 2 == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": conv_in_kernel / conv_out_kernel must be odd"));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t ch = c.block_out_channels[i];
    if (ch % c.norm_num_groups != 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": block_out_channels[", i, "] = ", ch,
                                                     " is not divisible by norm_num_groups ",
                                                     c.norm_num_groups));
    }
    if (c.num_attention_heads[i] > ch) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": attention_head_dim[", i,
                                                     "] = ", c.num_attention_heads[i], " heads exceed the ",
                                                     ch, " channels of the level"));
    }
  }
  return c;
}

absl::StatusOr<UNet2DConditionConfig> UNet2DConditionConfig::Load(const std::filesystem::path& config_json) {
  return LoadJsonConfig<UNet2DConditionConfig>(config_json);
}

std::vector<int> UNet2DConditionConfig::AttentionDownsamples() const {
  const int64_t n = num_levels();
  std::vector<bool> has(static_cast<size_t>(n), false);
  for (int64_t i = 0; i < n; ++i) {
    if (i < static_cast<int64_t>(down_block_types.size()) && down_block_types[i] == UNetBlockKind::kCrossAttn) has[i] = true;
    // Up block i runs at level n - 1 - i.
    if (i < static_cast<int64_t>(up_block_types.size()) && up_block_types[i] == UNetBlockKind::kCrossAttn) {
      has[n - 1 - i] = true;
    }
  }
  if (n > 0) has[n - 1] = true;  // UNetMidBlock2DCrossAttn
  std::vector<int> out;
  for (int64_t i = 0; i < n; ++i) {
    if (has[i]) out.push_back(1 << i);
  }
  return out;
}

}  // namespace tomeserve::pipeline
