// tomeserve-gen generate: text-to-image on one device, writing PNGs with an AUTOMATIC1111 "parameters" chunk.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "pipeline/image_codec.h"
#include "pipeline/load_weights.h"
#include "pipeline/safetensors_writer.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/weight_store.h"
#include "tools/cli_args.h"
#include "tools/gen_commands.h"
#include "tome/tome_hooks.h"

namespace tomeserve::tools {
namespace {

using pipeline::SchedulerKind;

// "out.png" with n > 1 -> "out-0.png", "out-1.png", ...
std::string OutputPath(const std::string& base, int index, int count) {
  if (count == 1) return base;
  std::filesystem::path p(base);
  return (p.parent_path() / absl::StrCat(p.stem().string(), "-", index, p.extension().string())).string();
}

struct Options {
  pipeline::PipelineOptions load;
  pipeline::BatchSpec batch;
  std::string prompt, negative_prompt, output, init_latents, save_latents;
  double guidance = 7.5;
  uint64_t seed = 0;
  int num_images = 1;
  std::optional<std::string> scheduler;
  tome::TokenMerging tome{.ratio = 0};  // off unless --tome-ratio > 0
  bool tome_max_downsample_set = false;  // else the model's finest level with attention (1 SD 1.x, 2 SDXL)
  std::shared_ptr<const tome::TokenMergingHooks> tome_hooks;
};

// --tome-* flags onto tomesd's defaults; errors name the flags, not the request fields.
absl::Status ParseTomeFlags(const CliArgs& a, tome::TokenMerging& t) {
  // --ratio is tomeserve-cli's name for the same setting; either one, not both.
  if (a.Has("ratio") && a.Has("tome-ratio")) {
    return absl::InvalidArgumentError("give --ratio or --tome-ratio (the same setting), not both");
  }
  auto ratio = a.GetDouble(a.Has("ratio") ? "ratio" : "tome-ratio", 0, 0, 1);
  auto max_downsample = a.GetInt("tome-max-downsample", t.max_downsample, 1, 8);
  auto sx = a.GetInt("tome-sx", t.sx, 1, tome::kMaxStride);
  auto sy = a.GetInt("tome-sy", t.sy, 1, tome::kMaxStride);
  for (const absl::Status& s : {ratio.status(), max_downsample.status(), sx.status(), sy.status()}) {
    if (!s.ok()) return s;
  }
  t.ratio = *ratio;
  t.max_downsample = static_cast<int>(*max_downsample);
  t.sx = static_cast<int>(*sx);
  t.sy = static_cast<int>(*sy);
  t.use_rand = !a.Has("tome-no-rand");
  t.merge_crossattn = a.Has("tome-merge-crossattn");
  t.merge_mlp = a.Has("tome-merge-mlp");
  if (auto seed = a.Get("tome-seed"); seed && !absl::SimpleAtoi(*seed, &t.seed)) {
    return absl::InvalidArgumentError(absl::StrCat("--tome-seed must be an integer in [0, 2^64), got \"", *seed, "\""));
  }
  if (absl::Status s = tome::Validate(t); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrReplaceAll(
        s.message(), {{"tome.max_downsample", "--tome-max-downsample"}, {"tome.", "--tome-"}}));
  }
  return absl::OkStatus();
}

absl::StatusOr<Options> ParseOptions(const std::vector<std::string>& raw) {
  std::vector<std::string> args = raw;
  for (std::string& a : args) {
    if (a == "-o") a = "--output";
  }
  absl::StatusOr<CliArgs> a = CliArgs::Parse(
      args,
      {"model", "prompt", "negative-prompt", "width", "height", "steps", "guidance", "seed", "scheduler",
       "num-images", "device", "dtype", "init-latents", "save-latents", "output", "tome-ratio", "ratio",
       "variant",
       "tome-max-downsample", "tome-sx", "tome-sy", "tome-seed"},
      {"tome-no-rand", "tome-merge-crossattn", "tome-merge-mlp"});
  if (!a.ok()) return a.status();
  Options o;
  absl::StatusOr<std::string> model = a->Required("model");
  if (!model.ok()) return model.status();
  o.load.model_dir = *model;
  o.load.variant = a->Get("variant").value_or("");
  absl::StatusOr<std::string> output = a->Required("output");
  if (!output.ok()) return absl::InvalidArgumentError("-o OUT.png is required");
  o.output = *output;
  if (!a->Has("prompt")) return absl::InvalidArgumentError("--prompt is required");
  o.prompt = *a->Get("prompt");
  o.negative_prompt = a->Get("negative-prompt").value_or("");
  auto width = a->GetInt("width", 0, 8, 8192);
  auto height = a->GetInt("height", 0, 8, 8192);
  auto steps = a->GetInt("steps", 50, 1, 1000);
  auto guidance = a->GetDouble("guidance", 7.5, 0, 100);
  auto num_images = a->GetInt("num-images", 1, 1, 64);
  for (const absl::Status& s : {width.status(), height.status(), steps.status(), guidance.status(),
                                num_images.status()}) {
    if (!s.ok()) return s;
  }
  if (*width % 8 != 0 || *height % 8 != 0) {
    return absl::InvalidArgumentError("--width and --height must be multiples of 8");
  }
  o.batch.width = static_cast<int>(*width);
  o.batch.height = static_cast<int>(*height);
  o.batch.num_inference_steps = static_cast<int>(*steps);
  o.guidance = *guidance;
  o.num_images = static_cast<int>(*num_images);
  if (auto seed = a->Get("seed"); seed && *seed != "-1") {  // -1: random (A1111's convention)
    if (!absl::SimpleAtoi(*seed, &o.seed)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--seed must be an integer in [0, 2^64) or -1 (random), got \"", *seed, "\""));
    }
  } else {
    o.seed = std::random_device{}() & 0xffffffffu;
  }
  o.scheduler = a->Get("scheduler");
  if (o.scheduler) {
    absl::StatusOr<SchedulerKind> kind = pipeline::ParseSchedulerKind(*o.scheduler);
    if (!kind.ok()) return absl::InvalidArgumentError(absl::StrCat("--scheduler: ", kind.status().message()));
    o.batch.scheduler = *kind;
  }
  absl::StatusOr<c10::Device> device = pipeline::ParseDevice(a->Get("device").value_or("cpu"));
  if (!device.ok()) return absl::InvalidArgumentError(absl::StrCat("--device: ", device.status().message()));
  absl::StatusOr<c10::ScalarType> dtype = pipeline::ParseComputeDType(a->Get("dtype").value_or("fp32"));
  if (!dtype.ok()) return absl::InvalidArgumentError(absl::StrCat("--dtype: ", dtype.status().message()));
  o.load.target = {*device, *dtype};
  if (absl::Status s = ParseTomeFlags(*a, o.tome); !s.ok()) return s;
  o.tome_max_downsample_set = a->Has("tome-max-downsample");
  o.init_latents = a->Get("init-latents").value_or("");
  o.save_latents = a->Get("save-latents").value_or("");
  return o;
}

// Progress on stderr, only when it is a terminal (logs and pipes stay clean).
void ShowProgress(int done, int total) {
  if (!::isatty(STDERR_FILENO)) return;
  constexpr int kWidth = 30;
  const int filled = total > 0 ? done * kWidth / total : kWidth;
  std::fprintf(stderr, "\r[%s%s] %d/%d", std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
               done, total);
  if (done == total) std::fputc('\n', stderr);
}

}  // namespace

int Generate(const std::vector<std::string>& args) {
  absl::StatusOr<Options> parsed = ParseOptions(args);
  if (!parsed.ok()) return UsageError(parsed.status());
  Options& o = *parsed;
  // Fail before minutes of denoising, not after.
  if (o.output == "-" && o.num_images > 1) {
    return UsageError(absl::InvalidArgumentError("-o - writes one PNG to stdout; --num-images > 1 needs a file name"));
  }
  const std::filesystem::path out_dir = std::filesystem::absolute(o.output).parent_path();
  if (o.output != "-" && !std::filesystem::is_directory(out_dir)) {
    return UsageError(absl::InvalidArgumentError(absl::StrCat("-o: folder ", out_dir.string(), " does not exist")));
  }

  absl::StatusOr<std::unique_ptr<pipeline::StableDiffusion>> sd = pipeline::StableDiffusion::Create(o.load);
  if (!sd.ok()) return RuntimeError(sd.status());
  if (!o.scheduler) o.batch.scheduler = (*sd)->default_scheduler();
  if (tome::IsActive(o.tome)) {
    // max_downsample's default is the model's finest level with attention, as the server's: SDXL has none at
    // full resolution, where tomesd's default of 1 would patch nothing.
    const std::vector<int> levels = (*sd)->unet().config().AttentionDownsamples();
    if (!o.tome_max_downsample_set) o.tome.max_downsample = tome::DefaultMaxDownsample(levels);
    if (absl::Status s = tome::CheckPatchesABlock(o.tome.max_downsample, true, levels,
                                                  o.load.model_dir.filename().string());
        !s.ok()) {
      return UsageError(absl::InvalidArgumentError(absl::StrReplaceAll(s.message(), {{"tome.max_downsample", "--tome-max-downsample"}})));
    }
    auto hooks = tome::TokenMergingHooks::Create(o.tome);
    if (!hooks.ok()) return UsageError(hooks.status());
    o.tome_hooks = *hooks;
    o.batch.hooks = *hooks;
  }

  at::Tensor init;
  if (!o.init_latents.empty()) {
    absl::StatusOr<pipeline::WeightStore> store = pipeline::WeightStore::OpenFile(o.init_latents);
    if (!store.ok()) return RuntimeError(store.status());
    absl::StatusOr<at::Tensor> latents = pipeline::ReadTensor(*store, "latents");
    if (!latents.ok()) return RuntimeError(latents.status());
    if (latents->dim() != 4 || latents->size(0) != o.num_images) {
      return UsageError(absl::InvalidArgumentError(absl::StrCat(
          "--init-latents: tensor \"latents\" must be [", o.num_images, ", 4, H/8, W/8] (one per --num-images)")));
    }
    init = *latents;
  }
  std::vector<pipeline::SampleSpec> samples;
  for (int i = 0; i < o.num_images; ++i) {
    pipeline::SampleSpec s{.prompt = o.prompt, .negative_prompt = o.negative_prompt, .seed = o.seed + i,
                           .guidance_scale = o.guidance};
    if (init.defined()) s.init_latents = init[i];
    samples.push_back(std::move(s));
  }
  pipeline::PhaseTimings timings;
  absl::StatusOr<std::vector<pipeline::GeneratedImage>> images =
      (*sd)->Generate(o.batch, std::move(samples), {.progress = ShowProgress}, &timings);
  // The pipeline rejects what the flags cannot check alone (e.g. init latents of the wrong size) as
  // INVALID_ARGUMENT before any work: that is a usage error too.
  if (!images.ok() && images.status().code() == absl::StatusCode::kInvalidArgument) {
    return UsageError(images.status());
  }
  if (!images.ok()) return RuntimeError(images.status());

  const int width = o.batch.width ? o.batch.width : (*sd)->native_width();
  const int height = o.batch.height ? o.batch.height : (*sd)->native_height();
  std::vector<at::Tensor> latents;
  for (int i = 0; i < o.num_images; ++i) {
    const pipeline::GeneratedImage& img = (*images)[i];
    pipeline::GenerationParameters params{
        .prompt = o.prompt, .negative_prompt = o.negative_prompt, .steps = o.batch.num_inference_steps,
        .sampler = std::string(pipeline::A1111SamplerName(o.batch.scheduler)), .cfg_scale = o.guidance, .seed = img.seed,
        .width = width, .height = height, .model = o.load.model_dir.filename().string()};
    // AUTOMATIC1111 records Token Merging the same way.
    if (o.tome_hooks) params.extra.push_back({"Token merging ratio", pipeline::FormatA1111Number(o.tome.ratio)});
    absl::StatusOr<std::string> png =
        pipeline::EncodePng(img.rgb8.data_ptr<uint8_t>(), width, height,
                            {{"parameters", pipeline::FormatA1111Parameters(params)}});
    if (!png.ok()) return RuntimeError(png.status());
    if (o.output == "-") {  // the PNG is stdout; what would be printed there goes to stderr
      if (std::fwrite(png->data(), 1, png->size(), stdout) != png->size() || std::fflush(stdout) != 0) {
        return RuntimeError(absl::DataLossError("stdout: cannot write the image"));
      }
      std::fprintf(stderr, "- seed=%llu\n", static_cast<unsigned long long>(img.seed));
      latents.push_back(img.latents);
      continue;
    }
    const std::string path = OutputPath(o.output, i, o.num_images);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(png->data(), static_cast<std::streamsize>(png->size()));
    if (!out.good()) return RuntimeError(absl::PermissionDeniedError(absl::StrCat(path, ": cannot write")));
    std::printf("%s seed=%llu\n", path.c_str(), static_cast<unsigned long long>(img.seed));
    latents.push_back(img.latents);
  }
  if (!o.save_latents.empty()) {
    absl::Status s = pipeline::SaveSafetensors(o.save_latents, {{"latents", at::cat(latents)}});
    if (!s.ok()) return RuntimeError(s);
  }
  std::fprintf(stderr, "text encoding %.2fs, denoising %.2fs, decoding %.2fs\n", timings.text_encoding,
               timings.denoising, timings.decoding);
  if (o.tome_hooks) {
    int64_t before = 0, after = 0;
    const std::vector<tome::BlockMergeCount> counts = o.tome_hooks->MergeCounts();
    for (const tome::BlockMergeCount& c : counts) {
      before += c.tokens_before;
      after += c.tokens_after;
    }
    std::fprintf(stderr, "token merging (%s): %zu blocks, %lld -> %lld tokens per image row\n",
                 tome::ToString(o.tome).c_str(), counts.size(), static_cast<long long>(before),
                 static_cast<long long>(after));
  }
  return 0;
}

}  // namespace tomeserve::tools
