#include "server/http_json.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "server/request_convert.h"

namespace tomeserve::server {

absl::StatusOr<nlohmann::json> ParseJsonObject(absl::string_view body) {
  nlohmann::json value;
  try {
    value = nlohmann::json::parse(body.begin(), body.end());
  } catch (const nlohmann::json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("the request body is not valid JSON: error at byte ", e.byte));
  }
  if (!value.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request body must be a JSON object; got ", value.type_name()));
  }
  return value;
}

std::string ShortJson(const nlohmann::json& value) {
  std::string text = value.dump(-1, ' ', /*ensure_ascii=*/true, nlohmann::json::error_handler_t::replace);
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return text;
}

JsonReader::JsonReader(const nlohmann::json& object, std::string prefix) : object_(object), prefix_(std::move(prefix)) {}

const nlohmann::json* JsonReader::Find(absl::string_view field) {
  read_.emplace_back(field);
  auto it = object_.find(std::string(field));
  if (it == object_.end() || it->is_null()) return nullptr;
  return &*it;
}

void JsonReader::Fail(absl::string_view field, absl::string_view message, absl::StatusCode code) {
  if (status_.ok()) status_ = absl::Status(code, absl::StrCat(Name(field), " ", message));
}

void JsonReader::TypeError(absl::string_view field, absl::string_view want, const nlohmann::json& got) {
  Fail(field, absl::StrCat("must be ", want, "; got ", ShortJson(got)));
}

const nlohmann::json* JsonReader::Raw(absl::string_view field) { return Find(field); }

std::optional<std::string> JsonReader::String(absl::string_view field) {
  const nlohmann::json* v = Find(field);
  if (v == nullptr) return std::nullopt;
  if (!v->is_string()) {
    TypeError(field, "a string", *v);
    return std::nullopt;
  }
  return v->get<std::string>();
}

std::optional<int64_t> JsonReader::Int(absl::string_view field, int64_t min, int64_t max) {
  const nlohmann::json* v = Find(field);
  if (v == nullptr) return std::nullopt;
  const std::string want = absl::StrCat("an integer in [", min, ", ", max, "]");
  // 2.0 is an integer; 2.5, "2" and 1e30 are not.
  if (v->is_number_integer() && !v->is_number_unsigned()) {
    const int64_t x = v->get<int64_t>();
    if (x >= min && x <= max) return x;
  } else if (v->is_number_unsigned()) {
    const uint64_t x = v->get<uint64_t>();
    if (x <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) && static_cast<int64_t>(x) >= min &&
        static_cast<int64_t>(x) <= max)
      return static_cast<int64_t>(x);
  } else if (v->is_number_float()) {
    const double x = v->get<double>();
    if (std::floor(x) == x && x >= static_cast<double>(min) && x <= static_cast<double>(max))
      return static_cast<int64_t>(x);
  }
  TypeError(field, want, *v);
  return std::nullopt;
}

std::optional<uint64_t> JsonReader::Uint64(absl::string_view field) {
  const nlohmann::json* v = Find(field);
  if (v == nullptr) return std::nullopt;
  if (v->is_number_unsigned()) return v->get<uint64_t>();
  if (v->is_number_integer() && v->get<int64_t>() >= 0) return static_cast<uint64_t>(v->get<int64_t>());
  TypeError(field, "an integer in [0, 18446744073709551615]", *v);
  return std::nullopt;
}

std::optional<double> JsonReader::Number(absl::string_view field) {
  const nlohmann::json* v = Find(field);
  if (v == nullptr) return std::nullopt;
  if (!v->is_number()) {
    TypeError(field, "a number", *v);
    return std::nullopt;
  }
  return v->get<double>();
}

std::optional<bool> JsonReader::Bool(absl::string_view field) {
  const nlohmann::json* v = Find(field);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) {
    TypeError(field, "true or false", *v);
    return std::nullopt;
  }
  return v->get<bool>();
}

std::vector<std::string> JsonReader::Unread() const {
  std::vector<std::string> out;
  for (auto it = object_.begin(); it != object_.end(); ++it) {
    if (std::find(read_.begin(), read_.end(), it.key()) == read_.end()) out.push_back(it.key());
  }
  return out;
}

std::string LeadingField(absl::string_view message) {
  const size_t end = message.find_first_of(" :");
  return std::string(message.substr(0, end == absl::string_view::npos ? message.size() : end));
}

absl::Status RenameField(const absl::Status& status,
                         const std::vector<std::pair<std::string, std::string>>& names) {
  if (status.ok()) return status;
  const std::string field = LeadingField(status.message());
  for (const auto& [proto, wire] : names) {
    if (field == proto) return absl::Status(status.code(), absl::StrCat(wire, ": ", status.message()));
  }
  return status;
}

nlohmann::json GenerationDetails(const v1::GenerateResponse& response) {
  nlohmann::json seeds = nlohmann::json::array();
  for (const v1::Image& image : response.images()) seeds.push_back(image.seed());
  const v1::TokenMerging& t = response.tome();
  nlohmann::json tome = {{"ratio", FloatToShortestDouble(t.ratio())},
                         {"max_downsample", t.max_downsample()},
                         {"sx", t.sx()},
                         {"sy", t.sy()},
                         {"use_rand", t.use_rand()},
                         {"merge_attn", t.merge_attn()},
                         {"merge_crossattn", t.merge_crossattn()},
                         {"merge_mlp", t.merge_mlp()},
                         {"seed", t.seed()}};
  if (t.has_max_ratio()) tome["max_ratio"] = FloatToShortestDouble(t.max_ratio());
  const v1::Timings& time = response.timings();
  nlohmann::json out = {{"request_id", response.request_id()},
                        {"model", response.model()},
                        {"seeds", seeds},
                        {"batch_size", response.batch_size()},
                        {"tome", tome},
                        {"timings",
                         {{"queue_seconds", time.queue_seconds()},
                          {"text_encoding_seconds", time.text_encoding_seconds()},
                          {"denoising_seconds", time.denoising_seconds()},
                          {"decoding_seconds", time.decoding_seconds()},
                          {"total_seconds", time.total_seconds()}}}};
  if (response.has_slo()) {
    const v1::SloDecision& slo = response.slo();
    out["slo"] = {{"latency_target_seconds", slo.latency_target_seconds()},
                  {"predicted_seconds", slo.predicted_seconds()},
                  {"target_met", slo.target_met()},
                  {"min_ratio", FloatToShortestDouble(slo.min_ratio())},
                  {"max_ratio", FloatToShortestDouble(slo.max_ratio())}};
  }
  return out;
}

}  // namespace tomeserve::server
