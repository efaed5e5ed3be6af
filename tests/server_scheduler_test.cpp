// server::Scheduler (the queue, its bound, cancelled and expired jobs, positions, Stop, and the policy's choices
// handed to the worker that asks) and the step-time model. The policy's own decisions are pinned in
// batching_policy_test.cpp.
// Deterministic: the test plays the worker and calls Admit() itself with the running batch it describes, so
// no assertion depends on thread timing. Waits have a generous limit only so a bug fails instead of hanging.
#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "server/scheduler.h"
#include "server/step_time_model.h"

namespace tomeserve::server {
namespace {

constexpr absl::Duration kWait = absl::Seconds(30);

class RecordingObserver : public JobObserver {
 public:
  void OnQueued(const QueuedInfo& info) override {
    absl::MutexLock lock(&mu_);
    positions_.push_back(info.position);
    last_ = info;
  }
  void OnDone(const absl::StatusOr<GenerationResult>& result) override {
    status_ = result.status();
    done_.Notify();
  }
  absl::Status WaitDone() {
    EXPECT_TRUE(done_.WaitForNotificationWithTimeout(kWait));
    return status_;
  }
  bool done() const { return done_.HasBeenNotified(); }
  std::vector<int> positions() {
    absl::MutexLock lock(&mu_);
    return positions_;
  }
  QueuedInfo last() {
    absl::MutexLock lock(&mu_);
    return last_;
  }

 private:
  absl::Mutex mu_;
  std::vector<int> positions_;
  QueuedInfo last_;
  absl::Status status_;
  absl::Notification done_;
};

struct JobSpec {
  std::string model = "m";
  int width = 64, height = 64;
  int images = 1;
  int steps = 2;
  double ratio = 0;
  double guidance = 7.5;
  absl::Time deadline = absl::InfiniteFuture();
  double max_ratio = 0, target = 0;
};

class SchedulerTest : public ::testing::Test {
 protected:
  // The scheduler finishes what is still queued (observers must outlive that).
  void TearDown() override {
    if (scheduler_) scheduler_->Stop();
  }
  void Start(SchedulerOptions options, const StepTimeModel* model = nullptr) {
    scheduler_ = std::make_unique<Scheduler>(options, model);
  }
  std::shared_ptr<Job> Make(const JobSpec& s) {
    GenerationRequest r;
    r.request_id = absl::StrCat("job-", jobs_.size());
    r.key = BatchKey{.model = s.model, .width = s.width, .height = s.height, .steps = s.steps};
    r.tome.ratio = s.ratio;
    r.key.tome = tome::Canonical(r.tome);
    r.num_images = s.images;
    r.guidance_scale = s.guidance;
    r.tome_max_ratio = s.max_ratio;
    r.latency_target_seconds = s.target;
    observers_.push_back(std::make_unique<RecordingObserver>());
    auto job = std::make_shared<Job>(r, s.deadline, observers_.back().get());
    jobs_.push_back(job);
    return job;
  }
  std::shared_ptr<Job> Enqueue(const JobSpec& s) {
    auto job = Make(s);
    EXPECT_TRUE(scheduler_->Enqueue(job).ok());
    return job;
  }
  // Ids ("job-N") of what Admit hands out.
  std::vector<std::string> Ids(const std::vector<AdmittedCall>& calls) {
    std::vector<std::string> out;
    for (const auto& c : calls) out.push_back(c.job->request().request_id);
    return out;
  }
  // A worker running `calls` (none started a step yet), without step costs unless `cost` is given.
  static WorkerView Running(const std::vector<AdmittedCall>& calls, int max_images = 8, int64_t budget = 1 << 30,
                            const StepCost* cost = nullptr) {
    WorkerView v{.cost = cost, .max_images = max_images, .budget = budget};
    for (const auto& c : calls) v.running.push_back({.call = c.call, .ratio = c.call.ratio, .calls_left = c.call.unet_calls});
    return v;
  }
  RecordingObserver& observer(int job) { return *observers_.at(job); }

  // Outlives the scheduler's housekeeping thread, which reads it until Stop() in TearDown (a model local to a test
  // body was destroyed while that thread still predicted from it: found by TSan).
  StepTimeModel model_;
  std::unique_ptr<Scheduler> scheduler_;
  std::vector<std::unique_ptr<RecordingObserver>> observers_;
  std::vector<std::shared_ptr<Job>> jobs_;
};

TEST_F(SchedulerTest, StepModeAdmitsAnySettingsOfTheRunningSizeUpToTheCaps) {
  Start({.mode = BatchingMode::kStep, .max_batch_images = 4});
  Enqueue({.steps = 50});
  auto first = scheduler_->Admit(Running({}));  // idle: the oldest starts at once, whatever the delay
  EXPECT_EQ(Ids(first), std::vector<std::string>{"job-0"});
  // Different steps, ratios, guidance: all join the running batch at the next step boundary.
  Enqueue({.steps = 6, .ratio = 0.5});
  Enqueue({.images = 2, .steps = 20, .ratio = 0.3, .guidance = 1.0});
  Enqueue({.images = 2});  // would make 5 images: waits
  Enqueue({.steps = 3});   // fits, but waits behind the older job (oldest first within a size)
  auto joined = scheduler_->Admit(Running(first, 4));
  EXPECT_EQ(Ids(joined), (std::vector<std::string>{"job-1", "job-2"}));
  std::vector<AdmittedCall> running = first;
  running.insert(running.end(), joined.begin(), joined.end());
  EXPECT_TRUE(scheduler_->Admit(Running(running, 4)).empty());
  EXPECT_EQ(scheduler_->queue_depth(), 2);
  // The cost budget (rows x latent pixels; a guided 64x64 image is 2 x 64 = 128) binds before the image cap.
  EXPECT_TRUE(scheduler_->Admit(Running(first, 8, /*budget=*/2 * 128)).empty());
  EXPECT_EQ(Ids(scheduler_->Admit(Running(first, 8, /*budget=*/3 * 128))), std::vector<std::string>{"job-3"});
  // A job larger than the whole budget runs alone on an idle worker.
  EXPECT_EQ(Ids(scheduler_->Admit(Running({}, 8, /*budget=*/1))), std::vector<std::string>{"job-4"});
}

TEST_F(SchedulerTest, StepModeSizesTakeTurnsOldestFirst) {
  Start({.mode = BatchingMode::kStep});
  Enqueue({.width = 64});                       // job-0: starts the 64x64 batch
  auto running = scheduler_->Admit(Running({}));
  Enqueue({.width = 64});                       // job-1: joins
  Enqueue({.width = 128});                      // job-2: another size, waits for an idle worker
  Enqueue({.width = 64});                       // job-3: queued after job-2: must not jump it
  EXPECT_EQ(Ids(scheduler_->Admit(Running(running))), std::vector<std::string>{"job-1"});
  EXPECT_TRUE(scheduler_->Admit(Running(running)).empty());
  // The 64x64 batch drained: the oldest queued job (128 wide) starts next, then 64 again.
  EXPECT_EQ(Ids(scheduler_->Admit(Running({}))), std::vector<std::string>{"job-2"});
  EXPECT_EQ(Ids(scheduler_->Admit(Running({}))), std::vector<std::string>{"job-3"});
}

TEST_F(SchedulerTest, RequestModeTakesOneKeyOnlyWhenIdle) {
  Start({.mode = BatchingMode::kRequest, .max_batch_images = 3, .max_queue_delay = absl::ZeroDuration()});
  Enqueue({.ratio = 0.5});
  Enqueue({.ratio = 0.3});
  Enqueue({.images = 2, .ratio = 0.5});
  Enqueue({.ratio = 0.5});
  auto batch = scheduler_->Admit(Running({}));
  EXPECT_EQ(Ids(batch), (std::vector<std::string>{"job-0", "job-2"}));  // one key, at most 3 images
  EXPECT_TRUE(scheduler_->Admit(Running(batch)).empty());                // nothing joins a running batch
  EXPECT_EQ(Ids(scheduler_->Admit(Running({}))), std::vector<std::string>{"job-1"});
  EXPECT_EQ(Ids(scheduler_->Admit(Running({}))), std::vector<std::string>{"job-3"});
}

TEST_F(SchedulerTest, RequestModeWaitsForBatchMatesUntilTheDelay) {
  Start({.mode = BatchingMode::kRequest, .max_batch_images = 2, .max_queue_delay = absl::Hours(1)});
  Enqueue({});
  std::vector<AdmittedCall> got;
  absl::Notification admitted;
  std::thread worker([&] {
    got = scheduler_->Admit(Running({}));  // blocks: one image of two, the delay is an hour
    admitted.Notify();
  });
  EXPECT_FALSE(admitted.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
  Enqueue({});  // the batch is full: it leaves at once
  EXPECT_TRUE(admitted.WaitForNotificationWithTimeout(kWait));
  worker.join();
  EXPECT_EQ(got.size(), 2u);
}

TEST_F(SchedulerTest, QueueBoundStopAndIdleWorkersWakeOnStop) {
  Start({.max_queue_size = 2});
  Enqueue({});
  Enqueue({});
  auto full = scheduler_->Enqueue(Make({}));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("max-queue-size"), std::string::npos);
  scheduler_->Stop();
  EXPECT_EQ(observer(0).WaitDone().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(observer(1).WaitDone().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(scheduler_->Enqueue(Make({})).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(scheduler_->stopped());
  EXPECT_TRUE(scheduler_->Admit(Running({})).empty());  // returns at once
}

TEST_F(SchedulerTest, IdleAdmitBlocksUntilWorkArrivesOrStop) {
  Start({});
  absl::Notification returned;
  std::vector<AdmittedCall> got;
  std::thread worker([&] {
    got = scheduler_->Admit(Running({}));
    returned.Notify();
  });
  EXPECT_FALSE(returned.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
  Enqueue({});
  EXPECT_TRUE(returned.WaitForNotificationWithTimeout(kWait));
  worker.join();
  EXPECT_EQ(got.size(), 1u);
  std::thread idle([&] { EXPECT_TRUE(scheduler_->Admit(Running({})).empty()); });
  scheduler_->Stop();
  idle.join();
}

TEST_F(SchedulerTest, CancelledAndExpiredQueuedJobsNeverStart) {
  Start({});
  auto cancelled = Enqueue({});
  Enqueue({.deadline = absl::Now() - absl::Seconds(1)});
  Enqueue({});
  cancelled->Cancel();
  scheduler_->Wake();
  EXPECT_EQ(observer(0).WaitDone().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(observer(1).WaitDone().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(Ids(scheduler_->Admit(Running({}))), std::vector<std::string>{"job-2"});
}

TEST_F(SchedulerTest, PositionsAndEstimatesAreReported) {
  for (int i = 0; i < 20; ++i) model_.Observe("m", 64, 2, 0, 0.01);  // 10 ms per 2-row step at 64x64
  Start({}, &model_);
  Enqueue({.steps = 10});
  Enqueue({.steps = 10});
  // The housekeeping thread reports each job's position once; the second has 11 UNet calls (PNDM) ahead.
  for (int i = 0; i < 3000 && observer(1).positions().empty(); ++i) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(observer(0).positions(), std::vector<int>{0});
  EXPECT_EQ(observer(1).positions(), std::vector<int>{1});
  EXPECT_NEAR(observer(1).last().estimated_start_seconds, 0.11, 0.01);
  EXPECT_NEAR(observer(1).last().estimated_finish_seconds, 0.22, 0.02);
}

// ---- step-time model ----

TEST(StepTimeModel, FitsRowsAndRatioAndBorrowsAcrossSizes) {
  StepTimeModel model;
  EXPECT_FALSE(model.StepSeconds("m", 64, 2, 0).has_value());
  // seconds = 0.02 + 0.01 * rows - 0.008 * tome_rows at 4096 latent pixels.
  for (int i = 0; i < 200; ++i) {
    const int rows = 1 + i % 8;
    const double ratio = (i / 8) % 4 * 0.2;
    model.Observe("m", 4096, rows, rows * ratio, 0.02 + 0.01 * rows - 0.008 * rows * ratio);
  }
  EXPECT_NEAR(*model.StepSeconds("m", 4096, 4, 0), 0.06, 0.002);
  EXPECT_NEAR(*model.StepSeconds("m", 4096, 4, 4 * 0.5), 0.044, 0.002);
  // Another size with one size seen: the prior power law in pixels.
  EXPECT_NEAR(*model.StepSeconds("m", 8192, 4, 0), 0.06 * std::pow(2.0, kSizeExponent), 0.005);
  // Another model learns apart.
  EXPECT_FALSE(model.StepSeconds("other", 4096, 4, 0).has_value());
  // Two sizes seen: the power law through them (here cost ~ pixels^2), between and beyond.
  for (int i = 0; i < 50; ++i) model.Observe("m", 1024, 4, 0, 0.06 / 16);
  EXPECT_NEAR(*model.StepSeconds("m", 2048, 4, 0), 0.06 / 4, 0.002);
  EXPECT_NEAR(*model.StepSeconds("m", 8192, 4, 0), 0.06 * 4, 0.02);
  EXPECT_EQ(model.observations(), 250);
}

TEST(StepTimeModel, FixedCostsPerImage) {
  StepTimeModel model;
  EXPECT_EQ(model.FixedSeconds("m", 4096, 2), 0.0);
  for (int i = 0; i < 30; ++i) model.ObserveFixed("m", 4096, 2, 0.2);  // 0.1 s per image
  EXPECT_NEAR(model.FixedSeconds("m", 4096, 3), 0.3, 1e-6);
}

TEST_F(SchedulerTest, DeadlineThatCannotBeMetIsRefusedAtAdmission) {
  for (int i = 0; i < 20; ++i) model_.Observe("m", 64, 2, 0, 0.5);
  Start({}, &model_);
  Enqueue({.steps = 100, .deadline = absl::Now() + absl::Seconds(5)});  // needs ~50 s
  Enqueue({.steps = 2, .deadline = absl::Now() + absl::Seconds(60)});
  EXPECT_EQ(Ids(scheduler_->Admit(Running({}, 8, 1 << 30, &model_))), std::vector<std::string>{"job-1"});
  const absl::Status refused = observer(0).WaitDone();
  EXPECT_EQ(refused.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(refused.message().find("refused at admission"), std::string::npos) << refused;
}

}  // namespace
}  // namespace tomeserve::server
