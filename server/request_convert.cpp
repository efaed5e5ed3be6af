#include "server/request_convert.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace tomeserve::server {
namespace {

using pipeline::SchedulerKind;

constexpr int kMinSide = 64;
constexpr int kDefaultSteps = 50;
constexpr double kDefaultGuidance = 7.5;

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

absl::StatusOr<SchedulerKind> ConvertScheduler(int value, SchedulerKind model_default) {
  switch (value) {
    case v1::SCHEDULER_UNSPECIFIED:
      return model_default;
    case v1::SCHEDULER_PNDM:
      return SchedulerKind::kPndm;
    case v1::SCHEDULER_DDIM:
      return SchedulerKind::kDdim;
    case v1::SCHEDULER_EULER:
      return SchedulerKind::kEuler;
    case v1::SCHEDULER_EULER_ANCESTRAL:
      return SchedulerKind::kEulerAncestral;
    case v1::SCHEDULER_DPMPP_2M:
      return SchedulerKind::kDpmpp2m;
    case v1::SCHEDULER_DPMPP_2M_KARRAS:
      return SchedulerKind::kDpmpp2mKarras;
  }
  return Invalid(absl::StrCat("scheduler: unknown value ", value, "; allowed: 0 (the model's own) to ",
                              static_cast<int>(v1::SCHEDULER_DPMPP_2M_KARRAS),
                              " (SCHEDULER_DPMPP_2M_KARRAS)"));
}

absl::Status CheckPrompt(const char* field, const std::string& text, bool required,
                         const ModelDescription& model, const RequestLimits& limits) {
  if (required && text.empty()) return Invalid(absl::StrCat(field, " must not be empty"));
  if (static_cast<int64_t>(text.size()) > limits.max_prompt_bytes) {
    return Invalid(absl::StrCat(field, " is ", text.size(), " bytes; allowed: at most ",
                                limits.max_prompt_bytes, " bytes"));
  }
  if (model.tokenizer != nullptr && !text.empty()) {
    // Counted up to a cap of max_prompt_bytes + 2 (about one token per byte; text that sanitising or NFC
    // grows may reach the cap, and is then reported as "at least"), so the message says how far over it is.
    const int cap = limits.max_prompt_bytes + 2;
    const size_t tokens = model.tokenizer->Encode(text, cap).size();
    if (static_cast<int>(tokens) > limits.max_prompt_tokens) {
      return Invalid(absl::StrCat(field, " is longer than ", limits.max_prompt_tokens, " CLIP tokens: it has ",
                                  static_cast<int>(tokens) >= cap ? "at least " : "", tokens,
                                  " (including start and end tokens); allowed: at most ",
                                  limits.max_prompt_tokens, " tokens, shorten it"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int> CheckSide(const char* field, uint32_t value, int native, const RequestLimits& limits) {
  if (value == 0) return native;
  if (value % 8 != 0 || value < kMinSide || value > static_cast<uint32_t>(limits.max_side)) {
    return Invalid(absl::StrCat(field, " is ", value, "; allowed: a multiple of 8 in [", kMinSide, ", ",
                                limits.max_side, "], or 0 for the model's native size (", native, ")"));
  }
  return static_cast<int>(value);
}

absl::StatusOr<tome::TokenMerging> ConvertTome(const v1::TokenMerging& in, const ModelDescription& model,
                                               const RequestLimits& limits) {
  tome::TokenMerging t;
  t.max_downsample = tome::DefaultMaxDownsample(model.tome_downsamples);
  t.ratio = in.has_ratio() ? FloatToShortestDouble(in.ratio()) : limits.default_tome_ratio;
  // Range checks are tome::Validate's; values past int's range saturate so its message reports them sanely.
  const auto as_int = [](uint32_t v) { return static_cast<int>(std::min<uint32_t>(v, INT32_MAX)); };
  if (in.max_downsample() != 0) t.max_downsample = as_int(in.max_downsample());
  if (in.sx() != 0) t.sx = as_int(in.sx());
  if (in.sy() != 0) t.sy = as_int(in.sy());
  if (in.has_use_rand()) t.use_rand = in.use_rand();
  if (in.has_merge_attn()) t.merge_attn = in.merge_attn();
  if (in.has_merge_crossattn()) t.merge_crossattn = in.merge_crossattn();
  if (in.has_merge_mlp()) t.merge_mlp = in.merge_mlp();
  if (in.has_seed()) t.seed = in.seed();
  if (absl::Status s = tome::Validate(t); !s.ok()) return s;
  return t;
}

}  // namespace

RandomSource RandomSource::Default() {
  return {[] {
    thread_local std::mt19937_64 rng{std::random_device{}()};
    return rng();
  }};
}

double FloatToShortestDouble(float value) {
  if (!std::isfinite(value)) return static_cast<double>(value);
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), value);
  if (ec != std::errc()) return static_cast<double>(value);
  *end = '\0';
  return std::strtod(buf, nullptr);
}

absl::StatusOr<GenerationRequest> ConvertRequest(const v1::GenerateRequest& request,
                                                 const ModelCatalog& catalog, const RequestLimits& limits,
                                                 const RandomSource& random) {
  GenerationRequest out;
  const std::string model_name = request.model().empty() ? catalog.default_model : request.model();
  const ModelDescription* model = catalog.Find(model_name);
  if (model == nullptr) {
    std::vector<std::string> names;
    for (const ModelDescription& m : catalog.models) names.push_back(m.name);
    return absl::NotFoundError(absl::StrCat("model: no model named \"", model_name,
                                            "\" is loaded; loaded: ", absl::StrJoin(names, ", ")));
  }
  // The id is echoed in the response and written verbatim into log lines: printable ASCII only, so a client
  // cannot forge or break log lines (newlines, terminal escape sequences).
  const std::string& id = request.request_id();
  if (static_cast<int>(id.size()) > limits.max_request_id_bytes) {
    return Invalid(absl::StrCat("request_id is ", id.size(), " bytes; allowed: at most ",
                                limits.max_request_id_bytes, " bytes of printable ASCII"));
  }
  for (const char c : id) {
    if (c < 0x20 || c > 0x7e) {
      return Invalid(absl::StrCat(
          "request_id has a byte 0x", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2),
          "; allowed: printable ASCII (0x20-0x7e), at most ", limits.max_request_id_bytes, " bytes"));
    }
  }
  out.request_id =
      request.request_id().empty() ? absl::StrFormat("%016x", random.next()) : request.request_id();

  if (absl::Status s = CheckPrompt("prompt", request.prompt(), true, *model, limits); !s.ok()) return s;
  if (absl::Status s = CheckPrompt("negative_prompt", request.negative_prompt(), false, *model, limits);
      !s.ok()) {
    return s;
  }
  out.prompt = request.prompt();
  out.negative_prompt = request.negative_prompt();

  absl::StatusOr<int> width = CheckSide("width", request.width(), model->native_width, limits);
  if (!width.ok()) return width.status();
  absl::StatusOr<int> height = CheckSide("height", request.height(), model->native_height, limits);
  if (!height.ok()) return height.status();
  if (static_cast<int64_t>(*width) * *height > limits.max_pixels) {
    return Invalid(absl::StrCat("width x height is ", *width, "x", *height, " = ",
                                static_cast<int64_t>(*width) * *height, " pixels; allowed: at most ",
                                limits.max_pixels, " pixels"));
  }

  const uint32_t steps = request.num_inference_steps() == 0 ? kDefaultSteps : request.num_inference_steps();
  if (steps > static_cast<uint32_t>(limits.max_steps)) {
    return Invalid(absl::StrCat("num_inference_steps is ", steps, "; allowed: [1, ", limits.max_steps,
                                "], or 0 for ", kDefaultSteps));
  }
  if (request.has_guidance_scale()) {
    const float g = request.guidance_scale();
    if (!std::isfinite(g) || g < 0 || g > limits.max_guidance) {
      return Invalid(absl::StrCat("guidance_scale is ", g, "; allowed: [0, ", limits.max_guidance, "]"));
    }
    out.guidance_scale = FloatToShortestDouble(g);
  } else {
    out.guidance_scale = kDefaultGuidance;
  }
  const uint32_t images = request.num_images() == 0 ? 1 : request.num_images();
  if (images > static_cast<uint32_t>(limits.max_images)) {
    return Invalid(
        absl::StrCat("num_images is ", images, "; allowed: [1, ", limits.max_images, "], or 0 for 1"));
  }
  out.num_images = static_cast<int>(images);
  out.seed = request.has_seed() ? request.seed() : (random.next() & 0xffffffffu);

  absl::StatusOr<SchedulerKind> scheduler = ConvertScheduler(request.scheduler(), model->default_scheduler);
  if (!scheduler.ok()) return scheduler.status();
  switch (request.output_format()) {
    case v1::OUTPUT_FORMAT_UNSPECIFIED:
    case v1::OUTPUT_FORMAT_PNG:
      out.output_format = OutputFormat::kPng;
      break;
    case v1::OUTPUT_FORMAT_RAW_RGB8:
      out.output_format = OutputFormat::kRawRgb8;
      break;
    default:
      return Invalid(absl::StrCat("output_format: unknown value ", static_cast<int>(request.output_format()),
                                  "; allowed: 0 (PNG), 1 (PNG), 2 (RAW_RGB8)"));
  }
  absl::StatusOr<tome::TokenMerging> tome = ConvertTome(request.tome(), *model, limits);
  if (!tome.ok()) return tome.status();
  out.tome = *tome;

  // SLO controller range and target. max_ratio must be a ratio tomesd can honour with these strides.
  if (request.tome().has_max_ratio()) {
    const double max_ratio = FloatToShortestDouble(request.tome().max_ratio());
    const double cap = tome::MaxRatio(out.tome.sx, out.tome.sy);
    if (!std::isfinite(max_ratio) || max_ratio < 0 || max_ratio > cap) {
      return Invalid(absl::StrCat("tome.max_ratio is ", request.tome().max_ratio(), "; allowed: [0, ", cap,
                                  "] (at least tome.ratio to let the server raise the ratio)"));
    }
    out.tome_max_ratio = max_ratio;
  } else if (limits.adaptive_tome_max_ratio > out.tome.ratio) {
    out.tome_max_ratio = std::min(limits.adaptive_tome_max_ratio, tome::MaxRatio(out.tome.sx, out.tome.sy));
  }
  // Settings that would merge nothing on this model are refused, not silently run unmerged.
  if (absl::Status s = tome::CheckPatchesABlock(out.tome.max_downsample, out.tome.ratio > 0 || out.tome_max_ratio > 0,
                                                model->tome_downsamples, model->name);
      !s.ok()) {
    return s;
  }
  switch (request.priority()) {
    case v1::PRIORITY_INTERACTIVE:
      out.priority = Priority::kInteractive;
      break;
    case v1::PRIORITY_BATCH:
      out.priority = Priority::kBatch;
      break;
    default:
      return Invalid(absl::StrCat("priority is ", static_cast<int>(request.priority()),
                                  "; allowed: PRIORITY_INTERACTIVE (0) or PRIORITY_BATCH (1)"));
  }
  if (request.has_latency_target_seconds()) {
    const double target = request.latency_target_seconds();
    if (!std::isfinite(target) || target <= 0 || target > limits.max_latency_target_seconds) {
      return Invalid(absl::StrCat("latency_target_seconds is ", target, "; allowed: (0, ",
                                  limits.max_latency_target_seconds, "], or unset for the server's default"));
    }
    out.latency_target_seconds = target;
  } else {
    out.latency_target_seconds = limits.default_latency_target_seconds;
  }

  out.key = BatchKey{.model = model->name,
                     .width = *width,
                     .height = *height,
                     .steps = static_cast<int>(steps),
                     .scheduler = *scheduler,
                     .tome = tome::Canonical(*tome)};
  return out;
}

v1::Scheduler ToProto(SchedulerKind kind) {
  switch (kind) {
    case SchedulerKind::kPndm:
      return v1::SCHEDULER_PNDM;
    case SchedulerKind::kDdim:
      return v1::SCHEDULER_DDIM;
    case SchedulerKind::kEuler:
      return v1::SCHEDULER_EULER;
    case SchedulerKind::kEulerAncestral:
      return v1::SCHEDULER_EULER_ANCESTRAL;
    case SchedulerKind::kDpmpp2m:
      return v1::SCHEDULER_DPMPP_2M;
    case SchedulerKind::kDpmpp2mKarras:
      return v1::SCHEDULER_DPMPP_2M_KARRAS;
  }
  return v1::SCHEDULER_UNSPECIFIED;
}

void ToProto(const tome::TokenMerging& t, v1::TokenMerging* out) {
  out->set_ratio(static_cast<float>(t.ratio));
  out->set_max_downsample(static_cast<uint32_t>(t.max_downsample));
  out->set_sx(static_cast<uint32_t>(t.sx));
  out->set_sy(static_cast<uint32_t>(t.sy));
  out->set_use_rand(t.use_rand);
  out->set_merge_attn(t.merge_attn);
  out->set_merge_crossattn(t.merge_crossattn);
  out->set_merge_mlp(t.merge_mlp);
  out->set_seed(t.seed);
}

void ToProto(const GenerationRequest& request, const GenerationResult& result, v1::GenerateResponse* out) {
  for (const EncodedImage& img : result.images) {
    v1::Image* i = out->add_images();
    i->set_data(img.data);
    i->set_mime_type(img.mime_type);
    i->set_width(static_cast<uint32_t>(img.width));
    i->set_height(static_cast<uint32_t>(img.height));
    i->set_seed(img.seed);
  }
  v1::Timings* t = out->mutable_timings();
  t->set_queue_seconds(result.queue_seconds);
  t->set_text_encoding_seconds(result.text_encoding_seconds);
  t->set_denoising_seconds(result.denoising_seconds);
  t->set_decoding_seconds(result.decoding_seconds);
  t->set_total_seconds(result.total_seconds);
  out->set_batch_size(static_cast<uint32_t>(result.batch_size));
  ToProto(result.tome, out->mutable_tome());
  if (result.slo.applied) {
    v1::SloDecision* slo = out->mutable_slo();
    slo->set_latency_target_seconds(result.slo.target_seconds);
    slo->set_predicted_seconds(result.slo.predicted_seconds);
    slo->set_target_met(result.slo.target_met);
    slo->set_min_ratio(static_cast<float>(request.tome.ratio));
    slo->set_max_ratio(static_cast<float>(request.tome_max_ratio));
  }
  for (const MergeCount& m : result.merged_tokens) {
    v1::MergedTokens* mt = out->add_merged_tokens();
    mt->set_block(m.block);
    mt->set_tokens_before(static_cast<uint32_t>(m.tokens_before));
    mt->set_tokens_after(static_cast<uint32_t>(m.tokens_after));
  }
  out->set_request_id(request.request_id);
  out->set_model(request.key.model);
}

}  // namespace tomeserve::server
