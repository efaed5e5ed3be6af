#include "server/phase_clock.h"

#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace tomeserve::server {

#ifdef TOMESERVE_HAVE_CUDA
struct PhaseClock::Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  ~Events() {
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
  }
};
#else
struct PhaseClock::Events {};
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
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - host_start_).count();
}

}  // namespace tomeserve::server
