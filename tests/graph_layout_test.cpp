// The CUDA-graph call layouts (pipeline/graph_layout.h), torch-free: the canonical row order, the row buckets,
// the layout key (a multiset of settings and sample counts per size, not the samples' identity) and the cache
// policy that decides eager, capture or replay, with its capacity and releases.
#include "pipeline/graph_layout.h"

#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace tomeserve::pipeline {
namespace {

TEST(GraphLayoutTest, CanonicalOrderGroupsBySettingsGuidedFirst) {
  const std::vector<LayoutSample> samples = {
      {.settings = "b", .guided = false}, {.settings = "", .guided = true}, {.settings = "a", .guided = true},
      {.settings = "b", .guided = true},  {.settings = "", .guided = false}, {.settings = "b", .guided = true}};
  EXPECT_EQ(CanonicalOrder(samples), (std::vector<size_t>{1, 4, 2, 3, 5, 0}));
  const std::vector<LayoutGroup> groups = CanonicalGroups(samples);
  ASSERT_EQ(groups.size(), 3u);
  EXPECT_EQ(groups[0].settings, "");
  EXPECT_EQ(std::make_pair(groups[0].pairs, groups[0].singles), std::make_pair(int64_t{1}, int64_t{1}));
  EXPECT_EQ(std::make_pair(groups[1].pairs, groups[1].singles), std::make_pair(int64_t{1}, int64_t{0}));
  EXPECT_EQ(std::make_pair(groups[2].pairs, groups[2].singles), std::make_pair(int64_t{2}, int64_t{1}));
  EXPECT_EQ(groups[2].rows(), 5);
}

TEST(GraphLayoutTest, RowBuckets) {
  const std::vector<std::pair<int64_t, int64_t>> fine = {{1, 1},   {2, 2},   {3, 4},   {5, 6},   {7, 8},
                                                         {9, 10},  {16, 16}, {17, 20}, {29, 32}, {32, 32}};
  for (const auto& [rows, bucket] : fine) EXPECT_EQ(GraphRowsBucket(rows, 32), bucket) << rows;
  EXPECT_EQ(GraphRowsBucket(33, 48), 40);
  const std::vector<std::pair<int64_t, int64_t>> pow2 = {{1, 1}, {2, 2},   {3, 4},   {5, 8},
                                                         {8, 8}, {9, 16}, {17, 24}, {32, 32}};
  for (const auto& [rows, bucket] : pow2) EXPECT_EQ(GraphRowsBucket(rows, 32, RowBuckets::kPowerOfTwo), bucket) << rows;
  EXPECT_EQ(GraphRowsBucket(33, 32), 0);
  EXPECT_EQ(GraphRowsBucket(0, 32), 0);
  EXPECT_EQ(GraphRowsBucket(11, 11), 11);  // the next bucket is over the limit: no padding
  // At most one padding row up to 16 rows (none for even counts), three up to 32, seven above.
  for (int64_t rows = 1; rows <= 64; ++rows) {
    const int64_t pad = GraphRowsBucket(rows, 64) - rows;
    EXPECT_LE(pad, rows <= 16 ? 1 : rows <= 32 ? 3 : 7) << rows;
    if (rows <= 16 && rows % 2 == 0) EXPECT_EQ(pad, 0) << rows;
  }
}

TEST(GraphLayoutTest, KeyIsTheShapeNotTheSamples) {
  const auto layout = [](std::vector<LayoutSample> samples, int64_t width = 64) {
    return CallLayout{.latent_height = 64, .latent_width = width, .text_length = 77, .dtype = "Half",
                      .groups = CanonicalGroups(samples)};
  };
  const LayoutSample plain{.settings = "", .guided = true}, merged{.settings = "tome 0.5", .guided = true};
  const std::string key = GraphLayoutKey(layout({plain, merged, merged}), 6);
  // The same multiset in another order is the same layout.
  EXPECT_EQ(GraphLayoutKey(layout({merged, plain, merged}), 6), key);
  EXPECT_NE(GraphLayoutKey(layout({plain, plain, merged}), 6), key);     // other counts per settings
  EXPECT_NE(GraphLayoutKey(layout({plain, merged, merged}), 8), key);    // other bucket
  EXPECT_NE(GraphLayoutKey(layout({plain, merged, merged}, 96), 6), key);  // other size
  const LayoutSample unguided{.settings = "tome 0.5", .guided = false};
  EXPECT_NE(GraphLayoutKey(layout({plain, merged, unguided, unguided}), 6), key);  // same rows, other pairing
}

TEST(GraphLayoutTest, CacheCapturesOnTheSecondCallAndReplaysAfter) {
  GraphLayoutCache cache(2);
  EXPECT_EQ(cache.Next("a"), GraphLayoutCache::Action::kEager);
  EXPECT_EQ(cache.Next("a"), GraphLayoutCache::Action::kCapture);
  cache.Captured("a");
  EXPECT_EQ(cache.Next("a"), GraphLayoutCache::Action::kReplay);
  EXPECT_EQ(cache.Next("a"), GraphLayoutCache::Action::kReplay);
  // A capture that failed leaves the layout eager for good.
  EXPECT_EQ(cache.Next("b"), GraphLayoutCache::Action::kEager);
  EXPECT_EQ(cache.Next("b"), GraphLayoutCache::Action::kCapture);
  cache.CaptureFailed("b");
  EXPECT_EQ(cache.Next("b"), GraphLayoutCache::Action::kEager);
  // A warm-up that threw (neither Captured nor CaptureFailed) captures on the next call.
  EXPECT_EQ(cache.Next("c"), GraphLayoutCache::Action::kEager);
  EXPECT_EQ(cache.Next("c"), GraphLayoutCache::Action::kCapture);
  EXPECT_EQ(cache.Next("c"), GraphLayoutCache::Action::kCapture);
  cache.Captured("c");
  const GraphLayoutCache::Stats& s = cache.stats();
  EXPECT_EQ(s.replays, 2);
  EXPECT_EQ(s.captures, 2);
  EXPECT_EQ(s.capture_failures, 1);
  EXPECT_EQ(s.eager, 8);  // first calls, warm-ups and the failed layout's calls
  EXPECT_EQ(s.layouts, 3);
  EXPECT_EQ(s.graphs, 2u);
  EXPECT_TRUE(cache.TakeReleased().empty());
}

TEST(GraphLayoutTest, CacheHoldsAtMostCapacityGraphsAndReleasesTheOldest) {
  GraphLayoutCache cache(2);
  for (const char* key : {"a", "b", "c"}) {
    cache.Next(key);
    ASSERT_EQ(cache.Next(key), GraphLayoutCache::Action::kCapture);
    cache.Captured(key);
  }
  EXPECT_EQ(cache.stats().graphs, 2u);
  EXPECT_EQ(cache.TakeReleased(), std::vector<std::string>{"a"});
  EXPECT_EQ(cache.Next("b"), GraphLayoutCache::Action::kReplay);
  EXPECT_EQ(cache.Next("a"), GraphLayoutCache::Action::kCapture);  // known: no eager first call again
  cache.Captured("a");
  EXPECT_EQ(cache.TakeReleased(), std::vector<std::string>{"c"});  // b was used more recently
  cache.ReleaseAll();
  EXPECT_EQ(cache.stats().graphs, 0u);
  EXPECT_EQ(cache.TakeReleased().size(), 2u);
  EXPECT_EQ(cache.Next("b"), GraphLayoutCache::Action::kCapture);
  // Layouts beyond 8x capacity are forgotten (with their graphs).
  for (int i = 0; i < 20; ++i) cache.Next("x" + std::to_string(i));
  EXPECT_EQ(cache.Next("x0"), GraphLayoutCache::Action::kEager);
  EXPECT_EQ(cache.stats().layouts, 23);
}

}  // namespace
}  // namespace tomeserve::pipeline
