// StepTimer (server/phase_clock.h): denoising steps timed without making the host wait. On the CPU each step's
// time is the host clock's and known at once, in order. On a CUDA device (_CUDA): a step whose work is still
// running is not waited for while the ring has room, its time arrives at a later Collect, and a full ring waits
// for the oldest step only.
#include "server/phase_clock.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <chrono>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace tomeserve::server {
namespace {

TEST(StepTimerTest, CpuStepsAreTimedAtOnceInOrder) {
  StepTimer timer(c10::Device(c10::kCPU), 3);
  for (uint64_t tag : {7u, 8u}) {
    timer.Begin();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    timer.End(tag);
  }
  const std::vector<StepTimer::Timed> timed = timer.Collect();
  ASSERT_EQ(timed.size(), 2u);
  EXPECT_EQ(timed[0].tag, 7u);
  EXPECT_EQ(timed[1].tag, 8u);
  for (const StepTimer::Timed& t : timed) EXPECT_GE(t.seconds, 0.015);
  EXPECT_EQ(timer.pending(), 0u);
  EXPECT_TRUE(timer.Drain().empty());
}

TEST(StepTimerTest, StepsAreTimedOnTheDeviceWithoutWaiting_CUDA) {
#ifndef TOMESERVE_HAVE_CUDA
  GTEST_SKIP() << "built without c10_cuda";
#else
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  c10::InferenceMode inference;
  c10::cuda::CUDAStreamGuard stream(c10::cuda::getStreamFromPool(false, 0));
  const at::Tensor a = at::randn({4096, 4096}, at::TensorOptions().device(at::kCUDA));
  // Enough queued work that the host is done long before the device.
  const auto slow_step = [&] {
    at::Tensor x = a;
    for (int i = 0; i < 40; ++i) x = at::mm(x, a).tanh_();
    return x;
  };
  slow_step();
  c10::cuda::getCurrentCUDAStream().synchronize();

  StepTimer timer(c10::Device(c10::kCUDA, 0), 2);
  const auto host_start = std::chrono::steady_clock::now();
  timer.Begin();
  slow_step();
  timer.End(1);
  EXPECT_TRUE(timer.Collect().empty());  // still running: not waited for
  const double host_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - host_start).count();
  EXPECT_EQ(timer.pending(), 1u);
  timer.Begin();
  slow_step();
  timer.End(2);
  // The ring (depth 2) is full: the oldest is waited for; the newest may still run.
  const std::vector<StepTimer::Timed> first = timer.Collect();
  ASSERT_GE(first.size(), 1u);
  EXPECT_EQ(first[0].tag, 1u);
  EXPECT_GT(first[0].seconds, host_seconds);  // device time, longer than the host took to queue it
  std::vector<StepTimer::Timed> rest = timer.Drain();
  if (first.size() == 1) {
    ASSERT_EQ(rest.size(), 1u);
    EXPECT_EQ(rest[0].tag, 2u);
    // The second step's start event completed when the device reached it: its own time, not the wait behind
    // the first step.
    EXPECT_LT(rest[0].seconds, 1.5 * first[0].seconds);
    EXPECT_GT(rest[0].seconds, 0.5 * first[0].seconds);
  }
  EXPECT_EQ(timer.pending(), 0u);
#endif
}

}  // namespace
}  // namespace tomeserve::server
