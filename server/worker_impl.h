// The device worker's state, shared by its translation units: worker.cpp (life cycle, admission, the denoising
// step, out-of-memory eviction) and worker_output.cpp (retiring finished samples: VAE decode, image encoding,
// results). Internal to server/; everything here belongs to the worker thread unless a comment says otherwise.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "pipeline/denoise_batch.h"
#include "pipeline/device.h"
#include "pipeline/stable_diffusion.h"
#include "server/encode_pool.h"
#include "server/phase_clock.h"
#include "server/worker.h"
#include "tome/tome_hooks.h"

namespace tomeserve::server {
namespace worker_internal {

inline double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

// One running batch of this worker: the samples of one model and latent size (worker thread only). The worker
// holds up to WorkerOptions::max_running_batches of them; at each step boundary the batching policy picks the
// one that steps (BatchingPolicy::PickBatch).
struct RunningBatch {
  std::unique_ptr<pipeline::DenoiseBatch> denoise;
  std::string model;
  int width = 0, height = 0;
  // One hook factory per ToMe setting (seed excluded: it travels per sample), so equal settings share a group;
  // dropped with the batch (a factory's merge counts belong to one latent size).
  absl::flat_hash_map<tome::TokenMerging, std::shared_ptr<tome::TokenMergingHooks>> hooks_by_setting;
};

// One admitted call on this worker (worker thread only).
struct RunningJob {
  std::shared_ptr<Job> job;
  PolicyCall call;              // as the batching policy admitted it
  RunningBatch* batch = nullptr;  // where its samples are; the batch outlives every job that names it
  const pipeline::StableDiffusion* model = nullptr;
  tome::TokenMerging tome;                              // effective settings
  std::shared_ptr<const tome::TokenMergingHooks> hooks;  // null: plain UNet
  std::vector<int> sample_ids;                          // per image: its id in the batch, -1 when not in it
  std::vector<std::optional<EncodedImage>> images;
  GenerationResult result;
  absl::Time admitted;
  int last_progress = 0;
  int num_calls = 0;  // UNet calls per sample (PNDM: steps + 1)
  bool ended = false;
  int encoding = 0;   // images handed to the EncodePool and not collected yet: the run is kept until 0
  // Set while its samples are parked for another call (AdmitPlan::pause): that call's PolicyCall::id.
  std::optional<uint64_t> paused_for;

  int images_left() const {
    return static_cast<int>(std::count_if(images.begin(), images.end(), [](const auto& i) { return !i; }));
  }
};

// A sample that finished denoising at this step boundary, waiting to be decoded.
struct FinishedSample {
  RunningJob* run;
  int image;
  at::Tensor latents;
};

// A step queued on the device whose time StepTimer has not read yet: what that time is observed under, taken
// when the step ran.
struct UntimedStep {
  uint64_t tag = 0;  // StepTimer's
  std::string model;
  int width = 0, height = 0;
  int64_t pixels = 0;  // latent
  int rows = 0;
  double tome_rows = 0;
  std::optional<double> only_ratio;  // the step-time histogram's tome_ratio; none when the rows mix ratios
  std::vector<double> ratios;        // 0 and the ratios present (the marginal-cost gauge)
};

// Denoising steps the host may queue ahead of the device before it waits for the oldest one's events.
inline constexpr int kStepTimerDepth = 3;

// Images decoded in one VAE call at a step boundary.
inline constexpr size_t kDecodeChunk = 4;

// Successful steps at the OOM image cap before the cap grows by one image.
inline constexpr int kOomProbeSteps = 16;

// A sample evicted after an out-of-memory error, or paused for another call (fair preemption), state intact,
// waiting to rejoin.
struct Parked {
  RunningJob* run;
  int image;
  pipeline::DenoiseBatch::Sample sample;
  std::optional<uint64_t> held_for;  // paused: rejoins only once the call with this PolicyCall::id has ended
};

}  // namespace worker_internal

using worker_internal::FinishedSample;
using worker_internal::Parked;
using worker_internal::RunningBatch;
using worker_internal::RunningJob;

struct Worker::Impl {
  WorkerOptions options;
  Metrics* metrics;
  StepTimeModel* step_times;
  pipeline::ComputeTarget target;
  std::map<std::string, std::unique_ptr<pipeline::StableDiffusion>> models;
  // Per model (CUDA with --cuda-graphs): declared after `models`, so destroyed before them.
  std::map<std::string, std::unique_ptr<pipeline::UNetGraphs>> graphs;
  int64_t budget = kCpuBatchCost;

  // The running batches and what is in them (worker thread only). A batch is dropped when no job names it.
  std::vector<std::unique_ptr<RunningBatch>> batches;
  std::vector<std::unique_ptr<RunningJob>> jobs;  // admission order
  std::deque<Parked> parked;                      // front: next to rejoin
  int oom_cap = INT_MAX;  // image cap per batch after an OOM: what fitted; probed back up (steps_at_cap), reset when idle
  const BatchingPolicy* policy = nullptr;         // the scheduler's (Loop), for PickBatch
  double last_step_seconds = 0;
  std::unique_ptr<PhaseClock> clock;  // created on the worker thread (CUDA events belong to its device)
  std::unique_ptr<StepTimer> step_timer;  // the same; steps queued but not timed yet are in `untimed_steps`
  std::deque<worker_internal::UntimedStep> untimed_steps;
  int64_t steps_run = 0;              // steps started over the worker's life (fault injection counts them)

  // Images encoded on the EncodePool, handed back to the worker thread (CollectEncoded). `encodes_pending` is
  // the worker thread's count of those not collected yet.
  struct Encoded {
    RunningJob* run;  // kept alive while run->encoding > 0
    int image;
    absl::StatusOr<EncodedImage> encoded;
  };
  absl::Mutex encoded_mu;
  std::vector<Encoded> encoded ABSL_GUARDED_BY(encoded_mu);
  int encodes_pending = 0;
  // Declared after what its tasks touch, so it is destroyed (its tasks finished, threads joined) first. Null:
  // images are encoded on the worker thread.
  std::unique_ptr<EncodePool> encode_pool;

  // Handed from Start() (main thread) to the worker thread waiting after its warm-up.
  absl::Mutex start_mu;
  enum class Go { kWait, kRun, kAbandon } go ABSL_GUARDED_BY(start_mu) = Go::kWait;
  Scheduler* scheduler ABSL_GUARDED_BY(start_mu) = nullptr;

  // Shared with the watchdog (any thread): the device work running now on the worker thread (a denoising step,
  // text encoding, a decode, the wait for the encoder pool), its deadline and the calls to fail if it never
  // returns. Set by Watch, cleared by Unwatch; infinite while the worker waits for work.
  std::atomic<bool> in_service{true};
  absl::Mutex watch_mu;
  absl::Time watch_deadline ABSL_GUARDED_BY(watch_mu) = absl::InfiniteFuture();
  const char* watch_what ABSL_GUARDED_BY(watch_mu) = "";
  std::vector<std::shared_ptr<Job>> watch_jobs ABSL_GUARDED_BY(watch_mu);
  // Set when the worker thread returns (Join waits on it, and gives up on a thread the watchdog abandoned).
  absl::Notification finished;

  // Calls admitted whose text encoding ran out of memory: retried (oldest first) once the running work has
  // shrunk below `deferred_at_jobs` calls, or at once when nothing runs. `alone`: it ran out of memory with
  // nothing else running (a second time fails it).
  struct Deferred {
    AdmittedCall call;
    bool alone = false;
  };
  std::deque<Deferred> deferred;
  size_t deferred_at_jobs = 0;
  // Successful steps of a batch at the OOM image cap since the cap last moved: every kOomProbeSteps of them
  // raise the cap by one image, so one transient OOM does not halve the batch for good.
  int steps_at_cap = 0;
  // Fault injection counters (over the worker's life).
  int64_t calls_started = 0;
  int64_t text_encodings = 0;

  // The thread's whole life: load + warm up (result to `loaded`), wait for Start(), then Loop().
  void Run(std::promise<absl::Status>* loaded);
  absl::Status Load();
  void Loop(Scheduler* scheduler);
  // The policy's view of this worker; with `order`, the running call i of the view is (*order)[i]'s, and only
  // calls of batches with an active sample are in it.
  WorkerView View(std::vector<RunningJob*>* order = nullptr) const;
  RunningBatch& BatchFor(const GenerationRequest& req, const pipeline::StableDiffusion& model);
  void DropIdleBatches();
  // Every admitted call gets an answer: an exception while starting one fails that call (and only it).
  void StartOrFail(const AdmittedCall& admitted, bool oomed_alone = false);
  void Start(const AdmittedCall& admitted, bool oomed_alone);
  // Starts the deferred calls again when the running work shrank (or nothing runs); fails those that stopped.
  void RetryDeferred();
  void FailDeferred(const absl::Status& why);
  void Readmit();
  // Parks every active sample of the running calls `call.pause` until `call` ends (AdmitPlan::pause).
  void Pause(const AdmittedCall& call);
  // Whether a call with this PolicyCall::id is running here and has not ended.
  bool Live(uint64_t id) const;
  void RetireStopped();
  void Step();
  // Observes the timed steps' seconds (step-time model, step histogram, marginal-cost gauges).
  void ObserveTimed(const std::vector<StepTimer::Timed>& timed);
  void Evict(RunningBatch& b, const absl::Status& oom, int active);
  void NotifyProgress();
  void RetireDone();
  void DecodeChunk(const std::vector<FinishedSample>& chunk);
  // Takes the images the pool has finished into their runs; with `all`, waits for every pending one first.
  void CollectEncoded(bool all);
  void End(RunningJob& run, const absl::StatusOr<GenerationResult>& result);
  void DropEnded();
  void EmptyCache() const;
  double Backlog() const;
  void ReportGauges() const;
  // Fault injection: whether `kind` is due at the `count`th event it counts (steps, started calls, text
  // encodings); the step kinds' fault as a status.
  bool FaultDue(absl::string_view kind, int64_t count) const;
  absl::Status InjectedFault();
  // The watchdog covers `what` from now until Unwatch: the running calls (and `also`) fail if it outlives the
  // limit (--step-timeout-seconds; 0: 50x the last step, at least 120 s).
  void Watch(const char* what, const std::shared_ptr<Job>& also = nullptr);
  void Unwatch();
  // First caller wins: fails `calls` with UNAVAILABLE, marks the worker out of service, tells main.
  void TakeOutOfService(const absl::Status& why, const std::vector<std::shared_ptr<Job>>& calls);
};

}  // namespace tomeserve::server
