// tomeserve-bench: times the C++ pipeline and prints one JSON object per configuration, so that scripts/bench.py
// can run it side by side with diffusers on the same machine and thread count. With --stdin the model is loaded
// once and configurations arrive one per line (bench.py keeps one process per model/device/dtype).
// unet: one UNet forward on [2B, 4, H/8, W/8] (batch B with classifier-free guidance), random inputs.
// generate: text encoding + N steps + VAE decode for B prompts, guidance 7.5.
// merge: Token Merging's own work for the first transformer block alone: plan (partition, similarity, matching)
// + merge + unmerge of a [2B, H/8 * W/8, C] block input (C = the UNet's first block width).
// --tome-ratio R > 0 applies Token Merging with tomesd's other defaults (unet, generate, merge), but for
// max_downsample: --tome-max-downsample, else the model's finest level with attention (1 SD 1.x, 2 SDXL).
// Reports the median and every repetition in seconds. Not a test: nothing here passes or fails on time.
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>
#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <set>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"
#include "pipeline/huge_pages.h"
#include "pipeline/unet_call.h"
#include "pipeline/unet_graphs.h"
#include "tome/merge.h"
#include "tome/tome_hooks.h"
#include "tools/cli_args.h"

namespace tomeserve::tools {

bool huge_pages = false;  // set by main(): whether large CPU allocations are in transparent huge pages

namespace {

constexpr char kUsage[] =
    "usage: tomeserve-bench --model DIR [--device cpu|cuda:N] [--dtype fp32|fp16|bf16] [--threads N]\n"
    "                       [--channels-last | --contiguous-weights] [--cudnn-benchmark] [--cuda-graphs]\n"
    "                       [--profile]\n"
    "                       [--stdin | CONFIGURATION]\n"
    "CONFIGURATION: [--mode unet|generate|merge] [--width W] [--height H] [--batch B] [--steps N]\n"
    "               [--scheduler K] [--warmup N] [--reps N] [--tome-ratio R] [--tome-max-downsample 1|2|4|8]\n"
    "Times the C++ pipeline and prints one JSON object per configuration (median and every repetition, in\n"
    "seconds) for scripts/bench.py, which runs it side by side with diffusers. With --stdin the model is loaded\n"
    "once and every line read from stdin is one CONFIGURATION (an empty line or end of input stops).\n"
    "  unet      one UNet call on [2B, 4, H/8, W/8] (batch B with classifier-free guidance, rows laid out as\n"
    "            the server's batches lay them out), random inputs\n"
    "  generate  text encoding + N steps + VAE decode for B prompts, guidance 7.5\n"
    "  merge     Token Merging's own work on the first transformer block's input: plan + merge + unmerge\n"
    "--channels-last / --contiguous-weights store the UNet's and VAE's 4-d weights channels-last (convolutions\n"
    "then run NHWC) / contiguous; by default channels-last on the CPU and contiguous on CUDA, as tomeserve does;\n"
    "--cudnn-benchmark lets cuDNN time its algorithms per shape (CUDA). Both are experiments for the GPU table.\n"
    "--cuda-graphs runs the UNet calls (unet, generate) through CUDA graphs, as the server does by default on a\n"
    "GPU: a layout's first call is eager, its second captures, later ones replay (warm-ups should be >= 2).\n"
    "CUDA runs use a stream of their own, as the server's workers do.\n"
    "--profile adds, after each configuration's line, a line {\"profile\": {op: [self_s, total_s, calls]}} with\n"
    "the torch profiler's host time per operator summed over the timed repetitions (scripts/profile_unet.py puts\n"
    "it next to diffusers').\n"
    "Defaults: --mode unet, 512x512, batch 1, 4 steps, the model's scheduler, cpu, fp32, 1 warm-up, 3 reps,\n"
    "no Token Merging (--tome-ratio R > 0 applies it with tomesd's other defaults, but for max_downsample:\n"
    "--tome-max-downsample, else the model's finest level with attention, 1 on SD 1.x and 2 on SDXL, as the\n"
    "server's default). Usage errors exit 2.\n";

int Fail(const absl::Status& s, int code) {
  std::fprintf(stderr, "tomeserve-bench: %s (see --help)\n", std::string(s.message()).c_str());
  return code;
}

void Sync(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// Peak bytes the CUDA caching allocator handed out since the last reset (-1 on the CPU or without c10_cuda).
void ResetPeakMemory(const c10::Device& device) {
#ifdef TOMESERVE_HAVE_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
}
int64_t PeakMemory(const c10::Device& device) {
#ifdef TOMESERVE_HAVE_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  }
#endif
  return -1;
}

const std::set<std::string> kSessionFlags = {"model", "device", "dtype", "threads"};
const std::set<std::string> kSessionSwitches = {"channels-last", "contiguous-weights", "cudnn-benchmark",
                                                "cuda-graphs", "profile", "stdin"};
const std::set<std::string> kConfigFlags = {"mode",   "width", "height", "batch",     "steps",
                                            "scheduler", "warmup", "reps", "tome-ratio", "tome-max-downsample"};

// One timed configuration; every field validated.
struct Config {
  std::string mode;
  int64_t width, height, batch, steps, warmup, reps;
  double tome_ratio;
  int64_t tome_max_downsample;  // 0: the model's finest level with attention
  std::optional<pipeline::SchedulerKind> scheduler;
};

absl::StatusOr<Config> ParseConfig(const CliArgs& a) {
  Config c;
  c.mode = a.Get("mode").value_or("unet");
  if (c.mode != "unet" && c.mode != "generate" && c.mode != "merge") {
    return absl::InvalidArgumentError("--mode: unet, generate or merge");
  }
  const struct {
    const char* name;
    int64_t* field;
    int64_t fallback, lo, hi;
  } ints[] = {{"width", &c.width, 512, 8, 8192}, {"height", &c.height, 512, 8, 8192}, {"batch", &c.batch, 1, 1, 64},
              {"steps", &c.steps, 4, 1, 1000},   {"warmup", &c.warmup, 1, 0, 100},     {"reps", &c.reps, 3, 1, 1000}};
  for (const auto& i : ints) {
    absl::StatusOr<int64_t> v = a.GetInt(i.name, i.fallback, i.lo, i.hi);
    if (!v.ok()) return v.status();
    *i.field = *v;
  }
  absl::StatusOr<double> ratio = a.GetDouble("tome-ratio", 0, 0, 1);
  if (!ratio.ok()) return ratio.status();
  c.tome_ratio = *ratio;
  absl::StatusOr<int64_t> md = a.GetInt("tome-max-downsample", 0, 0, 8);
  if (!md.ok()) return md.status();
  c.tome_max_downsample = *md;
  if (auto k = a.Get("scheduler")) {
    absl::StatusOr<pipeline::SchedulerKind> parsed = pipeline::ParseSchedulerKind(*k);
    if (!parsed.ok()) return parsed.status();
    c.scheduler = *parsed;
  }
  return c;
}

// Host time per operator over the profiled span: self (minus the operators it called on the same thread), total
// and calls, like torch.profiler's key_averages().
struct OpTime {
  double self_s = 0, total_s = 0;
  int64_t calls = 0;
};

std::map<std::string, OpTime> AggregateProfile(const torch::autograd::profiler::ProfilerResult& result) {
  struct Span {
    uint64_t start, end, thread;
    std::string name;
  };
  std::vector<Span> spans;
  for (const auto& e : result.events()) {
    if (e.deviceType() != c10::DeviceType::CPU || e.durationNs() == 0) continue;
    spans.push_back({e.startNs(), e.endNs(), e.startThreadId(), e.name()});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.thread != b.thread ? a.thread < b.thread : a.start != b.start ? a.start < b.start : a.end > b.end;
  });
  std::map<std::string, OpTime> ops;
  std::vector<size_t> open;  // enclosing spans on the current thread
  std::vector<double> child_s(spans.size(), 0.0);
  for (size_t i = 0; i < spans.size(); ++i) {
    while (!open.empty() && (spans[open.back()].thread != spans[i].thread || spans[open.back()].end <= spans[i].start)) {
      open.pop_back();
    }
    const double seconds = static_cast<double>(spans[i].end - spans[i].start) * 1e-9;
    if (!open.empty()) child_s[open.back()] += seconds;
    open.push_back(i);
  }
  for (size_t i = 0; i < spans.size(); ++i) {
    OpTime& t = ops[spans[i].name];
    const double seconds = static_cast<double>(spans[i].end - spans[i].start) * 1e-9;
    t.total_s += seconds;
    t.self_s += seconds - child_s[i];
    ++t.calls;
  }
  return ops;
}

// Runs `c` on the loaded model; returns the per-repetition seconds (warm-ups excluded). With `profile`, the timed
// repetitions run under the torch profiler (CPU activity) and their operator times go there.
// The UNet call of a guided batch of `batch` samples: unconditional rows first, then conditional ones, each pair
// one sample with its own seed (as DenoiseBatch builds it), all under `hooks` (may be null).
pipeline::UNetCall GuidedCall(const at::Tensor& sample, const at::Tensor& t, const at::Tensor& context,
                              int64_t batch, const pipeline::HookFactory* hooks) {
  pipeline::UNetCall call{.sample = sample, .timesteps = t, .encoder_hidden_states = context};
  pipeline::UNetCall::Group group{.factory = hooks, .info = {.call_index = 0}};
  for (int64_t r = 0; r < 2 * batch; ++r) {
    group.rows.push_back(r);
    group.info.row_seeds.push_back(static_cast<uint64_t>(r % batch));
    group.info.row_is_uncond.push_back(r < batch);
    group.info.row_sample.push_back(static_cast<int>(r % batch));
    group.info.row_call_index.push_back(0);
    group.info.row_hook_seeds.push_back(0);
  }
  call.groups.push_back(std::move(group));
  return call;
}

absl::StatusOr<std::vector<double>> Time(pipeline::StableDiffusion& sd, const Config& c, const c10::Device& device,
                                         at::ScalarType dtype, pipeline::UNetGraphs* graphs,
                                         std::map<std::string, OpTime>* profile) {
  namespace prof = torch::profiler::impl;
  const prof::ProfilerConfig profiler_config(prof::ProfilerState::KINETO);
  const std::set<prof::ActivityType> activities = {prof::ActivityType::CPU};
  if (profile != nullptr) torch::autograd::profiler::prepareProfiler(profiler_config, activities);
  const int max_downsample = c.tome_max_downsample > 0
                                 ? static_cast<int>(c.tome_max_downsample)
                                 : tome::DefaultMaxDownsample(sd.unet().config().AttentionDownsamples());
  const tome::TokenMerging tome_settings{.ratio = c.tome_ratio, .max_downsample = max_downsample};
  std::shared_ptr<const tome::TokenMergingHooks> hooks;
  if (tome::IsActive(tome_settings)) {
    auto created = tome::TokenMergingHooks::Create(tome_settings);
    if (!created.ok()) return created.status();
    hooks = *created;
  }
  std::vector<double> times;
  ResetPeakMemory(device);
  absl::Status status = pipeline::GuardTorch("benchmark", [&]() -> absl::Status {
    c10::InferenceMode inference;
    const auto options = at::TensorOptions().dtype(dtype).device(device);
    const int64_t rows = 2 * c.batch, scale = sd.vae_scale();
    const int64_t lh = c.height / scale, lw = c.width / scale;
    const at::Tensor sample = at::randn({rows, sd.unet().config().in_channels, lh, lw}, options);
    const at::Tensor context = at::randn({rows, 77, sd.text_embed_dim()}, options);
    const at::Tensor t = at::full({rows}, 500.0, at::kFloat);
    const at::Tensor block_input = at::randn({rows, lh * lw, sd.unet().config().block_out_channels.at(0)}, options);
    pipeline::UNetAddedConditions added;  // SDXL: a pooled embedding and the image's size ids per row
    if (sd.unet().config().text_time()) {
      const double h = static_cast<double>(c.height), w = static_cast<double>(c.width);
      added = {.text_embeds = at::randn({rows, sd.unet().config().pooled_text_dim()}, options),
               .time_ids = at::tensor({h, w, 0.0, 0.0, h, w}, at::kDouble).repeat({rows, 1}).to(options)};
    }
    for (int64_t i = 0; i < c.warmup + c.reps; ++i) {
      if (profile != nullptr && i == c.warmup) torch::autograd::profiler::enableProfiler(profiler_config, activities);
      Sync(device);
      const auto t0 = std::chrono::steady_clock::now();
      if (c.mode == "unet") {
        pipeline::UNetCall call = GuidedCall(sample, t, context, c.batch, hooks.get());
        call.added = added;
        (void)(graphs != nullptr ? graphs->Run(sd.unet(), call) : pipeline::RunUNetCall(sd.unet(), call));
      } else if (c.mode == "merge") {
        auto hook = hooks ? hooks->ForCall({}) : nullptr;
        if (hook) {
          const pipeline::BlockTokenOps ops =
              hook->ForBlock({"down_blocks.0.attentions.0.transformer_blocks.0", lh, lw}, block_input);
          if (ops.attn) (void)ops.attn->Unmerge(ops.attn->Merge(block_input));
        }
      } else {
        std::vector<pipeline::SampleSpec> samples;
        for (int64_t b = 0; b < c.batch; ++b) {
          samples.push_back({.prompt = "a photo of an astronaut riding a horse on mars", .seed = uint64_t(b)});
        }
        auto images = sd.Generate({.width = static_cast<int>(c.width), .height = static_cast<int>(c.height),
                                   .num_inference_steps = static_cast<int>(c.steps),
                                   .scheduler = c.scheduler.value_or(sd.default_scheduler()), .hooks = hooks},
                                  std::move(samples), {.graphs = graphs});
        if (!images.ok()) return images.status();
      }
      Sync(device);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i >= c.warmup) times.push_back(s);
    }
    if (profile != nullptr) *profile = AggregateProfile(*torch::autograd::profiler::disableProfiler());
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return times;
}

void PrintResult(const Config& c, const std::vector<double>& times, const c10::Device& device, at::ScalarType dtype,
                 bool channels_last, bool cudnn_benchmark, const pipeline::UNetGraphs* graphs) {
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  const double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  std::printf(
      "{\"impl\": \"tomeserve\", \"mode\": \"%s\", \"width\": %lld, \"height\": %lld, \"batch\": %lld, "
      "\"steps\": %lld, \"tome_ratio\": %g, \"device\": \"%s\", \"dtype\": \"%s\", \"threads\": %d, "
      "\"channels_last\": %s, \"cudnn_benchmark\": %s, \"cuda_graphs\": %s, \"graph_replays\": %lld, "
      "\"huge_pages\": %s, "
      "\"peak_device_bytes\": %lld, \"median_s\": %.6f, \"times_s\": [%s]}\n",
      c.mode.c_str(), static_cast<long long>(c.width), static_cast<long long>(c.height),
      static_cast<long long>(c.batch), static_cast<long long>(c.steps), c.tome_ratio, device.str().c_str(),
      pipeline::ComputeDTypeName(dtype).c_str(), at::get_num_threads(), channels_last ? "true" : "false",
      cudnn_benchmark ? "true" : "false", graphs != nullptr ? "true" : "false",
      static_cast<long long>(graphs != nullptr ? graphs->stats().replays : 0), huge_pages ? "true" : "false",
      static_cast<long long>(PeakMemory(device)), median,
      absl::StrJoin(times, ", ").c_str());
  std::fflush(stdout);
}

void PrintProfile(const std::map<std::string, OpTime>& ops) {
  std::vector<std::string> items;
  for (const auto& [name, t] : ops) {
    items.push_back(absl::StrCat("\"", absl::CHexEscape(name), "\": [", t.self_s, ", ", t.total_s, ", ", t.calls, "]"));
  }
  std::printf("{\"profile\": {%s}}\n", absl::StrJoin(items, ", ").c_str());
  std::fflush(stdout);
}

}  // namespace

int BenchMain(const std::vector<std::string>& raw) {
  const auto asks = [&raw](const char* flag) { return std::find(raw.begin(), raw.end(), flag) != raw.end(); };
  if (asks("--help") || asks("-h")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::set<std::string> value_flags = kSessionFlags;
  value_flags.insert(kConfigFlags.begin(), kConfigFlags.end());
  absl::StatusOr<CliArgs> a = CliArgs::Parse(raw, value_flags, kSessionSwitches);
  if (!a.ok()) return Fail(a.status(), 2);
  const bool from_stdin = a->Has("stdin");
  if (from_stdin) {
    for (const std::string& flag : kConfigFlags) {
      if (a->Has(flag)) {
        return Fail(absl::InvalidArgumentError(absl::StrCat("--", flag, " goes on the stdin lines with --stdin")), 2);
      }
    }
  }
  absl::StatusOr<Config> first = ParseConfig(*a);  // validated up front even with --stdin (all defaults then)
  if (!first.ok()) return Fail(first.status(), 2);
  auto model = a->Required("model");
  if (!model.ok()) return Fail(model.status(), 2);
  auto threads = a->GetInt("threads", 0, 0, 1024);
  if (!threads.ok()) return Fail(threads.status(), 2);
  auto device = pipeline::ParseDevice(a->Get("device").value_or("cpu"));
  if (!device.ok()) return Fail(device.status(), 2);
  auto dtype = pipeline::ParseComputeDType(a->Get("dtype").value_or("fp32"));
  if (!dtype.ok()) return Fail(dtype.status(), 2);
  if (*threads > 0) at::set_num_threads(static_cast<int>(*threads));
  if (a->Has("channels-last") && a->Has("contiguous-weights")) {
    return Fail(absl::InvalidArgumentError("--channels-last and --contiguous-weights exclude each other"), 2);
  }
  pipeline::ComputeTarget target{*device, *dtype};
  if (a->Has("channels-last")) target.channels_last = true;
  if (a->Has("contiguous-weights")) target.channels_last = false;
  const bool channels_last = target.use_channels_last(), cudnn_benchmark = a->Has("cudnn-benchmark");
  if (cudnn_benchmark) at::globalContext().setBenchmarkCuDNN(true);

#ifdef TOMESERVE_HAVE_CUDA
  // A stream of this process's own for everything, as a server worker has (graphs cannot be captured on the
  // legacy default stream).
  std::optional<c10::cuda::CUDAStreamGuard> stream;
  if (device->is_cuda()) stream.emplace(c10::cuda::getStreamFromPool(false, device->index()));
#endif
  std::unique_ptr<pipeline::UNetGraphs> graphs;
  if (a->Has("cuda-graphs")) {
    auto created = pipeline::UNetGraphs::Create(*device, {});
    if (!created.ok()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--cuda-graphs: ", created.status().message())), 2);
    }
    graphs = *std::move(created);
  }

  std::map<std::string, OpTime> profile;
  std::map<std::string, OpTime>* const profile_ptr = a->Has("profile") ? &profile : nullptr;

  auto sd = pipeline::StableDiffusion::Create({*model, target});
  if (!sd.ok()) return Fail(sd.status(), 1);

  if (!from_stdin) {
    absl::StatusOr<std::vector<double>> times = Time(**sd, *first, *device, *dtype, graphs.get(), profile_ptr);
    if (!times.ok()) return Fail(times.status(), 1);
    PrintResult(*first, *times, *device, *dtype, channels_last, cudnn_benchmark, graphs.get());
    if (profile_ptr != nullptr) PrintProfile(profile);
    return 0;
  }
  int exit_code = 0;
  for (std::string line; std::getline(std::cin, line) && !line.empty();) {
    const std::vector<std::string> words = absl::StrSplit(line, ' ', absl::SkipEmpty());
    absl::StatusOr<CliArgs> args = CliArgs::Parse(words, kConfigFlags, {});
    absl::StatusOr<Config> config = args.ok() ? ParseConfig(*args) : absl::StatusOr<Config>(args.status());
    if (!config.ok()) return Fail(config.status(), 2);
    absl::StatusOr<std::vector<double>> times = Time(**sd, *config, *device, *dtype, graphs.get(), profile_ptr);
    if (!times.ok()) {
      // A failed configuration is reported and the session goes on. Out of memory is a result (the seed's
      // table marks such cells), not a broken run: it leaves the exit status alone.
      const bool oom = pipeline::IsOutOfMemory(times.status());
      std::printf("{\"impl\": \"tomeserve\", \"oom\": %s, \"error\": \"%s\"}\n", oom ? "true" : "false",
                  absl::CHexEscape(times.status().ToString()).c_str());
      std::fflush(stdout);
#ifdef TOMESERVE_HAVE_CUDA
      if (device->is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
      if (!oom) exit_code = 1;
      continue;
    }
    PrintResult(*config, *times, *device, *dtype, channels_last, cudnn_benchmark, graphs.get());
    if (profile_ptr != nullptr) PrintProfile(profile);
  }
  return exit_code;
}

}  // namespace tomeserve::tools

int main(int argc, char** argv) {
  // Before any tensor exists (the CPU allocator reads the setting once), as tomeserve itself does.
  tomeserve::tools::huge_pages = tomeserve::pipeline::EnableHugePageAllocations();
  return tomeserve::tools::BenchMain(std::vector<std::string>(argv + 1, argv + argc));
}
