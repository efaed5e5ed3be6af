#include "server/phase_clock.h"

#include <algorithm>
#include <utility>

#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace tomeserve::server {
namespace {

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

#ifdef TOMESERVE_HAVE_CUDA
struct PhaseClock::Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  ~Events() {
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
  }
};
struct StepTimer::Event {
  cudaEvent_t event = nullptr;
  ~Event() {
    if (event != nullptr) cudaEventDestroy(event);
  }
};
#else
struct PhaseClock::Events {};
struct StepTimer::Event {};
#endif

PhaseClock::PhaseClock(const c10::Device& device) {
#ifdef TOMESERVE_HAVE_CUDA
  if (device.is_cuda()) {
    auto events = std::make_unique<Events>();
    if (cudaEventCreate(&events->start) == cudaSuccess && cudaEventCreate(&events->stop) == cudaSuccess)
      events_ = std::move(events);
  }
#else
  (void)device;
#endif
}

PhaseClock::~PhaseClock() = default;

void PhaseClock::Start() {
  host_start_ = std::chrono::steady_clock::now();
#ifdef TOMESERVE_HAVE_CUDA
  if (events_) cudaEventRecord(events_->start, c10::cuda::getCurrentCUDAStream().stream());
#endif
}

double PhaseClock::Stop() {
#ifdef TOMESERVE_HAVE_CUDA
  if (events_) {
    float ms = 0;
    if (cudaEventRecord(events_->stop, c10::cuda::getCurrentCUDAStream().stream()) == cudaSuccess &&
        cudaEventSynchronize(events_->stop) == cudaSuccess &&
        cudaEventElapsedTime(&ms, events_->start, events_->stop) == cudaSuccess) {
      return ms / 1000.0;
    }
  }
#endif
  return Since(host_start_);
}

StepTimer::StepTimer(const c10::Device& device, int depth)
    : device_(device), depth_(static_cast<size_t>(std::max(1, depth))), use_events_(device.is_cuda()) {}

StepTimer::~StepTimer() = default;

std::unique_ptr<StepTimer::Event> StepTimer::NewEvent() {
  if (!free_.empty()) {
    std::unique_ptr<Event> e = std::move(free_.back());
    free_.pop_back();
    return e;
  }
  auto e = std::make_unique<Event>();
#ifdef TOMESERVE_HAVE_CUDA
  if (use_events_ && cudaEventCreate(&e->event) != cudaSuccess) {
    use_events_ = false;  // the host clock from here on
    return nullptr;
  }
#endif
  return e;
}

void StepTimer::Begin() {
  host_start_ = std::chrono::steady_clock::now();
  start_ = nullptr;
#ifdef TOMESERVE_HAVE_CUDA
  if (use_events_) {
    start_ = NewEvent();
    if (start_ != nullptr && cudaEventRecord(start_->event, c10::cuda::getCurrentCUDAStream().stream()) != cudaSuccess) {
      start_ = nullptr;
    }
  }
#endif
}

void StepTimer::End(uint64_t tag) {
  Pending p{.tag = tag, .start = std::move(start_), .host_seconds = Since(host_start_)};
#ifdef TOMESERVE_HAVE_CUDA
  if (p.start != nullptr) {
    p.stop = NewEvent();
    if (p.stop != nullptr &&
        cudaEventRecord(p.stop->event, c10::cuda::getCurrentCUDAStream().stream()) != cudaSuccess) {
      p.stop = nullptr;
    }
  }
#endif
  pending_.push_back(std::move(p));
}

bool StepTimer::Read(Pending& p, bool wait, double* seconds) {
  *seconds = p.host_seconds;
#ifdef TOMESERVE_HAVE_CUDA
  if (p.start != nullptr && p.stop != nullptr) {
    const cudaError_t ready = wait ? cudaEventSynchronize(p.stop->event) : cudaEventQuery(p.stop->event);
    if (ready == cudaErrorNotReady) return false;
    float ms = 0;
    if (ready == cudaSuccess && cudaEventElapsedTime(&ms, p.start->event, p.stop->event) == cudaSuccess) {
      *seconds = ms / 1000.0;
    }
    // Otherwise (a device error, reported by the next step's work): the host clock's seconds.
  }
#else
  (void)wait;
#endif
  return true;
}

std::vector<StepTimer::Timed> StepTimer::Take(size_t keep) {
  std::vector<Timed> out;
  while (!pending_.empty()) {
    double seconds = 0;
    if (!Read(pending_.front(), /*wait=*/pending_.size() > keep, &seconds)) break;
    Pending& p = pending_.front();
    out.push_back({.tag = p.tag, .seconds = seconds});
    if (p.start != nullptr) free_.push_back(std::move(p.start));
    if (p.stop != nullptr) free_.push_back(std::move(p.stop));
    pending_.pop_front();
  }
  return out;
}

std::vector<StepTimer::Timed> StepTimer::Collect() { return Take(depth_ - 1); }

std::vector<StepTimer::Timed> StepTimer::Drain() { return Take(0); }

}  // namespace tomeserve::server
