// Wire <-> server types: validates a GenerateRequest into a GenerationRequest (every default filled in) and
// turns a GenerationResult back into a GenerateResponse. Runs on gRPC threads; torch-free.
//
// Validation errors are INVALID_ARGUMENT naming the field and its allowed range; an unknown model is
// NOT_FOUND. Prompt length: CLIP sees at most 77 tokens including <|startoftext|> and <|endoftext|>;
// diffusers silently truncates longer prompts, the server rejects them (max_prompt_tokens) so a client
// never gets an image of a prompt it did not send.
#pragma once

#include <cstdint>
#include <functional>

#include "absl/status/statusor.h"
#include "server/job.h"
#include "server/model_catalog.h"
#include "tomeserve/v1/image_generator.pb.h"

namespace tomeserve::server {

struct RequestLimits {
  int max_prompt_bytes = 4096;
  int max_prompt_tokens = 77;  // including BOS and EOS; at most 77
  int max_side = 1024;         // width and height in [64, max_side], multiples of 8
  int64_t max_pixels = 1024 * 1024;
  int max_steps = 150;
  int max_images = 4;
  double max_guidance = 100;
  double default_tome_ratio = 0;
  // SLO controller defaults for requests that set neither: a latency target (0 = none) and the highest ratio
  // the controller may raise to (0 = off).
  double default_latency_target_seconds = 0;
  double adaptive_tome_max_ratio = 0;
  double max_latency_target_seconds = 3600;
  int max_request_id_bytes = 128;  // request_id: printable ASCII only
};

// Seeds and request ids for unset fields; tests pass a deterministic one.
struct RandomSource {
  std::function<uint64_t()> next;
  static RandomSource Default();
};

absl::StatusOr<GenerationRequest> ConvertRequest(const v1::GenerateRequest& request,
                                                 const ModelCatalog& catalog, const RequestLimits& limits,
                                                 const RandomSource& random);

// A proto float as the shortest decimal that reads back as the same float, as a double: 0.3f -> 0.3 (not
// 0.30000001192...), so int(tokens * ratio) matches tomesd's Python float arithmetic.
double FloatToShortestDouble(float value);

void ToProto(const tome::TokenMerging& tome, v1::TokenMerging* out);
void ToProto(const GenerationRequest& request, const GenerationResult& result, v1::GenerateResponse* out);
v1::Scheduler ToProto(pipeline::SchedulerKind kind);

}  // namespace tomeserve::server
