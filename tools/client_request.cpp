#include "tools/client_request.h"

#include <filesystem>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tomeserve::tools {
namespace {

constexpr std::pair<const char*, v1::Scheduler> kSchedulers[] = {
    {"pndm", v1::SCHEDULER_PNDM},         {"ddim", v1::SCHEDULER_DDIM},
    {"euler", v1::SCHEDULER_EULER},       {"euler_a", v1::SCHEDULER_EULER_ANCESTRAL},
    {"dpmpp_2m", v1::SCHEDULER_DPMPP_2M}, {"dpmpp_2m_karras", v1::SCHEDULER_DPMPP_2M_KARRAS},
};

absl::StatusOr<uint64_t> GetUint64(const CliArgs& args, const std::string& name) {
  uint64_t value = 0;
  if (!absl::SimpleAtoi(*args.Get(name), &value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be an integer in [0, 2^64), got \"", *args.Get(name), "\""));
  }
  return value;
}

}  // namespace

const std::set<std::string>& GenerateValueFlags() {
  static const auto* flags = new std::set<std::string>{"prompt",
                                                       "negative-prompt",
                                                       "width",
                                                       "height",
                                                       "steps",
                                                       "guidance",
                                                       "seed",
                                                       "num-images",
                                                       "scheduler",
                                                       "ratio",
                                                       "max-ratio",
                                                       "latency-target",
                                                       "tome-max-downsample",
                                                       "tome-sx",
                                                       "tome-sy",
                                                       "tome-seed",
                                                       "model",
                                                       "request-id",
                                                       "output"};
  return *flags;
}

const std::set<std::string>& GenerateSwitches() {
  static const auto* switches = new std::set<std::string>{
      "tome-no-rand", "tome-merge-crossattn", "tome-merge-mlp", "tome-no-merge-attn", "raw", "quiet"};
  return *switches;
}

absl::StatusOr<v1::Scheduler> ParseScheduler(const std::string& name) {
  for (const auto& [spelling, value] : kSchedulers) {
    if (name == spelling) return value;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--scheduler must be one of pndm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, got \"",
                   name, "\""));
}

std::string OutputPath(const std::string& base, int index, int count) {
  if (count == 1) return base;
  std::filesystem::path p(base);
  return (p.parent_path() / absl::StrCat(p.stem().string(), "-", index, p.extension().string())).string();
}

absl::StatusOr<v1::GenerateRequest> BuildGenerateRequest(const CliArgs& args) {
  v1::GenerateRequest r;
  if (!args.Has("prompt")) return absl::InvalidArgumentError("--prompt is required");
  r.set_prompt(*args.Get("prompt"));
  r.set_negative_prompt(args.Get("negative-prompt").value_or(""));
  // Ranges here only keep the values representable; 0 means "the server's default" for these fields.
  auto width = args.GetInt("width", 0, 0, 1 << 16);
  auto height = args.GetInt("height", 0, 0, 1 << 16);
  auto steps = args.GetInt("steps", 0, 0, 1 << 20);
  auto num_images = args.GetInt("num-images", 0, 0, 1 << 16);
  auto max_downsample = args.GetInt("tome-max-downsample", 0, 0, 1 << 16);
  auto sx = args.GetInt("tome-sx", 0, 0, 1 << 16);
  auto sy = args.GetInt("tome-sy", 0, 0, 1 << 16);
  for (const absl::Status& s : {width.status(), height.status(), steps.status(), num_images.status(),
                                max_downsample.status(), sx.status(), sy.status()}) {
    if (!s.ok()) return s;
  }
  r.set_width(static_cast<uint32_t>(*width));
  r.set_height(static_cast<uint32_t>(*height));
  r.set_num_inference_steps(static_cast<uint32_t>(*steps));
  r.set_num_images(static_cast<uint32_t>(*num_images));
  if (args.Has("guidance")) {
    absl::StatusOr<double> g = args.GetDouble("guidance", 0, -1e6, 1e6);
    if (!g.ok()) return g.status();
    r.set_guidance_scale(static_cast<float>(*g));
  }
  if (args.Has("seed") && *args.Get("seed") != "-1") {  // -1: unset, the server draws one (A1111's convention)
    absl::StatusOr<uint64_t> seed = GetUint64(args, "seed");
    if (!seed.ok()) return seed.status();
    r.set_seed(*seed);
  }
  if (auto name = args.Get("scheduler")) {
    absl::StatusOr<v1::Scheduler> scheduler = ParseScheduler(*name);
    if (!scheduler.ok()) return scheduler.status();
    r.set_scheduler(*scheduler);
  }
  r.set_output_format(args.Has("raw") ? v1::OUTPUT_FORMAT_RAW_RGB8 : v1::OUTPUT_FORMAT_PNG);
  r.set_model(args.Get("model").value_or(""));
  r.set_request_id(args.Get("request-id").value_or(""));

  v1::TokenMerging& tome = *r.mutable_tome();
  if (args.Has("ratio")) {
    absl::StatusOr<double> ratio = args.GetDouble("ratio", 0, 0, 1);
    if (!ratio.ok()) return ratio.status();
    tome.set_ratio(static_cast<float>(*ratio));
  }
  if (args.Has("max-ratio")) {
    absl::StatusOr<double> max_ratio = args.GetDouble("max-ratio", 0, 0, 1);
    if (!max_ratio.ok()) return max_ratio.status();
    tome.set_max_ratio(static_cast<float>(*max_ratio));
  }
  if (args.Has("latency-target")) {
    absl::StatusOr<double> target = args.GetDouble("latency-target", 0, 1e-3, 3600);
    if (!target.ok()) return target.status();
    r.set_latency_target_seconds(*target);
  }
  tome.set_max_downsample(static_cast<uint32_t>(*max_downsample));
  tome.set_sx(static_cast<uint32_t>(*sx));
  tome.set_sy(static_cast<uint32_t>(*sy));
  if (args.Has("tome-no-rand")) tome.set_use_rand(false);
  if (args.Has("tome-no-merge-attn")) tome.set_merge_attn(false);
  if (args.Has("tome-merge-crossattn")) tome.set_merge_crossattn(true);
  if (args.Has("tome-merge-mlp")) tome.set_merge_mlp(true);
  if (args.Has("tome-seed")) {
    absl::StatusOr<uint64_t> seed = GetUint64(args, "tome-seed");
    if (!seed.ok()) return seed.status();
    tome.set_seed(*seed);
  }
  return r;
}

}  // namespace tomeserve::tools
