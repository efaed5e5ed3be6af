#include "server/http_a1111.h"

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "server/http_json.h"
#include "server/request_convert.h"
#include "tome/token_merging.h"

namespace tomeserve::server {
namespace {

using pipeline::SchedulerKind;

constexpr int64_t kMaxUint32 = std::numeric_limits<uint32_t>::max();

// A1111 sampler names (and their API aliases) onto our noise schedulers; `karras` is the variant for the
// "karras" schedule type (none: that sampler has no Karras variant here). `eta` is the one eta value the
// scheduler runs with (ancestral: 1, DDIM: 0); NaN where eta has no effect.
struct Sampler {
  const char* name;
  std::vector<const char*> aliases;
  SchedulerKind automatic;
  std::optional<SchedulerKind> karras;
  double eta;
};

const std::vector<Sampler>& Samplers() {
  constexpr double kNoEta = std::numeric_limits<double>::quiet_NaN();
  static const auto* samplers = new std::vector<Sampler>{
      {"Euler a", {"k_euler_a", "k_euler_ancestral"}, SchedulerKind::kEulerAncestral, std::nullopt, 1.0},
      {"Euler", {"k_euler"}, SchedulerKind::kEuler, std::nullopt, kNoEta},
      {"DDIM", {"ddim"}, SchedulerKind::kDdim, std::nullopt, 0.0},
      {"PLMS", {"plms"}, SchedulerKind::kPndm, std::nullopt, kNoEta},
      {"PNDM", {"pndm"}, SchedulerKind::kPndm, std::nullopt, kNoEta},
      {"DPM++ 2M", {"k_dpmpp_2m"}, SchedulerKind::kDpmpp2m, SchedulerKind::kDpmpp2mKarras, kNoEta},
      {"DPM++ 2M Karras", {"k_dpmpp_2m_ka"}, SchedulerKind::kDpmpp2mKarras, SchedulerKind::kDpmpp2mKarras, kNoEta},
  };
  return *samplers;
}

const Sampler* FindSampler(const std::string& name) {
  for (const Sampler& s : Samplers()) {
    if (absl::EqualsIgnoreCase(name, s.name)) return &s;
    for (const char* alias : s.aliases) {
      if (absl::EqualsIgnoreCase(name, alias)) return &s;
    }
  }
  return nullptr;
}

// A field for a feature tomeserve does not have: accepted only at these (off) values.
struct OffField {
  const char* name;
  std::vector<nlohmann::json> accepted;
  const char* feature;
};

const std::vector<OffField>& OffFields() {
  static const auto* fields = new std::vector<OffField>{
      {"enable_hr", {false}, "hires fix"},
      {"restore_faces", {false}, "face restoration"},
      {"tiling", {false}, "tiling"},
      {"styles", {nlohmann::json::array()}, "prompt styles"},
      {"subseed_strength", {0}, "variation seeds"},
      {"script_name", {"", "None"}, "scripts"},
      {"alwayson_scripts", {nlohmann::json::object()}, "scripts"},
      {"refiner_checkpoint", {"", "None"}, "refiners"},
      {"s_churn", {0}, "sigma churn"},
      {"s_noise", {1}, "sigma noise scaling"},
      {"s_min_uncond", {0}, "negative-guidance skipping"},
      {"clip_skip", {1}, "CLIP skip (the last layer is used)"},
  };
  return *fields;
}

void CheckOff(JsonReader& in, const char* name, const std::vector<nlohmann::json>& accepted, const char* feature) {
  const nlohmann::json* value = in.Raw(name);
  if (value == nullptr) return;
  for (const nlohmann::json& a : accepted) {
    if (*value == a) return;
  }
  std::vector<std::string> allowed;
  for (const nlohmann::json& a : accepted) allowed.push_back(a.dump());
  in.Fail(name,
          absl::StrCat("is ", ShortJson(*value), ": tomeserve has no ", feature, "; allowed: ",
                       absl::StrJoin(allowed, ", "), " or absent"),
          absl::StatusCode::kUnimplemented);
}

std::string Timestamp(absl::Time t) { return absl::FormatTime("%Y%m%d%H%M%S", t, absl::UTCTimeZone()); }

}  // namespace

absl::StatusOr<v1::GenerateRequest> A1111Txt2ImgRequest(const nlohmann::json& body, const A1111Options& options) {
  v1::GenerateRequest out;
  out.set_model(options.model);
  if (options.token_merging_ratio) out.mutable_tome()->set_ratio(static_cast<float>(*options.token_merging_ratio));
  JsonReader in(body);
  if (std::optional<std::string> prompt = in.String("prompt")) out.set_prompt(*prompt);
  if (std::optional<std::string> negative = in.String("negative_prompt")) out.set_negative_prompt(*negative);
  if (std::optional<int64_t> seed = in.Int("seed", -1, std::numeric_limits<int64_t>::max()); seed && *seed >= 0)
    out.set_seed(static_cast<uint64_t>(*seed));
  if (std::optional<int64_t> steps = in.Int("steps", 1, kMaxUint32)) out.set_num_inference_steps(static_cast<uint32_t>(*steps));
  if (std::optional<double> cfg = in.Number("cfg_scale")) out.set_guidance_scale(static_cast<float>(*cfg));
  if (std::optional<int64_t> width = in.Int("width", 1, kMaxUint32)) out.set_width(static_cast<uint32_t>(*width));
  if (std::optional<int64_t> height = in.Int("height", 1, kMaxUint32)) out.set_height(static_cast<uint32_t>(*height));
  const int64_t batch_size = in.Int("batch_size", 1, 1 << 20).value_or(1);
  const int64_t n_iter = in.Int("n_iter", 1, 1 << 20).value_or(1);
  if (batch_size * n_iter > kMaxUint32) {
    in.Fail("batch_size", "x n_iter is too large");
  } else {
    out.set_num_images(static_cast<uint32_t>(batch_size * n_iter));
  }

  std::optional<std::string> sampler_name = in.String("sampler_name");
  if (std::optional<std::string> index = in.String("sampler_index"); !sampler_name) sampler_name = index;
  const Sampler* sampler = nullptr;
  if (sampler_name && !sampler_name->empty()) {
    sampler = FindSampler(*sampler_name);
    if (sampler == nullptr) {
      std::vector<std::string> names;
      for (const Sampler& s : Samplers()) names.push_back(s.name);
      in.Fail("sampler_name", absl::StrCat("\"", absl::CHexEscape(*sampler_name), "\" is not available; allowed: ",
                                           absl::StrJoin(names, ", ")),
              absl::StatusCode::kUnimplemented);
    }
  }
  const std::string schedule = absl::AsciiStrToLower(in.String("scheduler").value_or("automatic"));
  if (schedule != "automatic" && schedule != "karras") {
    in.Fail("scheduler", absl::StrCat("\"", absl::CHexEscape(schedule), "\" is not available; allowed: automatic, karras"),
            absl::StatusCode::kUnimplemented);
  } else if (sampler != nullptr) {
    if (schedule == "karras" && !sampler->karras) {
      in.Fail("scheduler", absl::StrCat("karras is not available with sampler \"", sampler->name,
                                        "\"; allowed: automatic (karras: DPM++ 2M)"),
              absl::StatusCode::kUnimplemented);
    } else {
      out.set_scheduler(ToProto(schedule == "karras" ? *sampler->karras : sampler->automatic));
    }
  } else if (schedule == "karras") {
    in.Fail("scheduler", "karras needs a sampler_name (DPM++ 2M)", absl::StatusCode::kUnimplemented);
  }
  if (std::optional<double> eta = in.Number("eta"); eta && sampler != nullptr && !std::isnan(sampler->eta) &&
                                                     *eta != sampler->eta) {
    in.Fail("eta", absl::StrFormat("is %g: sampler \"%s\" runs with eta %g here; allowed: %g or absent", *eta,
                                   sampler->name, sampler->eta, sampler->eta),
            absl::StatusCode::kUnimplemented);
  }
  for (const OffField& f : OffFields()) CheckOff(in, f.name, f.accepted, f.feature);
  in.Bool("send_images");  // read by the handler

  if (const nlohmann::json* overrides = in.Raw("override_settings")) {
    if (!overrides->is_object()) {
      in.Fail("override_settings", absl::StrCat("must be an object; got ", ShortJson(*overrides)));
    } else {
      JsonReader o(*overrides, "override_settings.");
      if (std::optional<double> ratio = o.Number("token_merging_ratio"))
        out.mutable_tome()->set_ratio(static_cast<float>(*ratio));
      if (std::optional<std::string> model = o.String("sd_model_checkpoint")) out.set_model(*model);
      CheckOff(o, "CLIP_stop_at_last_layers", {1}, "CLIP skip (the last layer is used)");
      CheckOff(o, "sd_vae", {"Automatic", "None"}, "VAE override (the model's own VAE is used)");
      for (const std::string& key : o.Unread()) {
        o.Fail(key, "is not an option tomeserve honours; allowed: token_merging_ratio, sd_model_checkpoint, "
                    "CLIP_stop_at_last_layers (1), sd_vae (Automatic)",
               absl::StatusCode::kUnimplemented);
      }
      if (!o.status().ok() && in.status().ok()) return o.status();
    }
  }
  if (!in.status().ok()) return in.status();
  return out;
}

absl::Status A1111FieldNames(const absl::Status& status) {
  return RenameField(status, {{"num_images", "batch_size x n_iter"},
                              {"num_inference_steps", "steps"},
                              {"guidance_scale", "cfg_scale"},
                              {"tome.ratio", "override_settings.token_merging_ratio"},
                              {"model", "sd_model_checkpoint"}});
}

nlohmann::json A1111Txt2ImgResponse(const nlohmann::json& body, const GenerationRequest& effective,
                                    const v1::GenerateResponse& response, absl::Time started) {
  const bool send_images = !body.contains("send_images") || body["send_images"] != false;
  nlohmann::json images = nlohmann::json::array();
  nlohmann::json seeds = nlohmann::json::array();
  for (const v1::Image& image : response.images()) {
    if (send_images) images.push_back(absl::Base64Escape(image.data()));
    seeds.push_back(image.seed());
  }
  std::string sampler(pipeline::A1111SamplerName(effective.key.scheduler));
  const std::string schedule = effective.key.scheduler == SchedulerKind::kDpmpp2mKarras ? "Karras" : "Automatic";
  if (body.contains("sampler_name") && body["sampler_name"].is_string()) {
    if (const Sampler* s = FindSampler(body["sampler_name"].get<std::string>())) sampler = s->name;
  }
  const double ratio = FloatToShortestDouble(response.tome().ratio());
  const int n = static_cast<int>(response.images_size());
  const std::string size = absl::StrCat(effective.key.width, "x", effective.key.height);
  nlohmann::json infotexts = nlohmann::json::array();
  for (int i = 0; i < n; ++i) {
    std::string text = effective.prompt;
    if (!effective.negative_prompt.empty()) absl::StrAppend(&text, "\nNegative prompt: ", effective.negative_prompt);
    absl::StrAppend(&text, absl::StrFormat("\nSteps: %d, Sampler: %s, Schedule type: %s, CFG scale: %g, Seed: %d, "
                                           "Size: %s, Model: %s, Token merging ratio: %g, Version: tomeserve",
                                           effective.key.steps, sampler, schedule, effective.guidance_scale,
                                           response.images(i).seed(), size, effective.key.model, ratio));
    infotexts.push_back(text);
  }
  nlohmann::json info = {
      {"prompt", effective.prompt},
      {"all_prompts", nlohmann::json::array()},
      {"negative_prompt", effective.negative_prompt},
      {"all_negative_prompts", nlohmann::json::array()},
      {"seed", n > 0 ? seeds[0] : nlohmann::json(effective.seed)},
      {"all_seeds", seeds},
      {"subseed", -1},
      {"all_subseeds", seeds},
      {"subseed_strength", 0},
      {"width", effective.key.width},
      {"height", effective.key.height},
      {"sampler_name", sampler},
      {"scheduler", schedule},
      {"cfg_scale", effective.guidance_scale},
      {"steps", effective.key.steps},
      {"batch_size", n},
      {"restore_faces", false},
      {"face_restoration_model", nullptr},
      {"sd_model_name", effective.key.model},
      {"sd_model_hash", nullptr},
      {"sd_vae_name", nullptr},
      {"sd_vae_hash", nullptr},
      {"seed_resize_from_w", -1},
      {"seed_resize_from_h", -1},
      {"denoising_strength", nullptr},
      {"extra_generation_params", {{"Schedule type", schedule}, {"Token merging ratio", ratio}}},
      {"index_of_first_image", 0},
      {"infotexts", infotexts},
      {"styles", nlohmann::json::array()},
      {"job_timestamp", Timestamp(started)},
      {"clip_skip", 1},
      {"is_using_inpainting_conditioning", false},
      {"version", "tomeserve"},
      {"token_merging_ratio", ratio},
      {"tomeserve", GenerationDetails(response)},
  };
  for (int i = 0; i < n; ++i) {
    info["all_prompts"].push_back(effective.prompt);
    info["all_negative_prompts"].push_back(effective.negative_prompt);
  }
  return {{"images", images}, {"parameters", body}, {"info", info.dump()}};
}

nlohmann::json A1111Error(const absl::Status& status, int http_status) {
  std::string reason = "Error";
  switch (http_status) {
    case 400: reason = "BadRequest"; break;
    case 401: reason = "Unauthorized"; break;
    case 404: reason = "NotFound"; break;
    case 409: reason = "Conflict"; break;
    case 413: reason = "PayloadTooLarge"; break;
    case 422: reason = "UnprocessableEntity"; break;
    case 429: reason = "TooManyRequests"; break;
    case 499: reason = "Interrupted"; break;
    case 503: reason = "ServiceUnavailable"; break;
    case 504: reason = "GatewayTimeout"; break;
    default: break;
  }
  const std::string message(status.message());
  return {{"error", reason}, {"detail", message}, {"body", ""}, {"errors", message}};
}

nlohmann::json A1111Samplers() {
  nlohmann::json out = nlohmann::json::array();
  for (const Sampler& s : Samplers()) {
    nlohmann::json aliases = nlohmann::json::array();
    for (const char* a : s.aliases) aliases.push_back(a);
    out.push_back({{"name", s.name}, {"aliases", aliases}, {"options", nlohmann::json::object()}});
  }
  return out;
}

nlohmann::json A1111Schedulers() {
  return nlohmann::json::array({
      {{"name", "automatic"}, {"label", "Automatic"}, {"aliases", nullptr}, {"default_rho", -1}, {"need_inner_model", false}},
      {{"name", "karras"}, {"label", "Karras"}, {"aliases", nullptr}, {"default_rho", 7.0}, {"need_inner_model", false}},
  });
}

nlohmann::json A1111Models(const ModelCatalog& catalog) {
  nlohmann::json out = nlohmann::json::array();
  for (const ModelDescription& m : catalog.models) {
    out.push_back({{"title", m.name},
                   {"model_name", m.name},
                   {"hash", nullptr},
                   {"sha256", nullptr},
                   {"filename", m.name},
                   {"config", nullptr}});
  }
  return out;
}

nlohmann::json A1111OptionsJson(const A1111Options& options, const ModelCatalog& catalog, double default_ratio) {
  return {{"sd_model_checkpoint", options.model.empty() ? catalog.default_model : options.model},
          {"sd_checkpoint_hash", nullptr},
          {"token_merging_ratio", options.token_merging_ratio.value_or(default_ratio)},
          {"CLIP_stop_at_last_layers", 1},
          {"sd_vae", "Automatic"},
          {"samples_format", "png"}};
}

absl::Status ApplyA1111Options(const nlohmann::json& body, const ModelCatalog& catalog, A1111Options* options) {
  A1111Options next = *options;
  JsonReader in(body);
  if (std::optional<std::string> model = in.String("sd_model_checkpoint")) {
    if (catalog.Find(*model) == nullptr) {
      std::vector<std::string> names;
      for (const ModelDescription& m : catalog.models) names.push_back(m.name);
      in.Fail("sd_model_checkpoint",
              absl::StrCat("\"", absl::CHexEscape(*model), "\" is not loaded; loaded: ", absl::StrJoin(names, ", ")),
              absl::StatusCode::kNotFound);
    }
    next.model = *model;
  }
  if (std::optional<double> ratio = in.Number("token_merging_ratio")) next.token_merging_ratio = *ratio;
  CheckOff(in, "CLIP_stop_at_last_layers", {1}, "CLIP skip (the last layer is used)");
  CheckOff(in, "sd_vae", {"Automatic", "None"}, "VAE override (the model's own VAE is used)");
  CheckOff(in, "samples_format", {"png"}, "formats but PNG");
  for (const std::string& key : in.Unread()) {
    in.Fail(key, "is not an option tomeserve honours; allowed: sd_model_checkpoint, token_merging_ratio, "
                 "CLIP_stop_at_last_layers (1), sd_vae (Automatic), samples_format (png)",
            absl::StatusCode::kUnimplemented);
  }
  if (!in.status().ok()) return in.status();
  *options = next;
  return absl::OkStatus();
}

}  // namespace tomeserve::server
