// server::Batcher: key grouping, the image limit, FIFO across keys, the queue bound, cancelled and expired
// jobs, queue positions, Stop. Deterministic without timing assertions: every test first occupies the single
// worker slot with a job, queues the jobs under test while the slot is busy, then frees the slot (Release)
// and looks at the batch formed from the queue as it stood. Waits have a generous limit only so a bug fails
// instead of hanging.
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "server/batcher.h"

namespace tomeserve::server {
namespace {

constexpr absl::Duration kWait = absl::Seconds(30);

class RecordingObserver : public JobObserver {
 public:
  void OnQueued(int position) override {
    absl::MutexLock lock(&mu_);
    positions_.push_back(position);
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

 private:
  absl::Mutex mu_;
  std::vector<int> positions_;
  absl::Status status_;
  absl::Notification done_;
};

class BatcherTest : public ::testing::Test {
 protected:
  void Start(BatcherOptions options) {
    options.num_slots = 1;
    options.max_queue_delay = absl::ZeroDuration();
    batcher_ = std::make_unique<Batcher>(options, [this](Batch b) {
      absl::MutexLock lock(&mu_);
      batches_.push_back(std::move(b));
    });
    // Occupy the only slot.
    ASSERT_TRUE(Enqueue("busy", 1).ok());
    Batch busy = NextBatch();
    ASSERT_EQ(busy.jobs.size(), 1u);
  }

  std::shared_ptr<Job> MakeJob(const std::string& model, int images,
                               absl::Time deadline = absl::InfiniteFuture()) {
    GenerationRequest r;
    r.request_id = absl::StrCat(model, "-", jobs_.size());
    r.key = BatchKey{.model = model, .width = 64, .height = 64, .steps = 2};
    r.num_images = images;
    observers_.push_back(std::make_unique<RecordingObserver>());
    auto job = std::make_shared<Job>(r, deadline, observers_.back().get());
    jobs_.push_back(job);
    return job;
  }
  absl::Status Enqueue(const std::string& model, int images, absl::Time deadline = absl::InfiniteFuture()) {
    return batcher_->Enqueue(MakeJob(model, images, deadline));
  }
  RecordingObserver& observer(int job) { return *observers_.at(job); }

  Batch NextBatch() {
    absl::MutexLock lock(&mu_);
    EXPECT_TRUE(mu_.AwaitWithTimeout(absl::Condition(
                                         +[](std::deque<Batch>* b) { return !b->empty(); }, &batches_),
                                     kWait));
    if (batches_.empty()) return {};
    Batch b = std::move(batches_.front());
    batches_.pop_front();
    return b;
  }
  // Frees the slot and returns the batch formed next.
  Batch ReleaseAndTake() {
    batcher_->Release();
    return NextBatch();
  }
  static std::vector<std::string> Ids(const Batch& b) {
    std::vector<std::string> ids;
    for (const auto& j : b.jobs) ids.push_back(j->request().request_id);
    return ids;
  }

  absl::Mutex mu_;
  std::deque<Batch> batches_;
  std::vector<std::unique_ptr<RecordingObserver>> observers_;
  std::vector<std::shared_ptr<Job>> jobs_;
  std::unique_ptr<Batcher> batcher_;
};

using IdList = std::vector<std::string>;

TEST_F(BatcherTest, GroupsJobsByKey) {
  Start({.max_batch_images = 8});
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-1
  ASSERT_TRUE(Enqueue("b", 1).ok());  // b-2
  ASSERT_TRUE(Enqueue("a", 2).ok());  // a-3
  Batch first = ReleaseAndTake();
  EXPECT_EQ(Ids(first), (IdList{"a-1", "a-3"}));
  EXPECT_EQ(first.num_images(), 3);
  EXPECT_EQ(first.key.model, "a");
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"b-2"}));
}

TEST_F(BatcherTest, DifferentTomeSettingsAreNotMixed) {
  Start({.max_batch_images = 8});
  auto half = MakeJob("m", 1);
  GenerationRequest r = half->request();
  r.key.tome.ratio = 0.3;
  r.request_id = "m-0.3";
  auto other = std::make_shared<Job>(r, absl::InfiniteFuture(), &observer(1));
  ASSERT_TRUE(batcher_->Enqueue(half).ok());
  ASSERT_TRUE(batcher_->Enqueue(other).ok());
  EXPECT_EQ(ReleaseAndTake().jobs.size(), 1u);
  EXPECT_EQ(ReleaseAndTake().jobs.size(), 1u);
}

TEST_F(BatcherTest, BatchHoldsAtMostMaxImages) {
  Start({.max_batch_images = 4});
  ASSERT_TRUE(Enqueue("a", 2).ok());  // a-1
  ASSERT_TRUE(Enqueue("a", 3).ok());  // a-2: does not fit after a-1
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-3: fits
  ASSERT_TRUE(Enqueue("a", 2).ok());  // a-4: would make 5
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-1", "a-3"}));
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-2"}));
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-4"}));
}

TEST_F(BatcherTest, OversizedJobRunsAlone) {
  Start({.max_batch_images = 2});
  ASSERT_TRUE(Enqueue("a", 3).ok());
  ASSERT_TRUE(Enqueue("a", 1).ok());
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-1"}));
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-2"}));
}

TEST_F(BatcherTest, OldestKeyGoesFirstSoNoKeyStarves) {
  Start({.max_batch_images = 2});
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-1
  ASSERT_TRUE(Enqueue("b", 1).ok());  // b-2
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-3
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-4
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-5
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-1", "a-3"}));
  // b-2 is now the oldest: it goes before a-4 although "a" has more work queued.
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"b-2"}));
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-4", "a-5"}));
}

TEST_F(BatcherTest, FullQueueAnswersResourceExhausted) {
  Start({.max_batch_images = 8, .max_queue_size = 2});
  ASSERT_TRUE(Enqueue("a", 1).ok());
  ASSERT_TRUE(Enqueue("b", 1).ok());
  absl::Status full = Enqueue("c", 1);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("max-queue-size"), absl::string_view::npos) << full;
  EXPECT_EQ(batcher_->queue_depth(), 2);
  // Running jobs do not count: once a batch leaves the queue there is room again.
  ReleaseAndTake();
  EXPECT_TRUE(Enqueue("d", 1).ok());
}

TEST_F(BatcherTest, CancelledJobsDoNotHoldQueuePlaces) {
  Start({.max_batch_images = 8, .max_queue_size = 1});
  auto job = MakeJob("a", 1);
  ASSERT_TRUE(batcher_->Enqueue(job).ok());
  job->Cancel();  // no Wake(): the place is free at once, whether or not the batcher thread has run
  EXPECT_TRUE(Enqueue("b", 1).ok());
}

TEST_F(BatcherTest, CancelledJobNeverStarts) {
  Start({.max_batch_images = 8});
  auto job = MakeJob("a", 1);
  ASSERT_TRUE(batcher_->Enqueue(job).ok());
  job->Cancel();
  batcher_->Wake();
  EXPECT_EQ(observer(1).WaitDone().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(batcher_->queue_depth(), 0);
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-2
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-2"}));
}

TEST_F(BatcherTest, ExpiredJobNeverStarts) {
  Start({.max_batch_images = 8});
  ASSERT_TRUE(Enqueue("a", 1, absl::Now() - absl::Seconds(1)).ok());        // already expired
  ASSERT_TRUE(Enqueue("a", 1, absl::Now() + absl::Milliseconds(50)).ok());  // expires while queued
  EXPECT_EQ(observer(1).WaitDone().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(observer(2).WaitDone().code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(Enqueue("a", 1).ok());  // a-3
  EXPECT_EQ(Ids(ReleaseAndTake()), (IdList{"a-3"}));
}

TEST_F(BatcherTest, ReportsQueuePositions) {
  Start({.max_batch_images = 8});
  ASSERT_TRUE(Enqueue("a", 1).ok());
  ASSERT_TRUE(Enqueue("b", 1).ok());
  // Wait until the batcher has seen both (positions are reported by its thread).
  for (absl::Time limit = absl::Now() + kWait; observer(2).positions().empty() && absl::Now() < limit;) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ReleaseAndTake();  // takes a-1; b-2 moves to the front
  ReleaseAndTake();
  EXPECT_EQ(observer(1).positions(), (std::vector<int>{0}));
  const std::vector<int> b = observer(2).positions();
  ASSERT_FALSE(b.empty());
  EXPECT_EQ(b.back(), 0);
  EXPECT_EQ(b.front(), 1);
}

TEST(BatcherDrainTest, DrainSendsBatchesWithoutWaitingForTheDelay) {
  absl::Mutex mu;
  std::vector<Batch> batches;
  RecordingObserver observer;  // outlives the batcher
  Batcher batcher({.max_batch_images = 8, .max_queue_delay = absl::Hours(1), .num_slots = 1}, [&](Batch b) {
    absl::MutexLock lock(&mu);
    batches.push_back(std::move(b));
  });
  GenerationRequest r;
  r.key.model = "a";
  ASSERT_TRUE(batcher.Enqueue(std::make_shared<Job>(r, absl::InfiniteFuture(), &observer)).ok());
  batcher.Drain();
  absl::MutexLock lock(&mu);
  EXPECT_TRUE(mu.AwaitWithTimeout(absl::Condition(
                                      +[](std::vector<Batch>* b) { return !b->empty(); }, &batches),
                                  kWait));
}

TEST_F(BatcherTest, StopFinishesQueuedJobsAndRefusesNewOnes) {
  Start({.max_batch_images = 8});
  ASSERT_TRUE(Enqueue("a", 1).ok());
  batcher_->Stop();
  EXPECT_EQ(observer(1).WaitDone().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(Enqueue("a", 1).code(), absl::StatusCode::kUnavailable);
}

// Calls Stop() on another thread. False when it has not returned after kWait: the batcher (and that thread)
// are then abandoned, so a lost wake-up fails the test instead of hanging it.
bool StopReturns(std::unique_ptr<Batcher>& batcher) {
  auto returned = std::make_shared<absl::Notification>();
  std::thread([b = batcher.get(), returned] {
    b->Stop();
    returned->Notify();
  }).detach();
  if (returned->WaitForNotificationWithTimeout(kWait)) return true;
  batcher.release();  // still inside Stop(): never destroyed
  return false;
}

// Stop() right after the constructor, right after an Enqueue, and while the batcher thread is calling out
// without its lock (the depth callback, where a Signal() with no waiter used to be lost), many times.
TEST(BatcherStopTest, StopRightAfterStartOrEnqueueNeverHangs) {
  for (int i = 0; i < 150; ++i) {
    const int variant = i % 3;   // 0: after start, 1: after Enqueue, 2: inside the depth callback
    RecordingObserver observer;  // outlives the batcher
    absl::Notification in_callback;
    auto batcher = std::make_unique<Batcher>(
        BatcherOptions{.max_batch_images = 8, .max_queue_delay = absl::Hours(1), .num_slots = 1},
        [](Batch) {},
        [&in_callback](int) {
          // Batcher thread only. Lingers so that the Stop() below lands while the lock is released.
          if (!in_callback.HasBeenNotified()) in_callback.Notify();
          absl::SleepFor(absl::Milliseconds(1));
        });
    if (variant == 1) {
      GenerationRequest r;
      r.key.model = "a";
      ASSERT_TRUE(batcher->Enqueue(std::make_shared<Job>(r, absl::InfiniteFuture(), &observer)).ok());
    }
    if (variant == 2) ASSERT_TRUE(in_callback.WaitForNotificationWithTimeout(kWait));
    ASSERT_TRUE(StopReturns(batcher)) << "Stop() did not return (variant " << variant << ")";
    if (variant == 1) {
      // Stop() joined the thread, which finished the queued job on its way out.
      ASSERT_TRUE(observer.done()) << "iteration " << i;
      EXPECT_EQ(observer.WaitDone().code(), absl::StatusCode::kUnavailable);
    }
    batcher->Stop();  // idempotent
  }
}

TEST(BatchKeyTest, HashAndEquality) {
  BatchKey a{.model = "m", .width = 64, .height = 64, .steps = 2};
  BatchKey b = a;
  EXPECT_EQ(a, b);
  EXPECT_EQ(absl::HashOf(a), absl::HashOf(b));
  b.tome.ratio = 0.25;
  EXPECT_FALSE(a == b);
  b = a;
  b.width = 128;
  EXPECT_FALSE(a == b);
}

}  // namespace
}  // namespace tomeserve::server
