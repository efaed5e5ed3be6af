// Device time of the worker's phases. Created and used on one worker thread (CUDA events belong to that
// thread's current device and are recorded on its current stream).
//
// PhaseClock: seconds of the work queued between Start() and Stop(), which waits for it (text encoding and
// decoding, whose results the host needs anyway). StepTimer: the denoising steps' seconds without making the
// host wait, so the CPU queues the next step while the device runs this one.
#pragma once

#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

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

// Each step's seconds from two CUDA events recorded around its queued work: the start event completes when the
// device reaches the step (after the previous one, or when the host queued it if the device was idle), so a
// step's time is its device time plus any wait for the host's launches inside it — what the next step waits
// for. The events are read at a later boundary once the device has passed them: a ring of at most `depth`
// pending steps; when it is full, Collect waits for the oldest, so the host runs at most `depth` steps ahead.
// On the CPU (or when events cannot be created) a step's time is the host clock's and known at End().
class StepTimer {
 public:
  struct Timed {
    uint64_t tag;  // End()'s
    double seconds;
  };

  StepTimer(const c10::Device& device, int depth);
  ~StepTimer();
  StepTimer(const StepTimer&) = delete;
  StepTimer& operator=(const StepTimer&) = delete;

  // Before the step's work is queued.
  void Begin();
  // After it; `tag` names the step for Collect.
  void End(uint64_t tag);
  // The steps whose times are known, oldest first; waits for the oldest while `depth` or more are pending.
  std::vector<Timed> Collect();
  // Every pending step's time (waits for the device).
  std::vector<Timed> Drain();
  size_t pending() const { return pending_.size(); }

 private:
  struct Event;  // a CUDA event, or nothing on the CPU
  struct Pending {
    uint64_t tag;
    std::unique_ptr<Event> start, stop;
    double host_seconds;  // the CPU's answer
  };
  std::unique_ptr<Event> NewEvent();
  // The seconds of `p` when its events completed (or `wait`: after waiting for them); false if not yet.
  bool Read(Pending& p, bool wait, double* seconds);
  std::vector<Timed> Take(size_t keep);

  const c10::Device device_;
  const size_t depth_;
  bool use_events_;
  std::unique_ptr<Event> start_;  // Begin()'s, until End()
  std::chrono::steady_clock::time_point host_start_;
  std::deque<Pending> pending_;
  std::vector<std::unique_ptr<Event>> free_;  // recycled events
};

}  // namespace tomeserve::server
