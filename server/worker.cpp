// The device worker: life cycle (load, warm-up, the loop), admission and the denoising step. Retiring finished
// samples is in worker_output.cpp, parking samples (out-of-memory eviction, fair-share pauses) and readmitting
// them in worker_parking.cpp; the shared state in worker_impl.h. With worker_output.cpp, worker_parking.cpp,
// device_probe.cpp and phase_clock.cpp, one of the server translation units that include torch headers.
#include "server/worker.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/InferenceMode.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "pipeline/torch_status.h"
#include "server/device_probe.h"
#include "server/worker_impl.h"

#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace tomeserve::server {

using worker_internal::Seconds;

absl::StatusOr<std::unique_ptr<Worker>> Worker::Create(const WorkerOptions& options, Metrics* metrics,
                                                      StepTimeModel* step_times) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->metrics = metrics;
  impl->step_times = step_times;
  absl::StatusOr<c10::Device> device = pipeline::ParseDevice(options.device);
  if (!device.ok()) return device.status();
  const std::string dtype = options.dtype == "auto" ? (device->is_cuda() ? "fp16" : "fp32") : options.dtype;
  absl::StatusOr<c10::ScalarType> scalar = pipeline::ParseComputeDType(dtype);
  if (!scalar.ok()) return absl::InvalidArgumentError(absl::StrCat("--dtype: ", scalar.status().message()));
  impl->target = {*device, *scalar};
  // Loading and the warm-up run on the worker's own thread and stream, as serving does: the warm-up's cached
  // blocks belong to the stream that reuses them, and only that thread ever runs CPU kernels (a second thread
  // with its own OpenMP team oversubscribes the cores, and libgomp then sleeps between parallel regions).
  std::unique_ptr<Worker> worker(new Worker(std::move(impl)));
  std::promise<absl::Status> loaded;
  std::future<absl::Status> result = loaded.get_future();
  Impl* raw = worker->impl_.get();
  worker->thread_ = std::thread([raw, &loaded] { raw->Run(&loaded); });
  if (absl::Status s = result.get(); !s.ok()) {
    worker->thread_.join();  // Run returns right after reporting a failed load
    return s;
  }
  spdlog::info("worker {} on {}: batch budget {} rows x latent pixels, at most {} images", options.index,
               options.device, raw->budget, options.max_batch_images);
  return worker;
}

absl::Status Worker::Impl::Load() {
  for (const ModelSpec& spec : options.models) {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<std::unique_ptr<pipeline::StableDiffusion>> sd =
        pipeline::StableDiffusion::Create({.model_dir = spec.dir, .target = target, .variant = options.variant});
    if (!sd.ok()) {
      return absl::Status(sd.status().code(), absl::StrCat("model \"", spec.name, "\" (", spec.dir, ") on ",
                                                           options.device, ": ", sd.status().message()));
    }
    // Warm-up: one image at the native size through the whole pipeline (allocator, kernels, schedule). Its
    // steps after the first (which pays one-time costs) seed the step-time model.
    const int width = (*sd)->native_width(), height = (*sd)->native_height();
    pipeline::UNetGraphs* model_graphs = nullptr;
    if (options.cuda_graphs && target.device.is_cuda()) {
      absl::StatusOr<std::unique_ptr<pipeline::UNetGraphs>> created =
          pipeline::UNetGraphs::Create(target.device, {});
      if (created.ok()) {
        model_graphs = created->get();
        graphs[spec.name] = *std::move(created);
      } else {
        spdlog::warn("model {} on {}: no CUDA graphs: {}", spec.name, options.device,
                     std::string(created.status().message()));
      }
    }
    auto last = std::chrono::steady_clock::now();
    absl::StatusOr<std::vector<pipeline::GeneratedImage>> images = (*sd)->Generate(
        {.width = width, .height = height, .num_inference_steps = options.warmup_steps,
         .scheduler = (*sd)->default_scheduler()},
        {pipeline::SampleSpec{.prompt = "warm-up", .seed = 0}},
        {.progress =
             [&](int done, int) {
               const auto now = std::chrono::steady_clock::now();
               if (done > 1) {
                 step_times->Observe(spec.name, static_cast<int64_t>(width / 8) * (height / 8), 2, 0.0,
                                     std::chrono::duration<double>(now - last).count());
               }
               last = now;
             },
         .cancelled = [this](int) { return options.stop_warmup && options.stop_warmup(); },
         .graphs = model_graphs});
    if (!images.ok()) {
      return absl::Status(images.status().code(),
                          absl::StrCat("model \"", spec.name, "\" (", spec.dir,
                                       "): warm-up failed: ", images.status().message()));
    }
    spdlog::info("loaded model {} from {} on {} ({}) in {:.2f}s", spec.name, spec.dir, options.device,
                 pipeline::ComputeDTypeName(target.dtype), Seconds(absl::Now() - t0));
    models[spec.name] = *std::move(sd);
  }
  budget = options.max_batch_cost > 0 ? options.max_batch_cost : kCpuBatchCost;
  const int encoders = options.encode_threads >= 0 ? options.encode_threads : (target.device.is_cuda() ? 2 : 0);
  if (encoders > 0) encode_pool = std::make_unique<EncodePool>(encoders);
#ifdef TOMESERVE_HAVE_CUDA
  if (options.max_batch_cost <= 0 && target.device.is_cuda()) {
    // What is left after the weights, at a conservative 256 KiB of activations per row x latent pixel in 16-bit
    // (twice that in fp32; SD 1.5 with SDPA needs well under it), 80% of it. The OOM path corrects a guess that
    // is too high.
    size_t free_bytes = 0, total_bytes = 0;
    c10::cuda::CUDAGuard guard(target.device.index());
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      const double per = (target.dtype == at::kFloat ? 2.0 : 1.0) * 256 * 1024;
      budget = std::max<int64_t>(64 * 64 * 2, static_cast<int64_t>(0.8 * free_bytes / per));
    }
  }
#endif
  return absl::OkStatus();
}

void Worker::Impl::Run(std::promise<absl::Status>* loaded) {
  c10::InferenceMode inference;
#ifdef TOMESERVE_HAVE_CUDA
  // This worker's own stream (and current device) for everything it runs, the warm-up included.
  std::optional<c10::cuda::CUDAStreamGuard> stream;
  if (target.device.is_cuda()) stream.emplace(c10::cuda::getStreamFromPool(false, target.device.index()));
#endif
  absl::Status status = pipeline::GuardTorch("loading", [this] { return Load(); });
  const bool ok = status.ok();
  loaded->set_value(std::move(status));  // `loaded` dies with Create() from here on
  if (!ok) {
    finished.Notify();
    return;
  }
  Scheduler* to_serve = nullptr;
  {
    absl::MutexLock lock(&start_mu);
    start_mu.Await(absl::Condition(+[](Go* g) { return *g != Go::kWait; }, &go));
    if (go == Go::kRun) to_serve = scheduler;
  }
  if (to_serve != nullptr) Loop(to_serve);
  finished.Notify();
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
                   .family = pipeline::ModelFamilyName(sd.family()),
                   .tome_downsamples = sd.unet().config().AttentionDownsamples(),
                   .devices = {impl_->options.device},
                   .dtype = pipeline::ComputeDTypeName(impl_->target.dtype),
                   .tokenizer = &sd.tokenizer()});
  }
  return out;
}

int64_t Worker::batch_cost_budget() const { return impl_->budget; }

void Worker::Start(Scheduler* scheduler) {
  absl::MutexLock lock(&impl_->start_mu);
  impl_->scheduler = scheduler;
  impl_->go = Impl::Go::kRun;
}

void Worker::Join() {
  {
    absl::MutexLock lock(&impl_->start_mu);
    if (impl_->go == Impl::Go::kWait) impl_->go = Impl::Go::kAbandon;  // never started: the thread just exits
  }
  if (!thread_.joinable()) return;
  // A thread stuck in a kernel never returns: wait until it does, or until the watchdog gave up on it.
  while (!impl_->finished.WaitForNotificationWithTimeout(absl::Milliseconds(100))) {
    if (!impl_->in_service.load()) {
      thread_.detach();  // possibly stuck forever; main exits without it
      return;
    }
  }
  thread_.join();
}

bool Worker::in_service() const { return impl_->in_service.load(); }

bool Worker::CheckStuck(absl::Time now) {
  std::vector<std::shared_ptr<Job>> calls;
  absl::Time deadline;
  std::string what;
  {
    absl::MutexLock lock(&impl_->watch_mu);
    if (now <= impl_->watch_deadline) return false;
    deadline = impl_->watch_deadline;
    calls = impl_->watch_jobs;
    what = impl_->watch_what;
  }
  impl_->TakeOutOfService(
      absl::DeadlineExceededError(absl::StrCat(what, " ran past its limit (",
                                               absl::FormatDuration(now - deadline),
                                               " over; --step-timeout-seconds): the device looks hung")),
      calls);
  return true;
}

void Worker::Impl::Loop(Scheduler* scheduler) {
  clock = std::make_unique<PhaseClock>(target.device);
  step_timer = std::make_unique<StepTimer>(target.device, worker_internal::kStepTimerDepth);
  policy = &scheduler->policy();
  metrics->SetWorkerHealthy(options.device, true);
  // Host time per part of the loop while there is work (tomeserve_worker_seconds_total): the UNet call is
  // "step"; anything large elsewhere is overhead that keeps the device waiting.
  auto mark = std::chrono::steady_clock::now();
  const auto charge = [&](const char* part) {
    const auto now = std::chrono::steady_clock::now();
    metrics->AddWorkerSeconds(options.device, part, std::chrono::duration<double>(now - mark).count());
    mark = now;
  };
  while (in_service.load()) {
    try {
      Readmit();
      RetryDeferred();
      const bool was_idle = jobs.empty();
      // Blocks only when nothing is running; empty then means the scheduler stopped.
      std::vector<AdmittedCall> admitted = scheduler->Admit(View());
      if (admitted.empty() && jobs.empty()) {
        if (scheduler->stopped()) break;
        mark = std::chrono::steady_clock::now();
        continue;
      }
      if (was_idle) mark = std::chrono::steady_clock::now();  // the wait for work is not the worker's time
      for (const AdmittedCall& call : admitted) {
        Pause(call);
        StartOrFail(call);
      }
      RetireStopped();
      charge("admit");
      Step();
      charge("step");
      if (!in_service.load()) break;
      NotifyProgress();
      RetireDone();
      charge("retire");
    } catch (const std::exception& e) {
      // The pipeline reports torch errors as statuses; this is the last line for anything else (every admitted
      // job must be finished, or its call would hang).
      spdlog::error("worker {} on {}: {}", options.index, options.device, e.what());
      const absl::Status internal = absl::InternalError(absl::StrCat("internal error: ", e.what()));
      for (auto& run : jobs) End(*run, internal);
      FailDeferred(internal);
      parked.clear();
    }
    DropEnded();
    DropIdleBatches();
    if (jobs.empty()) {
      ObserveTimed(step_timer->Drain());  // idle: the last steps' times, before the next call is planned
      oom_cap = INT_MAX;
      steps_at_cap = 0;
    }
    scheduler->ReportBacklog(options.index, in_service.load() ? Backlog() : 0);
    ReportGauges();
    charge("bookkeeping");
  }
  metrics->SetWorkerHealthy(options.device, false);
  if (!in_service.load()) {
    // Calls the watchdog or a fatal error already failed: nothing else of this batch is delivered.
    const absl::Status unavailable = absl::UnavailableError(absl::StrCat(options.device, " is out of service"));
    for (auto& run : jobs) End(*run, unavailable);
    FailDeferred(unavailable);
    jobs.clear();
    parked.clear();
    batches.clear();
  }
}

void Worker::Impl::TakeOutOfService(const absl::Status& why, const std::vector<std::shared_ptr<Job>>& calls) {
  if (in_service.exchange(false) == false) return;
  metrics->SetWorkerHealthy(options.device, false);
  spdlog::error("worker {} on {} is out of service: {}", options.index, options.device, std::string(why.message()));
  const absl::Status unavailable = absl::UnavailableError(
      absl::StrCat(options.device, " failed and is out of service (", why.message(),
                   "); retry: another replica, or this server once restarted, will serve the call"));
  for (const auto& job : calls) job->Finish(unavailable);
  if (options.on_out_of_service) options.on_out_of_service(options.device, why);
}

bool Worker::Impl::FaultDue(absl::string_view kind, int64_t count) const {
  const int64_t n = options.inject_fault_at_step;
  return n > 0 && options.inject_fault == kind && (options.inject_fault_every ? count % n == 0 : count == n);
}

absl::Status Worker::Impl::InjectedFault() {
  const std::string& kind = options.inject_fault;
  if (kind == "start" || kind == "text-oom" || !FaultDue(kind, steps_run)) return absl::OkStatus();  // not steps
  const int64_t n = options.inject_fault_at_step;
  const std::string at = absl::StrCat(" (--inject-worker-fault ", options.inject_fault,
                                      options.inject_fault_every ? "%" : "@", n, ")");
  if (options.inject_fault == "request") return absl::InternalError(absl::StrCat("injected request-level error", at));
  if (options.inject_fault == "fatal") {
    return pipeline::DeviceFatalError(absl::StrCat("injected CUDA error: an illegal memory access", at));
  }
  if (options.inject_fault == "oom") {  // once: a transient out-of-memory error (marked like a real one)
    return pipeline::OutOfMemoryError(absl::StrCat("injected out of memory", at));
  }
  // "stuck": the step never returns, like a hung kernel; the watchdog must notice.
  spdlog::warn("worker {} on {}: injected stuck step{}", options.index, options.device, at);
  while (true) absl::SleepFor(absl::Milliseconds(100));
}

void Worker::Impl::ReportGauges() const {
  int active = 0;
  for (const auto& b : batches) active += b->denoise->active_samples();
  metrics->SetRunningSamples(options.device, active);
  for (const MemoryReading& m : ReadDeviceMemory(target.device)) metrics->SetDeviceMemory(options.device, m.kind, m.bytes);
}

WorkerView Worker::Impl::View(std::vector<RunningJob*>* order) const {
  WorkerView v{.cost = step_times,
               .max_images = std::min(options.max_batch_images, oom_cap),
               .budget = budget,
               .max_batches = options.max_running_batches};
  for (const auto& run : jobs) {
    if (run->ended) continue;
    if (order != nullptr && run->batch->denoise->active_samples() == 0) continue;
    // UNet calls until the call's last sample is done (a parked sample keeps its place in its schedule).
    int left = 0;
    for (int i = 0; i < static_cast<int>(run->images.size()); ++i) {
      if (run->images[i]) continue;
      const int id = run->sample_ids[i];
      const int done = id >= 0 ? run->batch->denoise->sample(id).state->step_index() : run->last_progress;
      left = std::max(left, run->num_calls - done);
    }
    v.running.push_back({.call = run->call,
                         .ratio = run->tome.ratio,
                         .calls_left = left,
                         .paused = run->paused_for.has_value() && Live(*run->paused_for)});
    if (order != nullptr) order->push_back(run.get());
  }
  return v;
}

RunningBatch& Worker::Impl::BatchFor(const GenerationRequest& req, const pipeline::StableDiffusion& model) {
  for (auto& b : batches) {
    if (b->model == req.key.model && b->width == req.key.width && b->height == req.key.height) return *b;
  }
  auto b = std::make_unique<RunningBatch>();
  b->denoise = std::make_unique<pipeline::DenoiseBatch>(model, req.key.height / model.vae_scale(),
                                                        req.key.width / model.vae_scale());
  if (auto it = graphs.find(req.key.model); it != graphs.end()) b->denoise->set_graphs(it->second.get());
  b->model = req.key.model;
  b->width = req.key.width;
  b->height = req.key.height;
  batches.push_back(std::move(b));
  return *batches.back();
}

void Worker::Impl::DropIdleBatches() {
  std::erase_if(batches, [this](const std::unique_ptr<RunningBatch>& b) {
    return std::none_of(jobs.begin(), jobs.end(), [&](const auto& run) { return run->batch == b.get(); });
  });
}

void Worker::Impl::Watch(const char* what, const std::shared_ptr<Job>& also) {
  const double limit = options.step_timeout_seconds > 0 ? options.step_timeout_seconds
                                                        : std::max(120.0, 50.0 * last_step_seconds);
  absl::MutexLock lock(&watch_mu);
  watch_deadline = absl::Now() + absl::Seconds(limit);
  watch_what = what;
  watch_jobs.clear();
  for (const auto& run : jobs) watch_jobs.push_back(run->job);
  if (also != nullptr) watch_jobs.push_back(also);
}

void Worker::Impl::Unwatch() {
  absl::MutexLock lock(&watch_mu);
  watch_deadline = absl::InfiniteFuture();
  watch_jobs.clear();
}

void Worker::Impl::StartOrFail(const AdmittedCall& admitted, bool oomed_alone) {
  try {
    Start(admitted, oomed_alone);
  } catch (const std::exception& e) {
    Unwatch();
    spdlog::error("worker {} on {}: starting a call: {}", options.index, options.device, e.what());
    const absl::Status internal = absl::InternalError(absl::StrCat("internal error starting the call: ", e.what()));
    // Start puts the run in `jobs` before it adds samples, so End removes any it added.
    if (!jobs.empty() && jobs.back()->job == admitted.job) {
      End(*jobs.back(), internal);
    } else {
      admitted.job->Finish(internal);
    }
  }
}

void Worker::Impl::RetryDeferred() {
  if (deferred.empty() || (!jobs.empty() && jobs.size() >= deferred_at_jobs)) return;
  std::deque<Deferred> retry;
  retry.swap(deferred);
  const absl::Time now = absl::Now();
  for (Deferred& d : retry) {
    if (absl::Status stop = d.call.job->StopReason(now); !stop.ok()) {
      d.call.job->Finish(stop);
      continue;
    }
    StartOrFail(d.call, d.alone);  // may defer it again
  }
}

void Worker::Impl::FailDeferred(const absl::Status& why) {
  for (Deferred& d : deferred) d.call.job->Finish(why);
  deferred.clear();
}

void Worker::Impl::Start(const AdmittedCall& admitted, bool oomed_alone) {
  const std::shared_ptr<Job>& job = admitted.job;
  const GenerationRequest& req = job->request();
  auto run = std::make_unique<RunningJob>();
  run->job = job;
  run->call = admitted.call;
  run->admitted = absl::Now();
  run->tome = job->effective_tome();
  run->images.resize(req.num_images);
  run->sample_ids.assign(req.num_images, -1);
  run->result.queue_seconds = Seconds(run->admitted - job->enqueued());
  run->result.tome = run->tome;
  run->result.slo = job->slo();
  auto model = models.find(req.key.model);
  if (model == models.end()) {  // the catalog only names loaded models
    job->Finish(absl::InternalError(absl::StrCat("model ", req.key.model, " is not loaded on ", options.device)));
    return;
  }
  run->model = model->second.get();
  run->batch = &BatchFor(req, *run->model);
  uint64_t hook_seed = 0;
  if (tome::IsActive(run->tome)) {
    tome::TokenMerging setting = tome::Canonical(run->tome);
    hook_seed = setting.seed;
    setting.seed = 0;
    std::shared_ptr<tome::TokenMergingHooks>& hooks = run->batch->hooks_by_setting[setting];
    if (hooks == nullptr) {
      absl::StatusOr<std::shared_ptr<tome::TokenMergingHooks>> created = tome::TokenMergingHooks::Create(setting);
      if (!created.ok()) {
        job->Finish(created.status());
        return;
      }
      hooks = *created;
    }
    run->hooks = hooks;
  }
  std::vector<pipeline::SampleSpec> specs;
  for (int i = 0; i < req.num_images; ++i) {
    specs.push_back({.prompt = req.prompt,
                     .negative_prompt = req.negative_prompt,
                     .seed = req.seed + static_cast<uint64_t>(i),
                     .guidance_scale = req.guidance_scale,
                     .num_inference_steps = req.key.steps,
                     .scheduler = req.key.scheduler,
                     .hooks = run->hooks,
                     .hook_seed = hook_seed});
  }
  Watch("text encoding", job);
  clock->Start();
  // The model is this worker's own (one per device), so the cache counters move only for this call here.
  const pipeline::TextEmbeddingCache::Stats cache_before = run->model->text_cache_stats();
  absl::StatusOr<std::vector<pipeline::DenoiseBatch::Sample>> samples =
      FaultDue("text-oom", ++text_encodings)
          ? absl::StatusOr<std::vector<pipeline::DenoiseBatch::Sample>>(pipeline::OutOfMemoryError(absl::StrCat(
                "injected out of memory (--inject-worker-fault text-oom@", options.inject_fault_at_step, ")")))
          : run->model->PrepareSamples({.width = req.key.width, .height = req.key.height}, std::move(specs));
  const double text_seconds = clock->Stop();
  Unwatch();
  const pipeline::TextEmbeddingCache::Stats cache_after = run->model->text_cache_stats();
  metrics->CountTextCacheLookups(req.key.model, cache_after.hits - cache_before.hits,
                                 cache_after.misses - cache_before.misses);
  if (!samples.ok() && pipeline::IsOutOfMemory(samples.status())) {
    metrics->CountOom(req.key.model, tome::Canonical(run->tome).ratio, req.key.width, req.key.height);
    EmptyCache();
    if (jobs.empty() && oomed_alone) {
      job->Finish(absl::ResourceExhaustedError(absl::StrCat(
          "out of memory on ", options.device, " encoding the prompt, twice with nothing else running: ",
          samples.status().message())));
      return;
    }
    // Other calls hold the memory: this one waits until some of them finished (with nothing running, it is
    // retried once at the next step boundary, the cache emptied).
    spdlog::warn("out of memory encoding the text of a call on {} while {} other call(s) run; it waits",
                 options.device, jobs.size());
    deferred_at_jobs = deferred.empty() ? jobs.size() : std::min(deferred_at_jobs, jobs.size());
    deferred.push_back({admitted, jobs.empty()});
    return;
  }
  if (!samples.ok()) {
    job->Finish(samples.status());
    return;
  }
  run->result.text_encoding_seconds = text_seconds;
  run->num_calls = (*samples)[0].state->schedule().num_calls();
  // In `jobs` before its samples join, so that whatever happens from here on (an error, an exception) ends it
  // with End, which takes its samples out again.
  jobs.push_back(std::move(run));
  RunningJob& started = *jobs.back();
  for (int i = 0; i < req.num_images; ++i) {
    absl::StatusOr<int> id = started.batch->denoise->Add(std::move((*samples)[i]));
    if (!id.ok()) {  // BatchFor matched the batch's size
      End(started, id.status());
      return;
    }
    started.sample_ids[i] = *id;
  }
  if (FaultDue("start", ++calls_started)) {
    throw std::runtime_error(absl::StrCat("injected exception (--inject-worker-fault start@",
                                          options.inject_fault_at_step, ")"));
  }
}

void Worker::Impl::End(RunningJob& run, const absl::StatusOr<GenerationResult>& result) {
  if (run.ended) return;
  run.ended = true;
  for (int& id : run.sample_ids) {
    if (id >= 0) run.batch->denoise->Remove(id);
    id = -1;
  }
  if (result.ok()) {
    metrics->ObservePhases(run.call.model, result->queue_seconds, result->text_encoding_seconds, result->denoising_seconds,
                           result->decoding_seconds);
    step_times->ObserveFixed(run.call.model, run.call.latent_pixels, run.call.images,
                             result->text_encoding_seconds + result->decoding_seconds);
  }
  run.job->Finish(result);
}

void Worker::Impl::DropEnded() {
  std::erase_if(parked, [](const Parked& p) { return p.run->ended; });
  std::erase_if(jobs, [](const std::unique_ptr<RunningJob>& r) { return r->ended && r->encoding == 0; });
}

void Worker::Impl::RetireStopped() {
  const absl::Time now = absl::Now();
  for (auto& run : jobs) {
    if (absl::Status stop = run->job->StopReason(now); !stop.ok()) End(*run, stop);
  }
  DropEnded();
}

void Worker::Impl::Step() {
  // The batch to step: the policy's pick among the batches with an active sample.
  std::vector<RunningJob*> order;
  const WorkerView view = View(&order);
  if (order.empty()) return;
  RunningBatch& b = *order[policy != nullptr ? policy->PickBatch(view) : 0]->batch;
  pipeline::DenoiseBatch* const batch = b.denoise.get();
  const int images = batch->active_samples();
  const int rows = batch->active_rows();
  double tome_rows = 0;
  for (const auto& run : jobs) {
    if (run->batch != &b) continue;
    for (int id : run->sample_ids) {
      if (id >= 0 && batch->sample(id).active()) tome_rows += batch->sample(id).rows_per_call() * run->tome.ratio;
    }
  }
  Watch("a denoising step");
  ++steps_run;
  step_timer->Begin();
  absl::Status status = InjectedFault();
  if (status.ok() && options.inject_oom_above_batch >= 0 && images > options.inject_oom_above_batch) {
    // Marked exactly like a real c10::OutOfMemoryError (pipeline::GuardTorch), so it takes the same path.
    status = pipeline::OutOfMemoryError(absl::StrCat("injected out of memory (--inject-oom-above-batch ",
                                                     options.inject_oom_above_batch, ") for a batch of ", images));
  } else if (status.ok()) {
    const auto graphs_of_model = graphs.find(b.model);
    pipeline::UNetGraphs* model_graphs = graphs_of_model == graphs.end() ? nullptr : graphs_of_model->second.get();
    const pipeline::UNetGraphs::Stats before = model_graphs ? model_graphs->stats() : pipeline::UNetGraphs::Stats{};
    status = batch->Step();
    if (model_graphs == nullptr) {
      metrics->CountUNetCalls(options.device, "eager", 1);
    } else {
      const pipeline::UNetGraphs::Stats after = model_graphs->stats();
      metrics->CountUNetCalls(options.device, "graph", after.replays - before.replays);
      metrics->CountUNetCalls(options.device, "capture", after.captures - before.captures);
      // A capture's warm-up is one of its eager runs.
      metrics->CountUNetCalls(options.device, "eager",
                              (after.eager - before.eager) - (after.captures - before.captures));
      metrics->CountGraphRows(options.device, after.rows - before.rows, after.padded_rows - before.padded_rows);
      metrics->SetGraphLayouts(options.device, after.layouts);
    }
  }
  if (status.ok()) {
    // Timed later (StepTimer): what its time is observed under, taken now while the batch is as it ran.
    worker_internal::UntimedStep untimed{.tag = static_cast<uint64_t>(steps_run),
                                         .model = b.model,
                                         .width = b.width,
                                         .height = b.height,
                                         .pixels = batch->latent_height() * batch->latent_width(),
                                         .rows = rows,
                                         .tome_rows = tome_rows,
                                         .ratios = {0.0}};
    bool mixed = false;
    for (auto& run : jobs) {
      if (run->batch != &b) continue;
      run->result.batch_size = std::max(run->result.batch_size, images);
      if (run->ended) continue;
      const double ratio = tome::Canonical(run->tome).ratio;
      if (untimed.only_ratio && RatioLabel(*untimed.only_ratio) != RatioLabel(ratio)) mixed = true;
      untimed.only_ratio = ratio;
      if (std::none_of(untimed.ratios.begin(), untimed.ratios.end(),
                       [&](double r) { return RatioLabel(r) == RatioLabel(ratio); })) {
        untimed.ratios.push_back(ratio);
      }
    }
    if (mixed) untimed.only_ratio.reset();
    untimed_steps.push_back(std::move(untimed));
    step_timer->End(static_cast<uint64_t>(steps_run));
  }
  // Reads the events of earlier steps the device has passed (waits only when the ring is full).
  ObserveTimed(step_timer->Collect());
  Unwatch();
  if (!in_service.load()) return;  // the watchdog gave up on this step; its calls are failed
  if (status.ok()) {
    if (oom_cap != INT_MAX && images >= oom_cap && ++steps_at_cap >= worker_internal::kOomProbeSteps) {
      // The batch ran at the cap for a while: probe one image more (an OOM sets the cap back to what fitted).
      steps_at_cap = 0;
      oom_cap = oom_cap + 1 >= options.max_batch_images ? INT_MAX : oom_cap + 1;
      spdlog::info("{}: image cap after an out-of-memory error raised to {}", options.device,
                   oom_cap == INT_MAX ? options.max_batch_images : oom_cap);
    }
    metrics->ObserveBatch(images, rows);
    return;
  }
  if (pipeline::IsOutOfMemory(status)) {
    Evict(b, status, images);
    return;
  }
  if (pipeline::IsDeviceFatal(status)) {
    std::vector<std::shared_ptr<Job>> calls;
    for (const auto& run : jobs) calls.push_back(run->job);
    TakeOutOfService(status, calls);
    return;
  }
  // A request-level error fails every call in the batch (a failed scheduler step leaves the batch unusable; it
  // is dropped with its last call); the worker goes on with its other batches and the next calls.
  spdlog::error("step failed on {}: {}", options.device, std::string(status.message()));
  for (auto& run : jobs) {
    if (run->batch == &b) End(*run, status);
  }
}

void Worker::Impl::ObserveTimed(const std::vector<StepTimer::Timed>& timed) {
  for (const StepTimer::Timed& t : timed) {
    // Steps are timed in the order they ran; a step that failed was never queued for timing.
    while (!untimed_steps.empty() && untimed_steps.front().tag < t.tag) untimed_steps.pop_front();
    if (untimed_steps.empty() || untimed_steps.front().tag != t.tag) continue;
    const worker_internal::UntimedStep step = std::move(untimed_steps.front());
    untimed_steps.pop_front();
    last_step_seconds = t.seconds;
    step_times->Observe(step.model, step.pixels, step.rows, step.tome_rows, t.seconds);
    // The step-time histogram's tome_ratio label means that ratio's work: a step whose rows mix ratios is not
    // observed there (the step-time model's per-ratio marginal cost covers mixed batches).
    if (step.only_ratio) metrics->ObserveStep(step.model, *step.only_ratio, step.width, step.height, t.seconds);
    // What one more guided image at each ratio present (and at 0, the comparison's base) would add to a step.
    const std::optional<double> now_cost = step_times->StepSeconds(step.model, step.pixels, step.rows, step.tome_rows);
    if (!now_cost) continue;
    for (double ratio : step.ratios) {
      if (std::optional<double> more =
              step_times->StepSeconds(step.model, step.pixels, step.rows + 2, step.tome_rows + 2 * ratio)) {
        metrics->SetStepMarginal(step.model, ratio, step.width, step.height, std::max(0.0, *more - *now_cost));
      }
    }
  }
}

void Worker::Impl::NotifyProgress() {
  for (auto& run : jobs) {
    if (run->ended) continue;
    // The call's progress is its slowest image's (evicted images wait), never going backwards.
    int step = INT_MAX;
    for (int i = 0; i < static_cast<int>(run->images.size()); ++i) {
      if (run->images[i]) continue;
      const int id = run->sample_ids[i];
      int at = run->last_progress;
      if (id >= 0) at = run->batch->denoise->sample(id).state->step_index();
      step = std::min(step, at);
    }
    if (step == INT_MAX) step = run->num_calls;
    if (step > run->last_progress) {
      run->last_progress = step;
      run->job->NotifyProgress(step, run->num_calls);
    }
  }
}

double Worker::Impl::Backlog() const {
  // The batches step in turn: each one's longest remaining schedule, added up.
  int calls = 0;
  for (const auto& b : batches) {
    int most = 0;
    for (int id : b->denoise->ids()) {
      const auto& s = b->denoise->sample(id);
      if (s.active()) most = std::max(most, s.state->schedule().num_calls() - s.state->step_index());
    }
    calls += most;
  }
  return calls * last_step_seconds;
}

void Worker::Impl::EmptyCache() const {
#ifdef TOMESERVE_HAVE_CUDA
  if (target.device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

}  // namespace tomeserve::server
