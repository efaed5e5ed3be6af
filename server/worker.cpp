// The only server translation unit that includes torch headers (with main's model loading through it).
#include "server/worker.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "pipeline/denoise_batch.h"
#include "pipeline/device.h"
#include "pipeline/image_codec.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/torch_status.h"
#include "tome/tome_hooks.h"

#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tomeserve::server {

// ---- BatchQueue ----

void BatchQueue::Push(Batch batch) {
  absl::MutexLock lock(&mu_);
  batches_.push_back(std::move(batch));
}

std::optional<Batch> BatchQueue::Pop() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](BatchQueue* q) ABSL_EXCLUSIVE_LOCKS_REQUIRED(q->mu_) { return q->closed_ || !q->batches_.empty(); },
      this));
  if (batches_.empty()) return std::nullopt;
  Batch b = std::move(batches_.front());
  batches_.pop_front();
  return b;
}

void BatchQueue::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::string& spec) {
  std::vector<std::string> devices;
  if (spec == "auto") {
    const int n = at::globalContext().hasCUDA() ? static_cast<int>(at::getNumGPUs()) : 0;
    for (int i = 0; i < n; ++i) devices.push_back(absl::StrCat("cuda:", i));
    if (devices.empty()) devices.push_back("cpu");
    return devices;
  }
  for (absl::string_view d : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    absl::StatusOr<c10::Device> device = pipeline::ParseDevice(d);
    if (!device.ok())
      return absl::InvalidArgumentError(absl::StrCat("--devices: ", device.status().message()));
    const std::string name = device->str();
    if (std::find(devices.begin(), devices.end(), name) != devices.end()) {
      return absl::InvalidArgumentError(absl::StrCat("--devices: ", name, " is listed twice"));
    }
    devices.push_back(name);
  }
  if (devices.empty()) return absl::InvalidArgumentError("--devices: empty");
  return devices;
}

// ---- Worker ----

namespace {

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

// Per-job bookkeeping while its batch runs (worker thread only).
struct JobRun {
  std::shared_ptr<Job> job;
  std::vector<std::optional<EncodedImage>> images;
  absl::Status error;
  GenerationResult result;
  // The highest progress step sent to the call: after an OOM split the sub-batches restart from step 0, and a
  // client must never see its progress go backwards.
  int last_progress_step = 0;
  bool done() const { return job->finished() || !error.ok(); }
};

// One image of one job in the batch.
struct SampleRef {
  int job;    // index into the JobRun vector
  int image;  // 0-based image of that job
};

}  // namespace

struct Worker::Impl {
  WorkerOptions options;
  Metrics* metrics;
  pipeline::ComputeTarget target;
  std::map<std::string, std::unique_ptr<pipeline::StableDiffusion>> models;

  void Loop(BatchQueue* queue, const std::function<void()>& on_batch_done);
  void RunBatch(Batch batch);
  // Runs the samples `refs` (a sub-batch), splitting on OOM.
  void RunWithSplit(const Batch& batch, const std::vector<SampleRef>& refs, std::vector<JobRun>* runs);
  absl::Status RunOnce(const Batch& batch, const std::vector<SampleRef>& refs, std::vector<JobRun>* runs);
  absl::StatusOr<EncodedImage> Encode(const JobRun& run, const at::Tensor& rgb8, int image) const;
  void EmptyCache() const;
};

absl::StatusOr<std::unique_ptr<Worker>> Worker::Create(const WorkerOptions& options, Metrics* metrics) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->metrics = metrics;
  absl::StatusOr<c10::Device> device = pipeline::ParseDevice(options.device);
  if (!device.ok()) return device.status();
  const std::string dtype = options.dtype == "auto" ? (device->is_cuda() ? "fp16" : "fp32") : options.dtype;
  absl::StatusOr<c10::ScalarType> scalar = pipeline::ParseComputeDType(dtype);
  if (!scalar.ok()) return absl::InvalidArgumentError(absl::StrCat("--dtype: ", scalar.status().message()));
  impl->target = {*device, *scalar};
  for (const ModelSpec& spec : options.models) {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<std::unique_ptr<pipeline::StableDiffusion>> sd =
        pipeline::StableDiffusion::Create({.model_dir = spec.dir, .target = impl->target});
    if (!sd.ok()) {
      return absl::Status(sd.status().code(), absl::StrCat("model \"", spec.name, "\" (", spec.dir, ") on ",
                                                           options.device, ": ", sd.status().message()));
    }
    // Warm-up: one image at the native size through the whole pipeline (allocator, kernels, schedule).
    pipeline::BatchSpec warm{.width = (*sd)->native_width(),
                             .height = (*sd)->native_height(),
                             .num_inference_steps = options.warmup_steps,
                             .scheduler = (*sd)->default_scheduler()};
    absl::StatusOr<std::vector<pipeline::GeneratedImage>> images = (*sd)->Generate(
        warm, {pipeline::SampleSpec{.prompt = "warm-up", .seed = 0}},
        {.cancelled = [&options](int) { return options.stop_warmup && options.stop_warmup(); }});
    if (!images.ok()) {
      return absl::Status(images.status().code(),
                          absl::StrCat("model \"", spec.name, "\" (", spec.dir,
                                       "): warm-up failed: ", images.status().message()));
    }
    spdlog::info("loaded model {} from {} on {} ({}) in {:.2f}s", spec.name, spec.dir, options.device, dtype,
                 Seconds(absl::Now() - t0));
    impl->models[spec.name] = *std::move(sd);
  }
  return std::unique_ptr<Worker>(new Worker(std::move(impl)));
}

Worker::Worker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Worker::~Worker() { Join(); }

std::vector<ModelDescription> Worker::Describe() const {
  std::vector<ModelDescription> out;
  for (const ModelSpec& spec : impl_->options.models) {
    const pipeline::StableDiffusion& sd = *impl_->models.at(spec.name);
    out.push_back({.name = spec.name,
                   .native_width = sd.native_width(),
                   .native_height = sd.native_height(),
                   .default_scheduler = sd.default_scheduler(),
                   .devices = {impl_->options.device},
                   .dtype = pipeline::ComputeDTypeName(impl_->target.dtype),
                   .tokenizer = &sd.tokenizer()});
  }
  return out;
}

void Worker::Start(BatchQueue* queue, std::function<void()> on_batch_done) {
  thread_ = std::thread([this, queue, done = std::move(on_batch_done)] { impl_->Loop(queue, done); });
}

void Worker::Join() {
  if (thread_.joinable()) thread_.join();
}

void Worker::Impl::Loop(BatchQueue* queue, const std::function<void()>& on_batch_done) {
  at::NoGradGuard no_grad;
#ifdef TOMESERVE_HAVE_CUDA
  // This worker's own stream (and current device) for everything it runs.
  std::optional<c10::cuda::CUDAStreamGuard> stream;
  if (target.device.is_cuda()) stream.emplace(c10::cuda::getStreamFromPool(false, target.device.index()));
#endif
  while (std::optional<Batch> batch = queue->Pop()) {
    const std::vector<std::shared_ptr<Job>> jobs = batch->jobs;
    // The pipeline reports torch errors as statuses; this is the last line for anything else (every job of
    // the batch must be finished, or its call would hang).
    try {
      RunBatch(*std::move(batch));
    } catch (const std::exception& e) {
      spdlog::error("batch failed with an exception on {}: {}", options.device, e.what());
      for (const auto& job : jobs)
        job->Finish(absl::InternalError(absl::StrCat("internal error: ", e.what())));
    }
    on_batch_done();
  }
}

void Worker::Impl::EmptyCache() const {
#ifdef TOMESERVE_HAVE_CUDA
  if (target.device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

void Worker::Impl::RunBatch(Batch batch) {
  const absl::Time start = absl::Now();
  std::vector<JobRun> runs;
  std::vector<SampleRef> refs;
  for (std::shared_ptr<Job>& job : batch.jobs) {
    if (absl::Status stop = job->StopReason(start); !stop.ok()) {
      job->Finish(stop);
      continue;
    }
    JobRun run{.job = job};
    run.images.resize(job->num_images());
    run.result.queue_seconds = Seconds(start - job->enqueued());
    for (int i = 0; i < job->num_images(); ++i) refs.push_back({static_cast<int>(runs.size()), i});
    runs.push_back(std::move(run));
  }
  if (refs.empty()) return;
  RunWithSplit(batch, refs, &runs);

  for (JobRun& run : runs) {
    const GenerationResult& r = run.result;
    if (!run.error.ok()) {
      run.job->Finish(run.error);
      continue;
    }
    if (absl::Status stop = run.job->StopReason(absl::Now()); !stop.ok()) {
      run.job->Finish(stop);
      continue;
    }
    for (auto& img : run.images) {
      if (!img) {  // cannot happen: every sample either produced an image or failed its job
        run.job->Finish(absl::InternalError("an image is missing from the batch result"));
        break;
      }
      run.result.images.push_back(*std::move(img));
    }
    run.result.total_seconds = Seconds(absl::Now() - run.job->enqueued());
    metrics->ObservePhases(r.queue_seconds, r.text_encoding_seconds, r.denoising_seconds, r.decoding_seconds);
    run.job->Finish(std::move(run.result));
  }
}

void Worker::Impl::RunWithSplit(const Batch& batch, const std::vector<SampleRef>& all,
                                std::vector<JobRun>* runs) {
  // Samples of jobs that already ended (cancelled, expired, failed) are not run again.
  std::vector<SampleRef> refs;
  for (const SampleRef& r : all) {
    if (!(*runs)[r.job].done()) refs.push_back(r);
  }
  if (refs.empty()) return;
  const int n = static_cast<int>(refs.size());
  absl::Status status;
  if (options.inject_oom_above_batch >= 0 && n > options.inject_oom_above_batch) {
    // Marked exactly like a real c10::OutOfMemoryError (pipeline::GuardTorch), so it takes the same path.
    status = pipeline::OutOfMemoryError(absl::StrCat("injected out of memory (--inject-oom-above-batch ",
                                                     options.inject_oom_above_batch, ") for a batch of ", n));
  } else {
    status = RunOnce(batch, refs, runs);
  }
  if (status.ok()) return;
  // Only a real (or injected) out-of-memory error is split and counted; any other error, RESOURCE_EXHAUSTED
  // included, fails the sub-batch's calls as it is.
  if (!pipeline::IsOutOfMemory(status)) {
    for (const SampleRef& r : refs) {
      if ((*runs)[r.job].error.ok()) (*runs)[r.job].error = status;
    }
    return;
  }
  metrics->CountOom(batch.key.tome.ratio, batch.key.width, batch.key.height);
  EmptyCache();
  if (n == 1) {
    spdlog::warn("out of memory for a single image ({}): {}", ToString(batch.key),
                 std::string(status.message()));
    JobRun& run = (*runs)[refs[0].job];
    if (run.error.ok()) {
      run.error = absl::ResourceExhaustedError(absl::StrCat(
          "out of memory on ", options.device, ": a single ", batch.key.width, "x", batch.key.height,
          " image does not fit even alone; try a smaller size: ", status.message()));
    }
    return;
  }
  spdlog::warn("out of memory for a batch of {} ({}); splitting in halves", n, ToString(batch.key));
  const std::vector<SampleRef> first(refs.begin(), refs.begin() + n / 2),
      second(refs.begin() + n / 2, refs.end());
  RunWithSplit(batch, first, runs);
  RunWithSplit(batch, second, runs);
}

absl::Status Worker::Impl::RunOnce(const Batch& batch, const std::vector<SampleRef>& refs,
                                   std::vector<JobRun>* runs) {
  const pipeline::StableDiffusion& sd = *models.at(batch.key.model);
  pipeline::BatchSpec spec{.width = batch.key.width,
                           .height = batch.key.height,
                           .num_inference_steps = batch.key.steps,
                           .scheduler = batch.key.scheduler};
  std::shared_ptr<tome::TokenMergingHooks> hooks;
  if (tome::IsActive(batch.key.tome)) {
    absl::StatusOr<std::shared_ptr<tome::TokenMergingHooks>> h =
        tome::TokenMergingHooks::Create(batch.key.tome);
    if (!h.ok()) return h.status();
    hooks = *h;
    spec.hooks = hooks;
  }
  std::vector<pipeline::SampleSpec> samples;
  for (const SampleRef& r : refs) {
    const GenerationRequest& req = (*runs)[r.job].job->request();
    samples.push_back({.prompt = req.prompt,
                       .negative_prompt = req.negative_prompt,
                       .seed = req.seed + static_cast<uint64_t>(r.image),
                       .guidance_scale = req.guidance_scale});
  }
  // Jobs in this sub-batch, each once, for progress events.
  std::vector<int> jobs;
  for (const SampleRef& r : refs) {
    if (jobs.empty() || jobs.back() != r.job) jobs.push_back(r.job);
  }

  pipeline::PhaseTimings phases;
  absl::StatusOr<std::unique_ptr<pipeline::DenoiseBatch>> started =
      sd.StartBatch(spec, std::move(samples), &phases);
  if (!started.ok()) return started.status();
  pipeline::DenoiseBatch& denoise = **started;

  const absl::Time t_denoise = absl::Now();
  while (!denoise.Done()) {
    // Step boundary: a cancelled or expired call ends now; its samples leave the batch.
    const absl::Time now = absl::Now();
    bool any_active = false;
    for (int i = 0; i < static_cast<int>(refs.size()); ++i) {
      if (denoise.cancelled(i)) continue;
      JobRun& run = (*runs)[refs[i].job];
      if (absl::Status stop = run.job->StopReason(now); !stop.ok()) run.job->Finish(stop);
      if (run.done()) {
        denoise.Cancel(i);
      } else {
        any_active = true;
      }
    }
    if (!any_active) return absl::OkStatus();
    if (absl::Status s = denoise.Step(); !s.ok()) return s;
    for (int j : jobs) {
      JobRun& run = (*runs)[j];
      if (denoise.calls_done() <= run.last_progress_step) continue;
      run.last_progress_step = denoise.calls_done();
      run.job->NotifyProgress(denoise.calls_done(), denoise.num_calls());
    }
  }
  const double denoising = Seconds(absl::Now() - t_denoise);

  const absl::Time t_decode = absl::Now();
  absl::StatusOr<at::Tensor> latents = denoise.ActiveLatents();
  if (!latents.ok()) return latents.status();
  if (!latents->defined()) return absl::OkStatus();  // every sample was cancelled
  absl::StatusOr<std::vector<at::Tensor>> rgb = sd.Decode(*latents);
  if (!rgb.ok()) return rgb.status();
  const double decoding = Seconds(absl::Now() - t_decode);

  std::vector<MergeCount> merged;
  if (hooks) {
    for (const tome::BlockMergeCount& c : hooks->MergeCounts()) {
      merged.push_back({c.block, c.tokens_before, c.tokens_after});
    }
  }
  const int batch_images = static_cast<int>(refs.size());
  metrics->ObserveBatch(batch_images);
  int next = 0;
  for (int i = 0; i < static_cast<int>(refs.size()); ++i) {
    if (denoise.cancelled(i)) continue;
    JobRun& run = (*runs)[refs[i].job];
    const at::Tensor& image = (*rgb)[next++];
    if (run.done()) continue;
    absl::StatusOr<EncodedImage> encoded = Encode(run, image, refs[i].image);
    if (!encoded.ok()) {
      run.error = encoded.status();
      continue;
    }
    run.images[refs[i].image] = *std::move(encoded);
    GenerationResult& r = run.result;
    r.batch_size = std::max(r.batch_size, batch_images);
    r.text_encoding_seconds = phases.text_encoding;
    r.denoising_seconds = denoising;
    r.decoding_seconds = decoding;
    r.merged_tokens = merged;
  }
  spdlog::debug("batch of {} ({}) on {}: text {:.3f}s denoise {:.3f}s decode {:.3f}s", batch_images,
                ToString(batch.key), options.device, phases.text_encoding, denoising, decoding);
  return absl::OkStatus();
}

absl::StatusOr<EncodedImage> Worker::Impl::Encode(const JobRun& run, const at::Tensor& rgb8,
                                                  int image) const {
  const GenerationRequest& req = run.job->request();
  at::Tensor pixels = rgb8.to(at::kCPU).contiguous();
  EncodedImage out{.width = static_cast<int>(pixels.size(1)),
                   .height = static_cast<int>(pixels.size(0)),
                   .seed = req.seed + static_cast<uint64_t>(image)};
  const uint8_t* data = pixels.data_ptr<uint8_t>();
  if (req.output_format == OutputFormat::kRawRgb8) {
    out.data.assign(reinterpret_cast<const char*>(data), static_cast<size_t>(pixels.numel()));
    out.mime_type = "application/octet-stream";
    return out;
  }
  pipeline::GenerationParameters params{.prompt = req.prompt,
                                        .negative_prompt = req.negative_prompt,
                                        .steps = req.key.steps,
                                        .sampler = std::string(pipeline::A1111SamplerName(req.key.scheduler)),
                                        .cfg_scale = req.guidance_scale,
                                        .seed = out.seed,
                                        .width = out.width,
                                        .height = out.height,
                                        .model = req.key.model};
  if (tome::IsActive(req.tome))
    params.extra.emplace_back("Token merging ratio", pipeline::FormatA1111Number(req.tome.ratio));
  absl::StatusOr<std::string> png = pipeline::EncodePng(
      data, out.width, out.height, {{"parameters", pipeline::FormatA1111Parameters(params)}});
  if (!png.ok()) return png.status();
  out.data = *std::move(png);
  out.mime_type = "image/png";
  return out;
}

}  // namespace tomeserve::server
