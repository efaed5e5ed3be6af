// The HTTP front door's pure mappings (server/http_openai.h, http_a1111.h, http_json.h): request bodies into
// v1.GenerateRequest with errors naming the wire field, the proto-field renaming, and the HTTP status table. The
// end-to-end behaviour with the real clients is tests/python/test_http_api.py.
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "server/http_a1111.h"
#include "server/http_json.h"
#include "server/http_openai.h"
#include "server/status_convert.h"

namespace tomeserve::server {
namespace {

nlohmann::json J(const char* text) { return nlohmann::json::parse(text); }

TEST(HttpOpenAiTest, ReadsTheFieldsAndExtensions) {
  absl::StatusOr<v1::GenerateRequest> r = OpenAiImageRequest(J(R"({
      "model": "sd15", "prompt": "a fox", "n": 2, "size": "768x512", "response_format": "b64_json",
      "user": "u1", "quality": "standard", "negative_prompt": "blur", "num_inference_steps": 30,
      "guidance_scale": 6.5, "seed": 18446744073709551615, "scheduler": "dpmpp_2m_karras",
      "tome": {"ratio": 0.5, "max_ratio": 0.6, "sx": 2}, "latency_target_seconds": 3, "priority": "batch",
      "request_id": "r-1"})"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->model(), "sd15");
  EXPECT_EQ(r->num_images(), 2u);
  EXPECT_EQ(r->width(), 768u);
  EXPECT_EQ(r->height(), 512u);
  EXPECT_EQ(r->negative_prompt(), "blur");
  EXPECT_EQ(r->num_inference_steps(), 30u);
  EXPECT_FLOAT_EQ(r->guidance_scale(), 6.5f);
  EXPECT_EQ(r->seed(), 18446744073709551615ull);
  EXPECT_EQ(r->scheduler(), v1::SCHEDULER_DPMPP_2M_KARRAS);
  EXPECT_FLOAT_EQ(r->tome().ratio(), 0.5f);
  EXPECT_FLOAT_EQ(r->tome().max_ratio(), 0.6f);
  EXPECT_EQ(r->tome().sx(), 2u);
  EXPECT_DOUBLE_EQ(r->latency_target_seconds(), 3);
  EXPECT_EQ(r->priority(), v1::PRIORITY_BATCH);
  EXPECT_EQ(r->request_id(), "r-1");
}

TEST(HttpOpenAiTest, UnsetFieldsStayUnsetForTheServerDefaults) {
  absl::StatusOr<v1::GenerateRequest> r = OpenAiImageRequest(J(R"({"prompt": "a fox", "seed": null})"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->width(), 0u);
  EXPECT_FALSE(r->has_seed());
  EXPECT_FALSE(r->has_guidance_scale());
  EXPECT_FALSE(r->tome().has_ratio());
}

TEST(HttpOpenAiTest, ErrorsNameTheField) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({})", "prompt is required"},
      {R"({"prompt": "a", "n": 0})", "n must be an integer in [1, "},
      {R"({"prompt": "a", "n": 1.5})", "n must be an integer"},
      {R"({"prompt": "a", "size": "512"})", "size must be \"WIDTHxHEIGHT\""},
      {R"({"prompt": "a", "size": "0x512"})", "size must be"},
      {R"({"prompt": "a", "size": "-8x512"})", "size must be"},
      {R"({"prompt": "a", "response_format": "url"})", "response_format \"url\" is not supported"},
      {R"({"prompt": "a", "style": "vivid"})", "style \"vivid\" is not supported"},
      {R"({"prompt": "a", "seed": -1})", "seed must be an integer in [0, "},
      {R"({"prompt": "a", "scheduler": "heun"})", "scheduler is not one of the schedulers"},
      {R"({"prompt": "a", "tome": 0.5})", "tome must be an object"},
      {R"({"prompt": "a", "tome": {"rate": 0.5}})", "tome: "},
      {R"({"prompt": "a", "priority": "urgent"})", "priority \"urgent\" is unknown"},
      {R"({"prompt": "a", "colour": "red"})", "colour: unrecognized request argument"},
  };
  for (const auto& [body, want] : cases) {
    absl::StatusOr<v1::GenerateRequest> r = OpenAiImageRequest(J(body));
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << body;
    EXPECT_TRUE(absl::StartsWith(r.status().message(), want)) << body << " -> " << r.status().message();
  }
}

TEST(HttpOpenAiTest, SharedPathErrorsAreRenamedAndCarryTheParam) {
  const absl::Status renamed = OpenAiFieldNames(absl::InvalidArgumentError("num_images is 9; allowed: [1, 4]"));
  EXPECT_EQ(renamed.message(), "n: num_images is 9; allowed: [1, 4]");
  EXPECT_EQ(OpenAiFieldNames(absl::InvalidArgumentError("width is 65")).message(), "size: width is 65");
  EXPECT_EQ(OpenAiFieldNames(absl::InvalidArgumentError("prompt must not be empty")).message(),
            "prompt must not be empty");
  nlohmann::json error = OpenAiError(renamed, 400)["error"];
  EXPECT_EQ(error["param"], "n");
  EXPECT_EQ(error["type"], "invalid_request_error");
  EXPECT_EQ(error["code"], "invalid_argument");
  EXPECT_TRUE(OpenAiError(absl::InvalidArgumentError("the request body is not valid JSON"), 400)["error"]["param"]
                  .is_null());
  EXPECT_EQ(OpenAiError(absl::UnauthenticatedError("no token"), 401)["error"]["type"], "authentication_error");
  EXPECT_EQ(OpenAiError(absl::ResourceExhaustedError("queue full"), 429)["error"]["type"], "rate_limit_error");
  EXPECT_TRUE(OpenAiError(absl::ResourceExhaustedError("queue full"), 429)["error"]["param"].is_null());
}

TEST(HttpA1111Test, SamplersSchedulesAndOverrides) {
  absl::StatusOr<v1::GenerateRequest> r = A1111Txt2ImgRequest(
      J(R"({"prompt": "a", "seed": 5, "steps": 20, "cfg_scale": 7, "width": 512, "height": 768,
            "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "override_settings": {"token_merging_ratio": 0.4, "sd_model_checkpoint": "sd15"},
            "enable_hr": false, "hr_scale": 2, "eta": 1.0, "styles": [], "unknown_extension_field": 3})"),
      A1111Options{});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->seed(), 5u);
  EXPECT_EQ(r->num_images(), 4u);
  EXPECT_EQ(r->scheduler(), v1::SCHEDULER_DPMPP_2M_KARRAS);
  EXPECT_FLOAT_EQ(r->tome().ratio(), 0.4f);
  EXPECT_EQ(r->model(), "sd15");
  EXPECT_EQ(r->width(), 512u);
  EXPECT_EQ(r->height(), 768u);

  // seed -1: unset (the server draws one); the caller's options are the defaults.
  r = A1111Txt2ImgRequest(J(R"({"prompt": "a", "seed": -1, "sampler_name": "k_euler_a", "eta": 1})"),
                          A1111Options{.model = "other", .token_merging_ratio = 0.3});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->has_seed());
  EXPECT_EQ(r->scheduler(), v1::SCHEDULER_EULER_ANCESTRAL);
  EXPECT_EQ(r->model(), "other");
  EXPECT_FLOAT_EQ(r->tome().ratio(), 0.3f);
  // No sampler: the model's own scheduler.
  r = A1111Txt2ImgRequest(J(R"({"prompt": "a"})"), A1111Options{});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->scheduler(), v1::SCHEDULER_UNSPECIFIED);
  EXPECT_EQ(r->num_images(), 1u);
}

TEST(HttpA1111Test, FeaturesWeLackAreRefusedNamingTheField) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"enable_hr": true})", "enable_hr is true"},
      {R"({"restore_faces": true})", "restore_faces is true"},
      {R"({"styles": ["cinematic"]})", "styles is"},
      {R"({"subseed_strength": 0.5})", "subseed_strength is 0.5"},
      {R"({"alwayson_scripts": {"controlnet": {}}})", "alwayson_scripts is"},
      {R"({"sampler_name": "Heun"})", "sampler_name \"Heun\" is not available"},
      {R"({"sampler_name": "Euler", "scheduler": "karras"})", "scheduler karras is not available"},
      {R"({"scheduler": "exponential"})", "scheduler \"exponential\" is not available"},
      {R"({"sampler_name": "DDIM", "eta": 0.5})", "eta is 0.5"},
      {R"({"override_settings": {"CLIP_stop_at_last_layers": 2}})", "override_settings.CLIP_stop_at_last_layers"},
      {R"({"override_settings": {"sd_vae": "x.safetensors"}})", "override_settings.sd_vae"},
      {R"({"override_settings": {"img2img_fix_steps": true}})", "override_settings.img2img_fix_steps"},
  };
  for (const auto& [body, want] : cases) {
    absl::StatusOr<v1::GenerateRequest> r = A1111Txt2ImgRequest(J(body), A1111Options{});
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented) << body;
    EXPECT_TRUE(absl::StartsWith(r.status().message(), want)) << body << " -> " << r.status().message();
  }
  absl::StatusOr<v1::GenerateRequest> typed = A1111Txt2ImgRequest(J(R"({"steps": "20"})"), A1111Options{});
  EXPECT_EQ(typed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(A1111FieldNames(absl::InvalidArgumentError("guidance_scale is 500")).message(),
            "cfg_scale: guidance_scale is 500");
  EXPECT_EQ(A1111FieldNames(absl::NotFoundError("model: no model named \"x\"")).message(),
            "sd_model_checkpoint: model: no model named \"x\"");
}

TEST(HttpA1111Test, OptionsApplyOnlyWhatTomeserveHonours) {
  ModelCatalog catalog{.default_model = "tiny", .models = {ModelDescription{.name = "tiny"}}};
  A1111Options options;
  EXPECT_TRUE(ApplyA1111Options(J(R"({"sd_model_checkpoint": "tiny", "token_merging_ratio": 0.5})"), catalog,
                                &options).ok());
  EXPECT_EQ(options.model, "tiny");
  EXPECT_EQ(options.token_merging_ratio, 0.5);
  EXPECT_EQ(ApplyA1111Options(J(R"({"sd_model_checkpoint": "sdxl"})"), catalog, &options).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ApplyA1111Options(J(R"({"show_progressbar": true, "token_merging_ratio": 0.1})"), catalog, &options)
                .code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(options.token_merging_ratio, 0.5);  // a refused body changes nothing
  EXPECT_EQ(A1111OptionsJson(options, catalog, 0)["sd_model_checkpoint"], "tiny");
}

TEST(HttpJsonTest, ParseErrorsAndTypes) {
  EXPECT_TRUE(absl::StartsWith(ParseJsonObject("{\"a\": ").status().message(), "the request body is not valid JSON"));
  EXPECT_TRUE(absl::StartsWith(ParseJsonObject("[1]").status().message(), "the request body must be a JSON object"));
  nlohmann::json o = J(R"({"i": 2.0, "f": 2.5, "b": "yes", "s": 3})");
  JsonReader r(o, "x.");
  EXPECT_EQ(r.Int("i", 0, 5), 2);
  EXPECT_TRUE(r.status().ok());
  EXPECT_EQ(r.Int("f", 0, 5), std::nullopt);
  EXPECT_EQ(r.status().message(), "x.f must be an integer in [0, 5]; got 2.5");
  JsonReader q(o);
  EXPECT_EQ(q.Bool("b"), std::nullopt);
  EXPECT_EQ(q.String("s"), std::nullopt);  // the first error is kept
  EXPECT_EQ(q.status().message(), "b must be true or false; got \"yes\"");
  EXPECT_EQ(q.Unread(), (std::vector<std::string>{"f", "i"}));
}

TEST(HttpStatusTest, CodesFollowGrpcGateway) {
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kOk), 200);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kInvalidArgument), 400);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kUnauthenticated), 401);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kNotFound), 404);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kResourceExhausted), 429);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kCancelled), 499);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kUnavailable), 503);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kDeadlineExceeded), 504);
  EXPECT_EQ(HttpStatusCode(absl::StatusCode::kInternal), 500);
}

}  // namespace
}  // namespace tomeserve::server
