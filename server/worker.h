// Device workers: one thread per device owning that device's model replicas (one StableDiffusion per served
// model). A worker takes batches from the shared BatchQueue and runs each step by step through DenoiseBatch:
// progress events after every step; a cancelled call or expired deadline is finished at the next step
// boundary and its samples leave the batch (the others continue); an out-of-memory error (real, or injected
// for tests with --inject-oom-above-batch; told apart from other errors by pipeline::IsOutOfMemory) frees the
// CUDA cache, splits the batch in halves and retries, and a single image that still does not fit fails its
// call with RESOURCE_EXHAUSTED. Every OOM is counted.
//
// This header is torch-free (the pipeline lives behind Impl in worker.cpp, the only server TU that includes
// torch headers), so main and the service compile without torch.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/batcher.h"
#include "server/metrics.h"
#include "server/model_catalog.h"
#include "server/options.h"

namespace tomeserve::server {

// Batches from the batcher thread to the worker threads. Holds at most one batch per free slot (the batcher
// only dispatches when a slot is free). Thread-safe.
class BatchQueue {
 public:
  void Push(Batch batch);
  // Blocks until a batch is available (returns it) or the queue is closed and empty (returns nullopt).
  std::optional<Batch> Pop();
  void Close();

 private:
  absl::Mutex mu_;
  std::deque<Batch> batches_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

// "auto" -> every CUDA device ("cuda:0", ...) or {"cpu"}; "cpu"; "cuda:0,cuda:1". Checks that devices exist.
absl::StatusOr<std::vector<std::string>> ResolveDevices(const std::string& spec);

struct WorkerOptions {
  std::string device;  // "cpu", "cuda:0", ...
  std::string dtype;   // "auto", "fp32", "fp16", "bf16"
  std::vector<ModelSpec> models;
  // -1: off; N >= 0: UNet batches of more than N images fail with an injected OOM (never the warm-up).
  int inject_oom_above_batch = -1;
  int warmup_steps = 2;
  // Polled between warm-up steps (any thread's signal): true stops the warm-up early (the server is exiting).
  std::function<bool()> stop_warmup;
};

class Worker {
 public:
  // Loads every model onto the device and runs one small warm-up generation per model. Slow. Errors name the
  // model folder.
  static absl::StatusOr<std::unique_ptr<Worker>> Create(const WorkerOptions& options, Metrics* metrics);
  ~Worker();  // Join()s

  // Torch-free descriptions of this worker's models; their tokenizers live as long as the worker.
  std::vector<ModelDescription> Describe() const;

  // Starts the thread: it pops batches from `queue` until it is closed, calling `on_batch_done` after each
  // (the batcher's Release). Every job of a popped batch is finished by this worker.
  void Start(BatchQueue* queue, std::function<void()> on_batch_done);
  void Join();

  struct Impl;

 private:
  explicit Worker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
};

}  // namespace tomeserve::server
