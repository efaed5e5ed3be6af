#include "server/http_openai.h"

#include <google/protobuf/util/json_util.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "pipeline/scheduler_config.h"
#include "server/http_json.h"
#include "server/request_convert.h"

namespace tomeserve::server {
namespace {

constexpr int64_t kMaxUint32 = std::numeric_limits<uint32_t>::max();

// An OpenAI field we cannot honour beyond these values.
struct FixedField {
  const char* name;
  std::vector<nlohmann::json> accepted;
  const char* why;
};

const std::vector<FixedField>& FixedFields() {
  static const auto* fields = new std::vector<FixedField>{
      {"quality", {"auto", "standard"}, "one quality level"},
      {"style", {}, "no styles"},
      {"output_format", {"png"}, "PNG only"},
      {"background", {"auto", "opaque"}, "opaque images only"},
      {"moderation", {"auto", "low"}, "no moderation"},
      {"stream", {false}, "no streaming over HTTP (use gRPC GenerateStream)"},
      {"partial_images", {0}, "no partial images"},
      {"output_compression", {100}, "PNG only"},
  };
  return *fields;
}

// "512x768" -> {512, 768}; sides of at least 1 (0 would mean "the model's native size" on the proto).
bool ParseSize(absl::string_view text, int64_t* width, int64_t* height) {
  std::vector<absl::string_view> parts = absl::StrSplit(absl::AsciiStrToLower(text), 'x');
  if (parts.size() != 2) return false;
  return absl::SimpleAtoi(parts[0], width) && absl::SimpleAtoi(parts[1], height) && *width >= 1 && *height >= 1 &&
         *width <= kMaxUint32 && *height <= kMaxUint32 &&
         parts[0].find_first_not_of("0123456789") == absl::string_view::npos &&
         parts[1].find_first_not_of("0123456789") == absl::string_view::npos;
}

absl::Status ReadTome(const nlohmann::json& tome, v1::TokenMerging* out) {
  if (!tome.is_object()) return absl::InvalidArgumentError(absl::StrCat("tome must be an object; got ", ShortJson(tome)));
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto status = google::protobuf::util::JsonStringToMessage(tome.dump(), out, options);
  if (!status.ok()) {
    const auto message = status.message();
    return absl::InvalidArgumentError(
        absl::StrCat("tome: ", absl::string_view(message.data(), message.size()),
                     " (fields: ratio, max_ratio, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, "
                     "merge_mlp, seed)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<v1::GenerateRequest> OpenAiImageRequest(const nlohmann::json& body) {
  v1::GenerateRequest out;
  JsonReader in(body);
  if (std::optional<std::string> model = in.String("model")) out.set_model(*model);
  std::optional<std::string> prompt = in.String("prompt");
  if (in.status().ok() && !prompt.has_value()) in.Fail("prompt", "is required");
  if (prompt) out.set_prompt(*prompt);
  if (std::optional<int64_t> n = in.Int("n", 1, kMaxUint32)) out.set_num_images(static_cast<uint32_t>(*n));
  if (std::optional<std::string> size = in.String("size")) {
    int64_t width = 0, height = 0;
    if (!ParseSize(*size, &width, &height)) {
      in.Fail("size", absl::StrCat("must be \"WIDTHxHEIGHT\" such as \"512x512\"; got \"", absl::CHexEscape(*size), "\""));
    } else {
      out.set_width(static_cast<uint32_t>(width));
      out.set_height(static_cast<uint32_t>(height));
    }
  }
  if (std::optional<std::string> format = in.String("response_format"); format && *format != "b64_json") {
    in.Fail("response_format",
            absl::StrCat("\"", absl::CHexEscape(*format), "\" is not supported; allowed: \"b64_json\" (tomeserve does "
                         "not store images, so it has no URLs to return)"));
  }
  in.String("user");  // accepted (OpenAI's end-user id); not used
  for (const FixedField& f : FixedFields()) {
    const nlohmann::json* value = in.Raw(f.name);
    if (value == nullptr) continue;
    bool ok = false;
    for (const nlohmann::json& a : f.accepted) ok = ok || *value == a;
    if (!ok) {
      std::vector<std::string> allowed;
      for (const nlohmann::json& a : f.accepted) allowed.push_back(a.dump());
      in.Fail(f.name, absl::StrCat(ShortJson(*value), " is not supported (tomeserve has ", f.why, "); allowed: ",
                                   allowed.empty() ? "null or absent" : absl::StrJoin(allowed, ", ")));
    }
  }
  // Extensions.
  if (std::optional<std::string> negative = in.String("negative_prompt")) out.set_negative_prompt(*negative);
  if (std::optional<int64_t> steps = in.Int("num_inference_steps", 1, kMaxUint32))
    out.set_num_inference_steps(static_cast<uint32_t>(*steps));
  if (std::optional<double> g = in.Number("guidance_scale")) out.set_guidance_scale(static_cast<float>(*g));
  if (std::optional<uint64_t> seed = in.Uint64("seed")) out.set_seed(*seed);
  if (std::optional<std::string> name = in.String("scheduler")) {
    absl::StatusOr<pipeline::SchedulerKind> kind = pipeline::ParseSchedulerKind(absl::CHexEscape(*name));
    if (kind.ok()) {
      out.set_scheduler(ToProto(*kind));
    } else {
      in.Fail("scheduler", absl::StrCat("is not one of the schedulers: ", kind.status().message()));
    }
  }
  if (const nlohmann::json* tome = in.Raw("tome"); tome != nullptr && in.status().ok()) {
    if (absl::Status s = ReadTome(*tome, out.mutable_tome()); !s.ok()) return s;
  }
  if (std::optional<double> target = in.Number("latency_target_seconds")) out.set_latency_target_seconds(*target);
  if (std::optional<std::string> priority = in.String("priority")) {
    if (*priority == "interactive") {
      out.set_priority(v1::PRIORITY_INTERACTIVE);
    } else if (*priority == "batch") {
      out.set_priority(v1::PRIORITY_BATCH);
    } else {
      in.Fail("priority", absl::StrCat("\"", absl::CHexEscape(*priority), "\" is unknown; allowed: interactive, batch"));
    }
  }
  if (std::optional<std::string> id = in.String("request_id")) out.set_request_id(*id);
  if (!in.status().ok()) return in.status();
  if (std::vector<std::string> unread = in.Unread(); !unread.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(absl::CHexEscape(unread.front().substr(0, 64)),
                     ": unrecognized request argument (see the README's HTTP API section for the fields "
                     "tomeserve reads)"));
  }
  return out;
}

absl::Status OpenAiFieldNames(const absl::Status& status) {
  return RenameField(status, {{"num_images", "n"}, {"width", "size"}, {"height", "size"}});
}

nlohmann::json OpenAiImageResponse(const v1::GenerateRequest& request, const v1::GenerateResponse& response,
                                   absl::Time created) {
  nlohmann::json data = nlohmann::json::array();
  for (const v1::Image& image : response.images()) {
    data.push_back({{"b64_json", absl::Base64Escape(image.data())}, {"revised_prompt", request.prompt()}});
  }
  return {{"created", absl::ToUnixSeconds(created)}, {"data", data}, {"tomeserve", GenerationDetails(response)}};
}

nlohmann::json OpenAiError(const absl::Status& status, int http_status) {
  // Validation errors start with the field they are about (request_convert.h); those about the body as a whole
  // ("the request body is not valid JSON") name none.
  const bool names_field = (status.code() == absl::StatusCode::kInvalidArgument ||
                            status.code() == absl::StatusCode::kNotFound) &&
                           !absl::StartsWith(status.message(), "the ");
  std::string type = http_status >= 500 ? "server_error" : "invalid_request_error";
  if (http_status == 401) type = "authentication_error";
  if (http_status == 429) type = "rate_limit_error";
  return {{"error",
           {{"message", std::string(status.message())},
            {"type", type},
            {"param", names_field ? nlohmann::json(LeadingField(status.message())) : nlohmann::json(nullptr)},
            {"code", absl::AsciiStrToLower(absl::StatusCodeToString(status.code()))}}}};
}

nlohmann::json OpenAiModels(const ModelCatalog& catalog) {
  nlohmann::json data = nlohmann::json::array();
  for (const ModelDescription& m : catalog.models) {
    data.push_back({{"id", m.name}, {"object", "model"}, {"created", 0}, {"owned_by", "tomeserve"}});
  }
  return {{"object", "list"}, {"data", data}};
}

}  // namespace tomeserve::server
