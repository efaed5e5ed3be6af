// A gtest suite sharing one tiny-preset StableDiffusion (TOMESERVE_TINY_MODEL, CPU fp32), loaded once per suite and
// skipped when the variable is unset; and Token Merging hooks from settings. For the pipeline-level tests
// (step_batch_test, unet_graphs_test).
#pragma once

#include <memory>
#include <utility>

#include "gtest/gtest.h"
#include "pipeline/stable_diffusion.h"
#include "tests/test_util.h"
#include "tome/tome_hooks.h"

namespace tomeserve::test {

class TinyModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (EnvPath("TOMESERVE_TINY_MODEL").empty()) return;
    auto sd = pipeline::StableDiffusion::Create({EnvPath("TOMESERVE_TINY_MODEL"), {}});
    ASSERT_TRUE(sd.ok()) << sd.status();
    sd_ = std::move(*sd).release();
  }
  static void TearDownTestSuite() {
    delete sd_;
    sd_ = nullptr;
  }
  void SetUp() override {
    if (sd_ == nullptr) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  }
  static inline pipeline::StableDiffusion* sd_ = nullptr;
};

inline std::shared_ptr<tome::TokenMergingHooks> Hooks(const tome::TokenMerging& t) {
  auto h = tome::TokenMergingHooks::Create(t);
  EXPECT_TRUE(h.ok()) << h.status();
  return h.ok() ? *h : nullptr;
}

}  // namespace tomeserve::test
