// The OpenAI Images API on tomeserve: POST /v1/images/generations bodies into v1::GenerateRequest (so they take
// the gRPC path from there: request_convert, the scheduler, the workers), the response and errors in OpenAI's
// shapes, GET /v1/models. Torch-free; pure functions (the HTTP plumbing is http_server.cpp's).
//
// Request fields: model (a served model; absent: the default), prompt, n, size ("WxH"), response_format
// ("b64_json"; "url" is refused: images are never stored), user; OpenAI fields whose non-default values we
// cannot honour (quality, style, output_format, background, moderation, stream, partial_images,
// output_compression) are refused with their field named, their defaults accepted. Extensions: negative_prompt,
// num_inference_steps, guidance_scale, seed, scheduler (pndm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras:
// the CLI's names), tome (v1.TokenMerging in its JSON names: {"ratio": 0.5, "max_ratio": 0.6}),
// latency_target_seconds, priority (interactive, batch), request_id. Any other field is refused, as OpenAI does.
#pragma once

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/model_catalog.h"
#include "tomeserve/v1/image_generator.pb.h"

namespace tomeserve::server {

// The body (a JSON object) as a GenerateRequest, or INVALID_ARGUMENT naming the OpenAI field.
absl::StatusOr<v1::GenerateRequest> OpenAiImageRequest(const nlohmann::json& body);

// Errors from the shared path (request_convert) name proto fields; renamed for OpenAI callers ("n: num_images
// is 9; ...", "size: width is 65; ...").
absl::Status OpenAiFieldNames(const absl::Status& status);

// {"created": unix seconds, "data": [{"b64_json", "revised_prompt"}], "tomeserve": GenerationDetails}.
nlohmann::json OpenAiImageResponse(const v1::GenerateRequest& request, const v1::GenerateResponse& response,
                                   absl::Time created);

// {"error": {"message", "type", "param", "code"}}: param is the field the message names (null when none), type
// "invalid_request_error" for 4xx codes (but 401 "authentication_error", 429 "rate_limit_error"), else
// "server_error"; code the status's name in lower case ("invalid_argument").
nlohmann::json OpenAiError(const absl::Status& status, int http_status);

// {"object": "list", "data": [{"id", "object": "model", "created": 0, "owned_by": "tomeserve"}]}.
nlohmann::json OpenAiModels(const ModelCatalog& catalog);

}  // namespace tomeserve::server
