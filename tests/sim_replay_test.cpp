// tomeserve-sim's parts: the cost profile (points, interpolation, the built-in H200 profile), the trace reader's
// errors, and the replay on small traces whose outcome can be computed by hand. Torch-free and deterministic.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "tools/sim/cost_profile.h"
#include "tools/sim/replay.h"

namespace tomeserve::sim {
namespace {

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

// 64x64 pixels (64 latent pixels): 10 ms per step + 1 ms per row, ToMe 0.5 saves 20%; no fixed costs.
ProfileData Flat() {
  return {.name = "flat",
          .native_width = 64,
          .native_height = 64,
          .batch_cost_budget = 1 << 20,
          .steps = {{64, 64, 2, 0.0, 0.012}, {64, 64, 8, 0.0, 0.018}, {64, 64, 2, 0.5, 0.0096}, {64, 64, 8, 0.5, 0.0144}}};
}

TEST(CostProfile, MeasuredPointsAndInterpolation) {
  absl::StatusOr<CostProfile> p = CostProfile::Create(Flat());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_NEAR(p->UNetSeconds(64, 2, 0), 0.012, 1e-12);
  EXPECT_NEAR(p->UNetSeconds(64, 5, 0), 0.015, 1e-12);            // linear in rows
  EXPECT_NEAR(p->UNetSeconds(64, 2, 2 * 0.25), 0.0108, 1e-12);    // linear in the mean ratio
  EXPECT_NEAR(p->UNetSeconds(64, 16, 0), 0.026, 1e-12);           // the last segment extended
  EXPECT_NEAR(p->UNetSeconds(256, 2, 0), 0.012 * std::pow(4.0, 1.2), 1e-9);  // one size: the prior exponent
}

TEST(CostProfile, BuiltinH200MatchesItsCells) {
  absl::StatusOr<CostProfile> p = CostProfile::Load("h200-sd15-fp16");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_NEAR(p->UNetSeconds(64 * 64, 2, 0), 0.0139, 1e-12);           // sd15 UNet batch 1, 512², ratio 0
  EXPECT_NEAR(p->UNetSeconds(128 * 128, 8, 8 * 0.5), 0.1092, 1e-12);   // batch 4, 1024², ratio 0.5
  EXPECT_NEAR(*p->StepSeconds("m", 64 * 64, 2, 0), 0.0139 + 0.029, 1e-12);  // plus the served overhead
  const double mid = p->UNetSeconds(96 * 96, 8, 0);                    // 768² measured: 66.9 ms
  EXPECT_NEAR(mid, 0.0669, 1e-12);
  const double between = p->UNetSeconds(80 * 80, 8, 0);                // 640²: between 512² and 768²
  EXPECT_GT(between, 0.0286);
  EXPECT_LT(between, 0.0669);
  EXPECT_NEAR(p->FixedSeconds("m", 64 * 64, 4), 0.0487 + 4 * 0.0103, 1e-12);
}

TEST(CostProfile, ErrorsNameWhatIsWrong) {
  EXPECT_NE(CostProfile::Load("no-such-profile").status().message().find("h200-sd15-fp16"), std::string::npos);
  ProfileData d = Flat();
  d.steps = {{64, 64, 2, 0.5, 0.01}};
  EXPECT_NE(CostProfile::Create(d).status().message().find("ratio 0"), std::string::npos);
  const std::string bad = WriteFile("bad_profile.json", R"({"step": [{"width": 64}]})");
  EXPECT_NE(CostProfile::Load(bad).status().message().find(bad), std::string::npos);
  // A profile survives its JSON form.
  absl::StatusOr<ProfileData> back = ParseProfile(ProfileJson(Flat()), "round trip");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->steps.size(), 4u);
  EXPECT_EQ(back->batch_cost_budget, 1 << 20);
}

TEST(Trace, ErrorsNameTheLineAndField) {
  const std::string good = R"({"t": 0, "width": 64, "height": 64, "steps": 4, "scheduler": "ddim", "guidance": 7.5, "num_images": 1, "ratio": 0, "seed": 1, "prompt": "a"})";
  ASSERT_TRUE(ReadTrace(WriteFile("good.jsonl", good + "\n")).ok());
  absl::StatusOr<std::vector<TraceCall>> bad =
      ReadTrace(WriteFile("bad.jsonl", good + "\n" + R"({"t": 1, "width": 64, "height": 64, "steps": 4, "scheduler": "lms", "guidance": 7.5, "num_images": 1, "ratio": 0, "seed": 1, "prompt": "b"})" + "\n"));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(":2: scheduler is \"lms\""), std::string::npos) << bad.status();
  absl::StatusOr<std::vector<TraceCall>> missing = ReadTrace(WriteFile("missing.jsonl", R"({"t": 0})" "\n"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find(":1:"), std::string::npos) << missing.status();
}

TraceCall Call(double t, int steps, int images = 1) {
  return {.t = t, .width = 64, .height = 64, .steps = steps, .scheduler = "ddim", .num_images = images};
}

TEST(Replay, AloneACallTakesItsUnloadedLatency) {
  const CostProfile p = *CostProfile::Create(Flat());
  const ReplayResult r = Replay({Call(0, 10)}, p, {});
  ASSERT_TRUE(r.calls[0].completed);
  EXPECT_NEAR(r.calls[0].finish - r.calls[0].arrival, 10 * 0.012, 1e-9);
  EXPECT_NEAR(r.calls[0].solo_seconds, 10 * 0.012, 1e-9);
  EXPECT_EQ(r.unet_calls, 10);
}

TEST(Replay, StepModeJoinsAtTheNextBoundaryRequestModeWaits) {
  // Two calls, the second just before the first's 6th step. Rows are nearly free here, so step mode joins it at
  // that boundary (2 + 2 = 4 rows: 14 ms per step); request mode runs them one after the other (different keys).
  const CostProfile p = *CostProfile::Create(Flat());
  const std::vector<TraceCall> trace = {Call(0, 20), Call(5 * 0.012 - 1e-6, 10)};
  const ReplayResult step = Replay(trace, p, {});
  ASSERT_TRUE(step.calls[1].completed);
  EXPECT_NEAR(step.calls[1].finish - step.calls[1].arrival, 10 * 0.014, 1e-5);
  ReplayOptions request_options{.policy = {.mode = server::BatchingMode::kRequest, .max_queue_delay_seconds = 0}};
  const ReplayResult request = Replay(trace, p, request_options);
  EXPECT_NEAR(request.calls[1].finish, 20 * 0.012 + 10 * 0.012, 1e-9);
  EXPECT_GT(static_cast<double>(step.unet_rows) / step.unet_calls,
            static_cast<double>(request.unet_rows) / request.unet_calls);
}

TEST(Replay, TwoWorkersRunTwoCallsAtOnceAndTheQueueBoundRefuses) {
  const CostProfile p = *CostProfile::Create(Flat());
  const std::vector<TraceCall> trace = {Call(0, 10), Call(0, 10), Call(0, 10)};
  ReplayOptions two{.policy = {.max_batch_images = 1}, .workers = 2};
  const ReplayResult r = Replay(trace, p, two);
  EXPECT_NEAR(r.calls[0].finish, 0.12, 1e-9);
  EXPECT_NEAR(r.calls[1].finish, 0.12, 1e-9);
  EXPECT_NEAR(r.calls[2].finish, 0.24, 1e-9);
  ReplayOptions bounded{.policy = {.max_batch_images = 1}, .max_queue_size = 1};
  const ReplayResult b = Replay(trace, p, bounded);
  // All three arrive at once: the first fills the one queue place, the others are refused.
  EXPECT_TRUE(b.calls[0].completed);
  EXPECT_TRUE(b.calls[1].refused && b.calls[2].refused);
}

TEST(Replay, TheControllerRaisesTheRatioToMeetATarget) {
  // Alone at ratio 0: 10 x 12 ms = 0.12 s; the target 0.9 x that needs ToMe (ratio 0.5 makes it 0.096 s).
  const CostProfile p = *CostProfile::Create(Flat());
  TraceCall c = Call(0, 10);
  c.max_ratio = 0.5;
  c.slo_x = 0.9;
  const ReplayResult r = Replay({c}, p, {.slo = true});
  EXPECT_NEAR(r.calls[0].target_seconds, 0.108, 1e-9);
  EXPECT_GT(r.calls[0].ratio, 0.0);
  EXPECT_LE(r.calls[0].finish - r.calls[0].arrival, r.calls[0].target_seconds + 1e-9);
}

TEST(Replay, CountsCudaGraphLayoutsAsTheServerKeepsThem) {
  // The join above: one call of 20 steps (guided: 2 rows), a second of 10 joining after the first's 5th:
  // layouts "1 pair" (the first alone: steps 1-5 and 16-20) and "2 pairs" (the 10 shared steps, bucket 4).
  const CostProfile p = *CostProfile::Create(Flat());
  TraceCall first = Call(0, 20), second = Call(5 * 0.012 - 1e-6, 10);
  ReplayOptions o{.graphs = true};
  const ReplayResult r = Replay({first, second}, p, o);
  ASSERT_TRUE(r.calls[1].completed);
  EXPECT_EQ(r.unet_calls, 20);
  EXPECT_EQ(r.graphs.layouts, 2);
  EXPECT_EQ(r.graphs.captures, 2);
  // Each layout: one eager first call and one capture, the rest replays.
  EXPECT_EQ(r.graphs.replays, r.unet_calls - 4);
  EXPECT_EQ(r.graph_padded_rows, 0);  // 2 and 4 rows are buckets
  // Another ratio for the second call is another layout for the shared steps; an unguided image pads 3 -> 4.
  second.ratio = 0.5;
  second.guidance = 1.0;
  const ReplayResult mixed = Replay({first, second}, p, o);
  EXPECT_EQ(mixed.graphs.layouts, 2);
  EXPECT_GT(mixed.graph_padded_rows, 0);
  // Without graphs (a CPU profile), nothing is counted.
  EXPECT_EQ(Replay({first, second}, p, {}).graphs.layouts, 0);
}

}  // namespace
}  // namespace tomeserve::sim
