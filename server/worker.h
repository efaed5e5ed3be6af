// Device workers: one thread per device owning that device's model replicas (one StableDiffusion per served
// model) and up to max_running_batches running batches (pipeline::DenoiseBatch, one per model and latent size),
// re-formed at every step boundary:
//   admit   parked samples first (see OOM), then what Scheduler::Admit hands out (text encoding + noise, once)
//   retire  cancelled or expired calls leave at once (their other samples too)
//   step    one UNet call for every active sample of the batch the policy picks (BatchingPolicy::PickBatch: the
//           one holding the most urgent call), each at its own step (mixed ToMe groups inside the blocks)
//   retire  finished samples: decoded in chunks of 4 per boundary, encoded; a call finishes with its last image
// Out of memory (real, or injected for tests with --inject-oom-above-batch; told apart by
// pipeline::IsOutOfMemory): the CUDA cache is freed, the most recently admitted half of the stepped batch's
// samples is evicted with its state kept (parked, re-admitted first, oldest first) and the step is retried; the
// worker's image cap per batch drops to what fitted until all its batches drain. No step is recomputed. A sample that fails alone fails its call
// with RESOURCE_EXHAUSTED. An OOM while decoding frees the cache and retries that one image once.
// Other errors: a request-level one fails the calls in the batch and the worker goes on; a device-fatal one
// (pipeline::IsDeviceFatal: sticky CUDA errors) or a step the watchdog finds stuck takes the worker out of
// service: its calls fail with UNAVAILABLE, health and metrics say so, and main exits when no worker is left.
//
// This header is torch-free (the pipeline lives behind Impl, in worker_impl.h), so main and the service compile
// without torch.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/metrics.h"
#include "server/model_catalog.h"
#include "server/options.h"
#include "server/scheduler.h"
#include "server/step_time_model.h"

namespace tomeserve::server {

struct WorkerOptions {
  int index = 0;       // this worker's number (Scheduler::ReportBacklog)
  std::string device;  // "cpu", "cuda:0", ...
  std::string dtype;   // "auto", "fp32", "fp16", "bf16"
  std::vector<ModelSpec> models;
  std::string variant;  // diffusers weight variant for every model (pipeline::PipelineOptions::variant)
  int max_batch_images = 8;  // per running batch
  // Running batches of different model or size held side by side (BatchingPolicy::PickBatch steps one).
  int max_running_batches = 2;
  // Cost budget of the running batch in rows x latent pixels; 0: derived (CUDA: from the memory left after
  // loading; CPU: kCpuBatchCost).
  int64_t max_batch_cost = 0;
  // -1: off; N >= 0: UNet calls with more than N images fail with an injected OOM (never the warm-up).
  int inject_oom_above_batch = -1;
  int warmup_steps = 2;
  // CUDA devices: UNet calls through CUDA graphs (pipeline::UNetGraphs, one per model), the warm-up's included.
  bool cuda_graphs = true;
  // Threads that encode finished images while the batch goes on (EncodePool); 0: on the worker thread; -1: 2 on
  // a CUDA device, 0 on the CPU.
  int encode_threads = -1;
  // Polled between warm-up steps (any thread's signal): true stops the warm-up early (the server is exiting).
  std::function<bool()> stop_warmup;
  // TESTING AID (1-based counts over the worker's life; 0 = off). At the Nth denoising step inject `fault`:
  // "request" (a request-level error: that batch's calls fail, the next batch is served), "fatal" (a
  // device-fatal error), "stuck" (the step never returns; the watchdog must notice) or "oom" (a transient
  // out-of-memory error: eviction, then the cap probes back up). "start": an exception while starting the Nth
  // call; "text-oom": an out-of-memory error in the Nth text encoding (the call waits for running ones).
  std::string inject_fault;
  int inject_fault_at_step = 0;
  bool inject_fault_every = false;  // "request" at every multiple of inject_fault_at_step
  // How long one step may run before the watchdog takes the worker out of service; 0: 50x the last step, at
  // least 120 s.
  double step_timeout_seconds = 0;
  // Called once, on the worker's or the watchdog's thread, when the worker leaves service for good (a
  // device-fatal error or a stuck step). Its calls have been failed with UNAVAILABLE by then.
  std::function<void(const std::string& device, const absl::Status& why)> on_out_of_service;
};

// 16 rows of 64x64 latents: 8 guided 512x512 images.
inline constexpr int64_t kCpuBatchCost = 16 * 64 * 64;

class Worker {
 public:
  // Loads every model onto the device and runs one small warm-up generation per model (its steps seed
  // `step_times`). Slow. Errors name the model folder. `metrics` and `step_times` must outlive the worker.
  static absl::StatusOr<std::unique_ptr<Worker>> Create(const WorkerOptions& options, Metrics* metrics,
                                                        StepTimeModel* step_times);
  ~Worker();  // Join()s

  // Torch-free descriptions of this worker's models; their tokenizers live as long as the worker.
  std::vector<ModelDescription> Describe() const;
  // The cost budget in use (rows x latent pixels).
  int64_t batch_cost_budget() const;

  // Starts the thread: it admits from `scheduler` until the scheduler is stopped and its batch is empty, or
  // until the worker leaves service. Every job it admits is finished (by it, or by the watchdog).
  void Start(Scheduler* scheduler);
  // Joins the thread; a worker out of service may be stuck in a kernel: its thread is detached instead.
  void Join();

  // Watchdog (any thread): when the current step has run past its limit, fails the worker's calls with
  // UNAVAILABLE, takes it out of service and returns true.
  bool CheckStuck(absl::Time now);
  bool in_service() const;

  struct Impl;

 private:
  explicit Worker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
};

}  // namespace tomeserve::server
