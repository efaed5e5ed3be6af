// How many UNet calls one sample makes: what the schedulers build (scheduler_pndm.cpp's PLMS order repeats the
// second-to-last timestep), for callers that estimate work before a schedule exists (the batching policy's
// queued calls, tomeserve-sim). Pinned against the real schedules in tests/scheduler_test.cpp. Torch-free.
#pragma once

#include "pipeline/scheduler_config.h"

namespace tomeserve::pipeline {

inline int UNetCallsPerSample(SchedulerKind kind, int steps) {
  return steps + (kind == SchedulerKind::kPndm && steps >= 2 ? 1 : 0);
}

}  // namespace tomeserve::pipeline
