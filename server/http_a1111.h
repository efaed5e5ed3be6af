// The AUTOMATIC1111 web UI's API (/sdapi/v1) on tomeserve, as its clients use it (the webuiapi package, Open
// WebUI, SillyTavern): txt2img bodies into v1::GenerateRequest (the gRPC path from there), its response with the
// `info` JSON string webuiapi parses, and the listing routes. Torch-free; pure functions (the HTTP plumbing,
// /progress and /interrupt are http_server.cpp's).
//
// txt2img fields read: prompt, negative_prompt, seed (-1: random), steps, cfg_scale, width, height (absent: the
// model's native size), batch_size, n_iter (batch_size x n_iter images, seeds seed, seed+1, ...), sampler_name
// (or the older sampler_index) and scheduler ("automatic", "karras") mapped by A1111Samplers(), send_images,
// override_settings {token_merging_ratio, sd_model_checkpoint, CLIP_stop_at_last_layers (1), sd_vae
// ("Automatic", "None")}. Fields for features tomeserve does not have are accepted at their off values and
// refused otherwise (UNIMPLEMENTED naming the field: HTTP 422): enable_hr, restore_faces, tiling, styles,
// subseed_strength, script_name, alwayson_scripts, refiner_checkpoint, s_churn, s_noise, s_min_uncond, eta
// (the sampler's own), clip_skip. Settings that only matter with one of those on (hr_*, subseed, script_args,
// denoising_strength, ...) and storage flags (save_images, do_not_save_*) are accepted and have no effect.
// Fields A1111 does not know are ignored, as A1111 does.
#pragma once

#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "pipeline/scheduler_config.h"
#include "server/job.h"
#include "server/model_catalog.h"
#include "tomeserve/v1/image_generator.pb.h"

namespace tomeserve::server {

// What POST /sdapi/v1/options sets. A1111 keeps options server-wide; tomeserve keeps them per tenant, so one
// caller's choice never changes another's images.
struct A1111Options {
  std::string model;                          // sd_model_checkpoint; empty: the default model
  std::optional<double> token_merging_ratio;  // unset: the server's --default-tome-ratio
};

absl::StatusOr<v1::GenerateRequest> A1111Txt2ImgRequest(const nlohmann::json& body, const A1111Options& options);

// Errors from the shared path name proto fields; renamed for A1111 callers ("cfg_scale: guidance_scale is ...").
absl::Status A1111FieldNames(const absl::Status& status);

// {"images": [base64 PNG], "parameters": the request body, "info": JSON string}. `effective` is the request as
// it ran (every default filled in: the job's), `started` when the call arrived (A1111's job_timestamp).
nlohmann::json A1111Txt2ImgResponse(const nlohmann::json& body, const GenerationRequest& effective,
                                    const v1::GenerateResponse& response, absl::Time started);

// A1111's error body: {"error": reason, "detail": message, "body": "", "errors": message}.
nlohmann::json A1111Error(const absl::Status& status, int http_status);

nlohmann::json A1111Samplers();
nlohmann::json A1111Schedulers();
nlohmann::json A1111Models(const ModelCatalog& catalog);
nlohmann::json A1111OptionsJson(const A1111Options& options, const ModelCatalog& catalog, double default_ratio);
// POST /sdapi/v1/options: applies the keys tomeserve honours; others are refused naming the key (NOT_FOUND for
// an unknown model).
absl::Status ApplyA1111Options(const nlohmann::json& body, const ModelCatalog& catalog, A1111Options* options);

}  // namespace tomeserve::server
