// Reading HTTP request bodies (JSON, nlohmann::json) into typed fields with errors that name the field: the
// shared part of the OpenAI and AUTOMATIC1111 mappings (http_openai.h, http_a1111.h). Torch- and gRPC-free.
//
// A JsonReader reads one object; every getter returns nullopt for an absent or null field and, for a field of
// the wrong type or out of range, records the first error (INVALID_ARGUMENT "n must be an integer in [1, 4]; got
// \"two\"") and returns nullopt. Callers read every field, then check status().
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "tomeserve/v1/image_generator.pb.h"

namespace tomeserve::server {

// The body as a JSON object, or INVALID_ARGUMENT ("the request body is not valid JSON: ... at byte 12", "the
// request body must be a JSON object").
absl::StatusOr<nlohmann::json> ParseJsonObject(absl::string_view body);

class JsonReader {
 public:
  // `object` must be a JSON object and outlive the reader; `prefix` names it in errors ("override_settings.").
  explicit JsonReader(const nlohmann::json& object, std::string prefix = "");

  std::optional<std::string> String(absl::string_view field);
  std::optional<int64_t> Int(absl::string_view field, int64_t min, int64_t max);
  std::optional<uint64_t> Uint64(absl::string_view field);  // [0, 2^64 - 1]
  std::optional<double> Number(absl::string_view field);
  std::optional<bool> Bool(absl::string_view field);
  // The raw value (any type), or null when absent or null.
  const nlohmann::json* Raw(absl::string_view field);
  // Records an error about `field` (its full name is prefixed): for checks a getter cannot express.
  void Fail(absl::string_view field, absl::string_view message, absl::StatusCode code = absl::StatusCode::kInvalidArgument);
  // The field's name as errors write it.
  std::string Name(absl::string_view field) const { return prefix_ + std::string(field); }

  // Fields of the object no getter asked for, in order.
  std::vector<std::string> Unread() const;
  // OK, or the first error.
  const absl::Status& status() const { return status_; }

 private:
  const nlohmann::json* Find(absl::string_view field);
  void TypeError(absl::string_view field, absl::string_view want, const nlohmann::json& got);

  const nlohmann::json& object_;
  const std::string prefix_;
  std::vector<std::string> read_;
  absl::Status status_;
};

// Validation errors name the request's proto field first ("num_images is 9; allowed: [1, 4]",
// request_convert.h). The field an error names: its first word ("num_images"; "" when none).
std::string LeadingField(absl::string_view message);
// An error about proto field P, renamed for a wire whose field is H ({P, H} in `names`): "n: num_images is 9;
// allowed: [1, 4]". Other statuses are returned as they are.
absl::Status RenameField(const absl::Status& status,
                         const std::vector<std::pair<std::string, std::string>>& names);

// What tomeserve reports beyond the image bytes, as JSON numbers and strings: request_id, model, seeds,
// batch_size, the effective tome settings, timings (seconds) and, when the SLO controller chose the ratio, slo.
// The OpenAI response carries it under "tomeserve", the AUTOMATIC1111 info string beside A1111's own keys.
nlohmann::json GenerationDetails(const v1::GenerateResponse& response);

// A JSON value as a short string for messages: "\"two\"", "1.5", "[...]" (at most 40 bytes).
std::string ShortJson(const nlohmann::json& value);

}  // namespace tomeserve::server
