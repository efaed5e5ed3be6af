// tomeserve-bench: times the C++ pipeline (one configuration per run) and prints one JSON object, so that
// scripts/bench.py can run it side by side with diffusers on the same machine and thread count.
//   tomeserve-bench --model DIR --mode unet|generate|merge [--width W --height H] [--batch B] [--steps N]
//                   [--scheduler K] [--device D] [--dtype T] [--threads N] [--warmup N] [--reps N]
//                   [--tome-ratio R]
// unet: one UNet forward on [2B, 4, H/8, W/8] (batch B with classifier-free guidance), random inputs.
// generate: text encoding + N steps + VAE decode for B prompts, guidance 7.5.
// merge: Token Merging's own work for the first transformer block alone: plan (partition, similarity, matching)
// + merge + unmerge of a [2B, H/8 * W/8, C] block input (C = the UNet's first block width).
// --tome-ratio R > 0 applies Token Merging with tomesd's other defaults (unet, generate, merge).
// Reports the median and every repetition in seconds. Not a test: nothing here passes or fails on time.
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"
#include "tome/merge.h"
#include "tome/tome_hooks.h"
#include "tools/cli_args.h"

namespace tomeserve::tools {
namespace {

constexpr char kUsage[] =
    "usage: tomeserve-bench --model DIR [--mode unet|generate|merge] [--width W] [--height H] [--batch B]\n"
    "                       [--steps N] [--scheduler K] [--device cpu|cuda:N] [--dtype fp32|fp16|bf16]\n"
    "                       [--threads N] [--warmup N] [--reps N] [--tome-ratio R]\n"
    "Times one configuration of the C++ pipeline and prints one JSON object (median and every repetition, in\n"
    "seconds) for scripts/bench.py, which runs it side by side with diffusers.\n"
    "  unet      one UNet forward on [2B, 4, H/8, W/8] (batch B with classifier-free guidance), random inputs\n"
    "  generate  text encoding + N steps + VAE decode for B prompts, guidance 7.5\n"
    "  merge     Token Merging's own work on the first transformer block's input: plan + merge + unmerge\n"
    "Defaults: --mode unet, 512x512, batch 1, 4 steps, the model's scheduler, cpu, fp32, 1 warm-up, 3 reps,\n"
    "no Token Merging (--tome-ratio R > 0 applies it with tomesd's other defaults). Usage errors exit 2.\n";

int Fail(const absl::Status& s, int code) {
  std::fprintf(stderr, "tomeserve-bench: %s (see --help)\n", std::string(s.message()).c_str());
  return code;
}

void Sync(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

}  // namespace

int BenchMain(const std::vector<std::string>& raw) {
  const auto asks = [&raw](const char* flag) { return std::find(raw.begin(), raw.end(), flag) != raw.end(); };
  if (asks("--help") || asks("-h")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  absl::StatusOr<CliArgs> a = CliArgs::Parse(raw,
                                             {"model", "mode", "width", "height", "batch", "steps", "scheduler",
                                              "device", "dtype", "threads", "warmup", "reps", "tome-ratio"},
                                             {});
  if (!a.ok()) return Fail(a.status(), 2);
  auto model = a->Required("model");
  auto width = a->GetInt("width", 512, 8, 8192);
  auto height = a->GetInt("height", 512, 8, 8192);
  auto batch = a->GetInt("batch", 1, 1, 64);
  auto steps = a->GetInt("steps", 4, 1, 1000);
  auto threads = a->GetInt("threads", 0, 0, 1024);
  auto warmup = a->GetInt("warmup", 1, 0, 100);
  auto reps = a->GetInt("reps", 3, 1, 1000);
  auto tome_ratio = a->GetDouble("tome-ratio", 0, 0, 1);
  for (const absl::Status& s : {model.status(), width.status(), height.status(), batch.status(), steps.status(),
                                threads.status(), warmup.status(), reps.status(), tome_ratio.status()}) {
    if (!s.ok()) return Fail(s, 2);
  }
  const std::string mode = a->Get("mode").value_or("unet");
  if (mode != "unet" && mode != "generate" && mode != "merge") {
    return Fail(absl::InvalidArgumentError("--mode: unet, generate or merge"), 2);
  }
  const tome::TokenMerging tome_settings{.ratio = *tome_ratio};
  std::shared_ptr<const tome::TokenMergingHooks> hooks;
  if (tome::IsActive(tome_settings)) {
    auto created = tome::TokenMergingHooks::Create(tome_settings);
    if (!created.ok()) return Fail(created.status(), 2);
    hooks = *created;
  }
  auto device = pipeline::ParseDevice(a->Get("device").value_or("cpu"));
  if (!device.ok()) return Fail(device.status(), 2);
  auto dtype = pipeline::ParseComputeDType(a->Get("dtype").value_or("fp32"));
  if (!dtype.ok()) return Fail(dtype.status(), 2);
  if (*threads > 0) at::set_num_threads(static_cast<int>(*threads));

  auto sd = pipeline::StableDiffusion::Create({*model, {*device, *dtype}});
  if (!sd.ok()) return Fail(sd.status(), 1);
  pipeline::SchedulerKind kind = (*sd)->default_scheduler();
  if (auto k = a->Get("scheduler")) {
    auto parsed = pipeline::ParseSchedulerKind(*k);
    if (!parsed.ok()) return Fail(parsed.status(), 2);
    kind = *parsed;
  }

  std::vector<double> times;
  absl::Status status = pipeline::GuardTorch("benchmark", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    const auto options = at::TensorOptions().dtype(*dtype).device(*device);
    const int64_t rows = 2 * *batch;
    const int64_t scale = (*sd)->vae_scale();
    at::Tensor sample = at::randn({rows, (*sd)->unet().config().in_channels, *height / scale, *width / scale}, options);
    at::Tensor context = at::randn({rows, 77, (*sd)->text_encoder().config().hidden_size}, options);
    at::Tensor t = at::scalar_tensor(500.0, at::kFloat);
    const int64_t tokens = (*height / scale) * (*width / scale);
    at::Tensor block_input = at::randn({rows, tokens, (*sd)->unet().config().block_out_channels.at(0)}, options);
    for (int64_t i = 0; i < *warmup + *reps; ++i) {
      Sync(*device);
      auto t0 = std::chrono::steady_clock::now();
      if (mode == "unet") {
        auto hook = hooks ? hooks->ForCall({}) : nullptr;
        (void)(*sd)->unet().forward(sample, t, context, hook.get());
      } else if (mode == "merge") {
        auto hook = hooks ? hooks->ForCall({}) : nullptr;
        if (hook) {
          const pipeline::BlockTokenOps ops =
              hook->ForBlock({"down_blocks.0.attentions.0.transformer_blocks.0", *height / scale, *width / scale},
                             block_input);
          if (ops.attn) (void)ops.attn->Unmerge(ops.attn->Merge(block_input));
        }
      } else {
        std::vector<pipeline::SampleSpec> samples;
        for (int64_t b = 0; b < *batch; ++b) {
          samples.push_back({.prompt = "a photo of an astronaut riding a horse on mars", .seed = uint64_t(b)});
        }
        auto images = (*sd)->Generate({.width = static_cast<int>(*width), .height = static_cast<int>(*height),
                                       .num_inference_steps = static_cast<int>(*steps), .scheduler = kind,
                                       .hooks = hooks},
                                      std::move(samples));
        if (!images.ok()) return images.status();
      }
      Sync(*device);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i >= *warmup) times.push_back(s);
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return Fail(status, 1);
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted.size() % 2 ? sorted[sorted.size() / 2]
                                          : 0.5 * (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]);
  std::printf(
      "{\"impl\": \"tomeserve\", \"mode\": \"%s\", \"width\": %lld, \"height\": %lld, \"batch\": %lld, "
      "\"steps\": %lld, \"tome_ratio\": %g, \"device\": \"%s\", \"dtype\": \"%s\", \"threads\": %d, \"median_s\": %.6f, "
      "\"times_s\": [%s]}\n",
      mode.c_str(), static_cast<long long>(*width), static_cast<long long>(*height), static_cast<long long>(*batch),
      static_cast<long long>(*steps), *tome_ratio, device->str().c_str(), pipeline::ComputeDTypeName(*dtype).c_str(),
      at::get_num_threads(), median, absl::StrJoin(times, ", ").c_str());
  return 0;
}

}  // namespace tomeserve::tools

int main(int argc, char** argv) {
  return tomeserve::tools::BenchMain(std::vector<std::string>(argv + 1, argv + argc));
}
