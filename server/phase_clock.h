// Seconds of the work queued on the worker's stream between Start() and Stop(): CUDA events on a CUDA device
// (device time, so queued UNet work is not charged to a later phase; Stop() waits for the work), the host clock
// on the CPU. Created and used on one worker thread (its events belong to that thread's current device).
#pragma once

#include <c10/core/Device.h>

#include <chrono>
#include <memory>

namespace tomeserve::server {

class PhaseClock {
 public:
  explicit PhaseClock(const c10::Device& device);
  ~PhaseClock();
  PhaseClock(const PhaseClock&) = delete;
  PhaseClock& operator=(const PhaseClock&) = delete;

  void Start();
  double Stop();

 private:
  struct Events;  // CUDA events when the device is a CUDA device
  std::unique_ptr<Events> events_;
  std::chrono::steady_clock::time_point host_start_;
};

}  // namespace tomeserve::server
