// server::ConvertRequest: defaults are filled in, every bad field is INVALID_ARGUMENT (NOT_FOUND for the
// model) with a message naming the field, proto float ratios become their shortest decimal, and ToProto
// reports the effective settings. The token-limit case uses the tiny model's real CLIP tokenizer
// (TOMESERVE_TEST_TOKENIZER_DIR).
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/request_convert.h"

namespace tomeserve::server {
namespace {

ModelCatalog Catalog(const pipeline::ClipTokenizer* tokenizer = nullptr) {
  ModelDescription tiny{.name = "tiny",
                        .native_width = 64,
                        .native_height = 64,
                        .default_scheduler = pipeline::SchedulerKind::kDdim,
                        .devices = {"cpu"},
                        .dtype = "fp32",
                        .tokenizer = tokenizer};
  ModelDescription big = tiny;
  big.name = "big";
  big.native_width = big.native_height = 512;
  ModelDescription xl = tiny;
  xl.name = "xl";
  xl.family = "sdxl";
  xl.tome_downsamples = {2, 4};
  return {.default_model = "tiny", .models = {tiny, big, xl}};
}

RandomSource Fixed() {
  return {[] { return uint64_t{0x1234567890abcdefULL}; }};
}

v1::GenerateRequest Valid() {
  v1::GenerateRequest r;
  r.set_prompt("a cat");
  return r;
}

absl::StatusOr<GenerationRequest> Convert(const v1::GenerateRequest& r, RequestLimits limits = {},
                                          const ModelCatalog& catalog = Catalog()) {
  return ConvertRequest(r, catalog, limits, Fixed());
}

TEST(RequestConvertTest, FillsDefaults) {
  RequestLimits limits;
  limits.default_tome_ratio = 0.25;
  absl::StatusOr<GenerationRequest> g = Convert(Valid(), limits);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->key.model, "tiny");
  EXPECT_EQ(g->key.width, 64);
  EXPECT_EQ(g->key.height, 64);
  EXPECT_EQ(g->key.steps, 50);
  EXPECT_EQ(g->key.scheduler, pipeline::SchedulerKind::kDdim);
  EXPECT_EQ(g->guidance_scale, 7.5);
  EXPECT_EQ(g->num_images, 1);
  EXPECT_EQ(g->seed, 0x90abcdefULL);  // random, 32 bits
  EXPECT_EQ(g->request_id, "1234567890abcdef");
  EXPECT_EQ(g->output_format, OutputFormat::kPng);
  EXPECT_EQ(g->tome.ratio, 0.25);
  EXPECT_EQ(g->tome, (tome::TokenMerging{.ratio = 0.25}));
  EXPECT_EQ(g->key.tome, g->tome);
}

// max_downsample's default is the model's finest level with attention, so a ratio always merges something; a
// setting below it (SDXL at tomesd's default 1) merges nothing and is refused, naming the levels.
TEST(RequestConvertTest, MaxDownsampleDefaultIsModelAware) {
  v1::GenerateRequest r = Valid();
  r.mutable_tome()->set_ratio(0.5f);
  absl::StatusOr<GenerationRequest> sd = Convert(r);
  ASSERT_TRUE(sd.ok()) << sd.status();
  EXPECT_EQ(sd->tome.max_downsample, 1);
  r.set_model("xl");
  absl::StatusOr<GenerationRequest> xl = Convert(r);
  ASSERT_TRUE(xl.ok()) << xl.status();
  EXPECT_EQ(xl->tome.max_downsample, 2);
  r.mutable_tome()->set_max_downsample(1);
  absl::StatusOr<GenerationRequest> none = Convert(r);
  ASSERT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(none.status().message(), ::testing::HasSubstr("tome.max_downsample is 1"));
  EXPECT_THAT(none.status().message(), ::testing::HasSubstr("downsample 2, 4"));
  r.mutable_tome()->set_ratio(0);  // no merging asked for: nothing to refuse
  EXPECT_TRUE(Convert(r).ok());
  r.mutable_tome()->set_max_ratio(0.5f);  // the controller may merge: refused too
  EXPECT_EQ(Convert(r).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RequestConvertTest, TakesExplicitValues) {
  v1::GenerateRequest r = Valid();
  r.set_model("big");
  r.set_width(128);
  r.set_height(256);
  r.set_num_inference_steps(7);
  r.set_guidance_scale(3.5f);
  r.set_seed(99);
  r.set_num_images(2);
  r.set_scheduler(v1::SCHEDULER_EULER_ANCESTRAL);
  r.set_output_format(v1::OUTPUT_FORMAT_RAW_RGB8);
  r.set_request_id("abc");
  r.mutable_tome()->set_ratio(0.3f);
  r.mutable_tome()->set_max_downsample(2);
  r.mutable_tome()->set_use_rand(false);
  r.mutable_tome()->set_merge_mlp(true);
  absl::StatusOr<GenerationRequest> g = Convert(r);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->key.model, "big");
  EXPECT_EQ(g->key.width, 128);
  EXPECT_EQ(g->key.height, 256);
  EXPECT_EQ(g->key.steps, 7);
  EXPECT_EQ(g->key.scheduler, pipeline::SchedulerKind::kEulerAncestral);
  EXPECT_EQ(g->guidance_scale, 3.5);
  EXPECT_EQ(g->seed, 99u);
  EXPECT_EQ(g->num_images, 2);
  EXPECT_EQ(g->output_format, OutputFormat::kRawRgb8);
  EXPECT_EQ(g->request_id, "abc");
  EXPECT_EQ(g->tome.ratio, 0.3);  // exactly the double 0.3, not 0.30000001192092896
  EXPECT_EQ(g->tome.max_downsample, 2);
  EXPECT_FALSE(g->tome.use_rand);
  EXPECT_TRUE(g->tome.merge_mlp);
}

TEST(RequestConvertTest, FloatRatioBecomesShortestDecimal) {
  EXPECT_EQ(FloatToShortestDouble(0.3f), 0.3);
  EXPECT_EQ(FloatToShortestDouble(0.5f), 0.5);
  EXPECT_EQ(FloatToShortestDouble(0.1f), 0.1);
  EXPECT_EQ(FloatToShortestDouble(0.0f), 0.0);
  EXPECT_TRUE(std::isnan(FloatToShortestDouble(std::nanf(""))));
  // int(N * ratio) as tomesd computes it in Python: int(4096 * 0.3) = 1228.
  EXPECT_EQ(static_cast<int>(4096 * FloatToShortestDouble(0.3f)), 1228);
}

TEST(RequestConvertTest, InactiveTomeSettingsShareOneBatchKey) {
  v1::GenerateRequest a = Valid(), b = Valid();
  a.mutable_tome()->set_ratio(0);
  b.mutable_tome()->set_ratio(0);
  b.mutable_tome()->set_sx(4);
  absl::StatusOr<GenerationRequest> ga = Convert(a), gb = Convert(b);
  ASSERT_TRUE(ga.ok() && gb.ok());
  EXPECT_EQ(ga->key, gb->key);
  EXPECT_EQ(gb->tome.sx, 4);  // reported as asked
}

struct BadCase {
  std::string name;
  std::function<void(v1::GenerateRequest*)> mutate;
  absl::StatusCode code;
  std::string field;  // must appear in the message
};

TEST(RequestConvertTest, RejectsEachBadFieldNamingIt) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const BadCase cases[] = {
      {"empty prompt", [](auto* r) { r->set_prompt(""); }, absl::StatusCode::kInvalidArgument, "prompt"},
      {"long prompt", [](auto* r) { r->set_prompt(std::string(5000, 'a')); },
       absl::StatusCode::kInvalidArgument, "prompt is 5000 bytes"},
      {"long negative", [](auto* r) { r->set_negative_prompt(std::string(5000, 'a')); },
       absl::StatusCode::kInvalidArgument, "negative_prompt"},
      {"width not /8", [](auto* r) { r->set_width(100); }, absl::StatusCode::kInvalidArgument, "width"},
      {"width small", [](auto* r) { r->set_width(32); }, absl::StatusCode::kInvalidArgument, "[64, 1024]"},
      {"height large", [](auto* r) { r->set_height(2048); }, absl::StatusCode::kInvalidArgument, "height"},
      {"pixels",
       [](auto* r) {
         r->set_width(1024);
         r->set_height(1024);
         r->set_num_images(1);
       },
       absl::StatusCode::kOk, ""},
      {"steps", [](auto* r) { r->set_num_inference_steps(151); }, absl::StatusCode::kInvalidArgument,
       "num_inference_steps"},
      {"images", [](auto* r) { r->set_num_images(5); }, absl::StatusCode::kInvalidArgument, "num_images"},
      {"guidance NaN", [nan](auto* r) { r->set_guidance_scale(nan); }, absl::StatusCode::kInvalidArgument,
       "guidance_scale"},
      {"guidance negative", [](auto* r) { r->set_guidance_scale(-1); }, absl::StatusCode::kInvalidArgument,
       "guidance_scale"},
      {"guidance large", [](auto* r) { r->set_guidance_scale(1000); }, absl::StatusCode::kInvalidArgument,
       "[0, 100]"},
      {"scheduler", [](auto* r) { r->set_scheduler(static_cast<v1::Scheduler>(42)); },
       absl::StatusCode::kInvalidArgument, "scheduler"},
      {"output format", [](auto* r) { r->set_output_format(static_cast<v1::OutputFormat>(9)); },
       absl::StatusCode::kInvalidArgument, "output_format"},
      {"ratio high", [](auto* r) { r->mutable_tome()->set_ratio(0.9f); }, absl::StatusCode::kInvalidArgument,
       "tome.ratio"},
      {"ratio negative", [](auto* r) { r->mutable_tome()->set_ratio(-0.1f); },
       absl::StatusCode::kInvalidArgument, "tome.ratio"},
      {"ratio NaN", [nan](auto* r) { r->mutable_tome()->set_ratio(nan); }, absl::StatusCode::kInvalidArgument,
       "tome.ratio"},
      {"max_downsample", [](auto* r) { r->mutable_tome()->set_max_downsample(3); },
       absl::StatusCode::kInvalidArgument, "tome.max_downsample"},
      {"max_downsample big", [](auto* r) { r->mutable_tome()->set_max_downsample(16); },
       absl::StatusCode::kInvalidArgument, "tome.max_downsample"},
      {"sx", [](auto* r) { r->mutable_tome()->set_sx(17); }, absl::StatusCode::kInvalidArgument, "tome.sx"},
      {"sy", [](auto* r) { r->mutable_tome()->set_sy(100); }, absl::StatusCode::kInvalidArgument, "tome.sy"},
      {"sx past int", [](auto* r) { r->mutable_tome()->set_sx(4000000000u); }, absl::StatusCode::kInvalidArgument,
       "tome.sx must be in [1, 16], got 2147483647"},
      {"model", [](auto* r) { r->set_model("nope"); }, absl::StatusCode::kNotFound, "nope"},
      {"request id", [](auto* r) { r->set_request_id(std::string(200, 'x')); },
       absl::StatusCode::kInvalidArgument, "request_id"},
      {"request id 129", [](auto* r) { r->set_request_id(std::string(129, 'x')); },
       absl::StatusCode::kInvalidArgument, "request_id"},
      {"request id 128", [](auto* r) { r->set_request_id(std::string(128, '~')); }, absl::StatusCode::kOk,
       ""},
      {"request id newline", [](auto* r) { r->set_request_id("a\nstatus=OK"); },
       absl::StatusCode::kInvalidArgument, "request_id"},
      {"request id control", [](auto* r) { r->set_request_id(std::string("a\x1b[31m")); },
       absl::StatusCode::kInvalidArgument, "request_id"},
      {"request id DEL", [](auto* r) { r->set_request_id("a\x7f"); }, absl::StatusCode::kInvalidArgument,
       "request_id"},
      {"request id UTF-8", [](auto* r) { r->set_request_id("caf\xc3\xa9"); },
       absl::StatusCode::kInvalidArgument, "printable ASCII"},
  };
  for (const BadCase& c : cases) {
    v1::GenerateRequest r = Valid();
    c.mutate(&r);
    absl::StatusOr<GenerationRequest> g = Convert(r);
    EXPECT_EQ(g.status().code(), c.code) << c.name << ": " << g.status();
    EXPECT_NE(g.status().message().find(c.field), absl::string_view::npos) << c.name << ": " << g.status();
  }
}

TEST(RequestConvertTest, PixelBudget) {
  RequestLimits limits;
  limits.max_pixels = 256 * 256;
  v1::GenerateRequest r = Valid();
  r.set_width(512);
  r.set_height(256);
  absl::StatusOr<GenerationRequest> g = Convert(r, limits);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("width x height"), absl::string_view::npos) << g.status();
}

TEST(RequestConvertTest, RejectsPromptsOverTheTokenLimit) {
  const char* dir = std::getenv("TOMESERVE_TEST_TOKENIZER_DIR");
  if (dir == nullptr) GTEST_SKIP() << "TOMESERVE_TEST_TOKENIZER_DIR not set";
  absl::StatusOr<std::unique_ptr<pipeline::ClipTokenizer>> tokenizer = pipeline::ClipTokenizer::Load(dir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const ModelCatalog catalog = Catalog(tokenizer->get());
  std::string prompt;
  // "cat" is one token: 75 of them plus start and end make exactly 77.
  for (int i = 0; i < 75; ++i) prompt += "cat ";
  v1::GenerateRequest r = Valid();
  r.set_prompt(prompt);
  EXPECT_TRUE(Convert(r, {}, catalog).ok());
  r.set_prompt(prompt + "cat");
  absl::StatusOr<GenerationRequest> g = Convert(r, {}, catalog);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("prompt is longer than 77 CLIP tokens: it has 78 "), absl::string_view::npos)
      << g.status();
  r = Valid();
  r.set_negative_prompt(prompt + "cat");
  g = Convert(r, {}, catalog);
  EXPECT_NE(g.status().message().find("negative_prompt"), absl::string_view::npos) << g.status();
}

TEST(RequestConvertTest, ResponseCarriesEffectiveSettings) {
  RequestLimits limits;
  limits.default_tome_ratio = 0.5;  // a server that merges by default (--default-tome-ratio 0.5)
  absl::StatusOr<GenerationRequest> g = Convert(Valid(), limits);
  ASSERT_TRUE(g.ok());
  GenerationResult result;
  result.images.push_back({.data = "png", .mime_type = "image/png", .width = 64, .height = 64, .seed = 5});
  result.batch_size = 3;
  result.total_seconds = 1.5;
  result.merged_tokens.push_back({"down_blocks.0", 64, 32});
  result.tome = g->tome;
  v1::GenerateResponse out;
  ToProto(*g, result, &out);
  EXPECT_EQ(out.images_size(), 1);
  EXPECT_EQ(out.images(0).seed(), 5u);
  EXPECT_EQ(out.batch_size(), 3u);
  EXPECT_EQ(out.timings().total_seconds(), 1.5);
  EXPECT_FLOAT_EQ(out.tome().ratio(), 0.5f);
  EXPECT_TRUE(out.tome().has_use_rand());
  EXPECT_EQ(out.tome().sx(), 2u);
  EXPECT_EQ(out.merged_tokens(0).tokens_after(), 32u);
  EXPECT_EQ(out.request_id(), g->request_id);
  EXPECT_EQ(out.model(), "tiny");
  EXPECT_FALSE(out.has_slo());
}

TEST(RequestConvertTest, PriorityOrdersBestEffortCalls) {
  absl::StatusOr<GenerationRequest> g = Convert(Valid());
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->priority, Priority::kInteractive);  // unset
  v1::GenerateRequest r = Valid();
  r.set_priority(v1::PRIORITY_BATCH);
  g = Convert(r);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->priority, Priority::kBatch);
  r.set_priority(static_cast<v1::Priority>(7));
  g = Convert(r);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("priority is 7; allowed: PRIORITY_INTERACTIVE (0) or PRIORITY_BATCH (1)"),
            absl::string_view::npos)
      << g.status();
}

TEST(RequestConvertTest, ControllerRangeAndTarget) {
  v1::GenerateRequest r = Valid();
  r.mutable_tome()->set_ratio(0.2f);
  r.mutable_tome()->set_max_ratio(0.6f);
  r.set_latency_target_seconds(2.5);
  absl::StatusOr<GenerationRequest> g = Convert(r);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_DOUBLE_EQ(g->tome_max_ratio, 0.6);
  EXPECT_DOUBLE_EQ(g->latency_target_seconds, 2.5);

  r.mutable_tome()->set_max_ratio(0.9f);  // above tomesd's cap for sx = sy = 2
  g = Convert(r);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("tome.max_ratio is 0.9; allowed: [0, 0.75]"), absl::string_view::npos)
      << g.status();
  r.mutable_tome()->set_max_ratio(0.6f);
  r.set_latency_target_seconds(-1);
  g = Convert(r);
  EXPECT_NE(g.status().message().find("latency_target_seconds is -1; allowed: (0, 3600]"), absl::string_view::npos)
      << g.status();

  // Server defaults apply to requests that set neither.
  RequestLimits limits;
  limits.default_tome_ratio = 0.5;
  limits.default_latency_target_seconds = 4;
  limits.adaptive_tome_max_ratio = 0.7;
  g = Convert(Valid(), limits);
  ASSERT_TRUE(g.ok());
  EXPECT_DOUBLE_EQ(g->tome_max_ratio, 0.7);
  EXPECT_DOUBLE_EQ(g->latency_target_seconds, 4);

  GenerationResult result;
  result.tome = g->tome;
  result.tome.ratio = 0.65;
  result.slo = {.applied = true, .target_seconds = 4, .predicted_seconds = 3.2, .target_met = true};
  v1::GenerateResponse out;
  ToProto(*g, result, &out);
  EXPECT_FLOAT_EQ(out.tome().ratio(), 0.65f);  // the controller's choice, not the request's 0.5
  EXPECT_TRUE(out.slo().target_met());
  EXPECT_DOUBLE_EQ(out.slo().predicted_seconds(), 3.2);
  EXPECT_FLOAT_EQ(out.slo().min_ratio(), 0.5f);
  EXPECT_FLOAT_EQ(out.slo().max_ratio(), 0.7f);
}

}  // namespace
}  // namespace tomeserve::server
