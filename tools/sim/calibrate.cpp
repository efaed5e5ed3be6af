// The one tomeserve-sim translation unit that includes torch: it loads the model and times the pipeline's own
// parts, as the server's worker runs them (PrepareSamples, DenoiseBatch::Step, Decode, EncodePng), on one
// thread, medians of --repeats.
#include "tools/sim/calibrate.h"

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "pipeline/denoise_batch.h"
#include "pipeline/device.h"
#include "pipeline/image_codec.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"
#include "tome/tome_hooks.h"
#include "tools/cli_args.h"
#include "tools/sim/cost_profile.h"

namespace tomeserve::sim {
namespace {

int Usage(const std::string& m) {
  std::fprintf(stderr, "tomeserve-sim calibrate: %s (see tomeserve-sim --help)\n", m.c_str());
  return 2;
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

struct Grid {
  std::vector<std::pair<int, int>> sizes;
  std::vector<int> rows;
  std::vector<double> ratios;
  int repeats = 5;
};

absl::Status Measure(const pipeline::StableDiffusion& sd, const Grid& grid, ProfileData* out) {
  c10::InferenceMode inference;
  int prompt_counter = 0;  // fresh prompts: text encoding is timed without the embedding cache's help
  for (auto [width, height] : grid.sizes) {
    const pipeline::BatchSpec spec{.width = width, .height = height, .num_inference_steps = 500};
    for (double ratio : grid.ratios) {
      std::shared_ptr<const tome::TokenMergingHooks> hooks;
      if (ratio > 0) {
        absl::StatusOr<std::shared_ptr<tome::TokenMergingHooks>> created =
            tome::TokenMergingHooks::Create({.ratio = ratio});
        if (!created.ok()) return created.status();
        hooks = *created;
      }
      for (int rows : grid.rows) {
        // Even rows: rows/2 images with classifier-free guidance; odd: that many images without.
        const bool cfg = rows % 2 == 0;
        const int images = cfg ? rows / 2 : rows;
        std::vector<pipeline::SampleSpec> samples;
        for (int i = 0; i < images; ++i) {
          samples.push_back({.prompt = absl::StrCat("calibration ", ++prompt_counter),
                             .seed = static_cast<uint64_t>(i),
                             .guidance_scale = cfg ? 7.5 : 1.0,
                             .scheduler = pipeline::SchedulerKind::kDdim,
                             .hooks = hooks});
        }
        absl::StatusOr<std::vector<pipeline::DenoiseBatch::Sample>> prepared = sd.PrepareSamples(spec, samples);
        if (!prepared.ok()) return prepared.status();
        pipeline::DenoiseBatch batch(sd, height / sd.vae_scale(), width / sd.vae_scale());
        for (auto& s : *prepared) {
          absl::StatusOr<int> id = batch.Add(std::move(s));
          if (!id.ok()) return id.status();
        }
        std::vector<double> times;
        for (int k = 0; k <= grid.repeats; ++k) {  // the first is a warm-up
          const double t0 = Now();
          if (absl::Status s = batch.Step(); !s.ok()) return s;
          if (k > 0) times.push_back(Now() - t0);
        }
        out->steps.push_back({width, height, rows, ratio, Median(times)});
        std::fprintf(stderr, "calibrate: %dx%d rows %d ratio %.2f: %.4f s per step\n", width, height, rows, ratio,
                     out->steps.back().seconds);
      }
    }
    // Fixed costs: a guided call's text encoding (prompt + negative prompt, cache missed), one image's decode +
    // PNG encode (the server's compression).
    std::vector<double> text, image;
    for (int k = 0; k <= grid.repeats; ++k) {
      const double t0 = Now();
      absl::StatusOr<std::vector<pipeline::DenoiseBatch::Sample>> one = sd.PrepareSamples(
          spec, {{.prompt = absl::StrCat("calibration ", ++prompt_counter),
                  .negative_prompt = absl::StrCat("negative ", prompt_counter)}});
      if (!one.ok()) return one.status();
      const double t1 = Now();
      absl::StatusOr<std::vector<at::Tensor>> rgb = sd.Decode((*one)[0].latents);
      if (!rgb.ok()) return rgb.status();
      const at::Tensor pixels = (*rgb)[0].contiguous();
      absl::StatusOr<std::string> png =
          pipeline::EncodePng(pixels.data_ptr<uint8_t>(), width, height, {}, pipeline::kPngFastCompression);
      if (!png.ok()) return png.status();
      if (k > 0) {
        text.push_back(t1 - t0);
        image.push_back(Now() - t1);
      }
    }
    out->fixed.push_back({width, height, Median(text), Median(image)});
    std::fprintf(stderr, "calibrate: %dx%d text encoding %.4f s per call, decode + encode %.4f s per image\n", width,
                 height, out->fixed.back().call_seconds, out->fixed.back().image_seconds);
  }
  return absl::OkStatus();
}

}  // namespace

int Calibrate(const std::vector<std::string>& rest) {
  absl::StatusOr<tools::CliArgs> args =
      tools::CliArgs::Parse(rest, {"model", "devices", "out", "sizes", "rows", "ratios", "dtype", "repeats"}, {});
  if (!args.ok()) return Usage(std::string(args.status().message()));
  absl::StatusOr<std::string> model = args->Required("model");
  if (!model.ok()) return Usage(std::string(model.status().message()));
  absl::StatusOr<std::string> devices = args->Required("devices");
  if (!devices.ok()) return Usage(std::string(devices.status().message()));
  absl::StatusOr<std::string> out_path = args->Required("out");
  if (!out_path.ok()) return Usage(std::string(out_path.status().message()));
  const std::vector<std::string> device_list = absl::StrSplit(*devices, ',', absl::SkipEmpty());
  if (device_list.empty()) return Usage("--devices is empty");
  absl::StatusOr<c10::Device> device = pipeline::ParseDevice(device_list[0]);  // one profile per device kind
  if (!device.ok()) return Usage(absl::StrCat("--devices: ", device.status().message()));
  const std::string dtype_name = args->Get("dtype").value_or("auto");
  absl::StatusOr<c10::ScalarType> dtype =
      pipeline::ParseComputeDType(dtype_name == "auto" ? (device->is_cuda() ? "fp16" : "fp32") : dtype_name);
  if (!dtype.ok()) return Usage(absl::StrCat("--dtype: ", dtype.status().message()));
  absl::StatusOr<int64_t> repeats = args->GetInt("repeats", 5, 1, 1000);
  if (!repeats.ok()) return Usage(std::string(repeats.status().message()));

  Grid grid{.repeats = static_cast<int>(*repeats)};
  for (absl::string_view r : absl::StrSplit(args->Get("rows").value_or("1,2,4,8"), ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(r, &v) || v < 1 || v > 64) return Usage(absl::StrCat("--rows: \"", r, "\"; allowed: 1..64"));
    grid.rows.push_back(v);
  }
  for (absl::string_view r : absl::StrSplit(args->Get("ratios").value_or("0,0.5"), ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(r, &v) || v < 0 || v > 0.75) {
      return Usage(absl::StrCat("--ratios: \"", r, "\"; allowed: 0..0.75"));
    }
    grid.ratios.push_back(v);
  }
  if (std::find(grid.ratios.begin(), grid.ratios.end(), 0.0) == grid.ratios.end()) {
    return Usage("--ratios must include 0 (the profile's baseline)");
  }

  absl::StatusOr<std::unique_ptr<pipeline::StableDiffusion>> sd =
      pipeline::StableDiffusion::Create({.model_dir = *model, .target = {*device, *dtype}});
  if (!sd.ok()) {
    std::fprintf(stderr, "tomeserve-sim calibrate: %s\n", std::string(sd.status().message()).c_str());
    return 1;
  }
  const std::string sizes = args->Get("sizes").value_or(absl::StrCat((*sd)->native_width(), "x", (*sd)->native_height()));
  for (absl::string_view s : absl::StrSplit(sizes, ',', absl::SkipEmpty())) {
    std::vector<absl::string_view> wh = absl::StrSplit(s, 'x');
    int w = 0, h = 0;
    if (wh.size() != 2 || !absl::SimpleAtoi(wh[0], &w) || !absl::SimpleAtoi(wh[1], &h) || w < 8 || h < 8 ||
        w % 8 != 0 || h % 8 != 0) {
      return Usage(absl::StrCat("--sizes: \"", s, "\"; allowed: WxH, multiples of 8"));
    }
    grid.sizes.emplace_back(w, h);
  }

  ProfileData data{.name = absl::StrCat("calibrated-", device_list[0]),
                   .device = absl::StrCat(device_list[0], " ", pipeline::ComputeDTypeName(*dtype)),
                   .source = absl::StrCat("tomeserve-sim calibrate --model ", *model, " --devices ", *devices),
                   .native_width = (*sd)->native_width(),
                   .native_height = (*sd)->native_height(),
                   // The worker's CPU budget (kCpuBatchCost); a CUDA worker derives its own from free memory and
                   // logs it ("batch budget ..."): put that here for a GPU profile.
                   .batch_cost_budget = 16 * 64 * 64,
                   // The step points are whole DenoiseBatch::Step() calls on the worker's thread, host work
                   // included; the server's loop adds nothing measurable per step on a CPU.
                   .step_overhead_seconds = 0};
  absl::Status status = pipeline::GuardTorch("calibration", [&] { return Measure(**sd, grid, &data); });
  if (!status.ok()) {
    std::fprintf(stderr, "tomeserve-sim calibrate: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  std::ofstream out(*out_path);
  out << ProfileJson(data);
  if (!out) {
    std::fprintf(stderr, "tomeserve-sim calibrate: cannot write %s\n", out_path->c_str());
    return 1;
  }
  std::fprintf(stderr, "calibrate: wrote %s (%zu step points)\n", out_path->c_str(), data.steps.size());
  return 0;
}

}  // namespace tomeserve::sim
