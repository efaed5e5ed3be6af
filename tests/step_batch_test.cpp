// Step-level batching in the pipeline: one UNet call with rows under different Token Merging settings (HookGroup)
// equals each group run alone, and samples that join and leave a running DenoiseBatch at any step (different
// step counts, schedulers, guidance, ToMe settings, some cancelled) end with the latents they get alone.
// Tolerance: rows are independent in every layer, but the CPU's GEMM and convolution kernels (oneDNN / MKL)
// block their work by the batch's row count, so a row's float32 result can differ in the last bits with the
// number of rows it is computed with (measured: UNet max abs diff 1.3e-6 on outputs of magnitude ~1, i.e.
// relative ~1e-6; after 2-4 steps latent relative error <= 3e-6). Bounds: UNet relative L2 <= 1e-5 per
// group, final latents relative L2 <= 1e-5, images <= 1 level of 255. A row run in the same layout is
// bit-identical (the single-group layout checks that exactly).
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <cstdio>
#include <functional>
#include <string_view>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "pipeline/denoise_batch.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/unet.h"
#include "tests/test_util.h"
#include "tests/tiny_model_fixture.h"
#include "tome/tome_hooks.h"

namespace tomeserve {
namespace {

using pipeline::DenoiseBatch;
using pipeline::HookGroup;
using pipeline::SampleSpec;
using pipeline::SchedulerKind;
using pipeline::TextEmbeddingCache;
using ::tomeserve::test::EnvPath;
using ::tomeserve::test::Hooks;

double MaxAbs(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

class StepBatchTest : public test::TinyModelTest {
 protected:
  at::NoGradGuard no_grad_;
};

// Rows: 6 rows under three settings (plain, ratio 0.5 random, ratio 0.3 with mlp merging) in several layouts
// (contiguous groups, interleaved, a single group of a subset). Every row must equal the same row run with
// only its own group's rows and hook.
TEST_F(StepBatchTest, MixedTomeUNetCallEqualsEachGroupAlone) {
  const pipeline::UNet2DConditionModelImpl& unet = sd_->unet();
  at::manual_seed(5);
  const int64_t rows = 6;
  const at::Tensor x = at::randn({rows, 4, 12, 10});
  const at::Tensor ehs = at::randn({rows, 77, unet.config().cross_attention_dim.at(0)});
  const at::Tensor t = at::tensor({900.f, 900.f, 500.f, 480.f, 20.f, 1.f});
  const std::vector<std::shared_ptr<tome::TokenMergingHooks>> settings = {
      nullptr, Hooks({.ratio = 0.5, .max_downsample = 2, .seed = 3}),
      Hooks({.ratio = 0.3, .max_downsample = 1, .use_rand = false, .merge_mlp = true})};
  // row -> setting index, per layout
  const std::vector<std::vector<int>> layouts = {
      {0, 0, 1, 1, 2, 2}, {1, 2, 0, 1, 2, 0}, {2, 2, 2, 1, 1, 1}, {1, 1, 1, 1, 1, 1}};
  // Sample of each row (pairs share a sample, as CFG halves do) and the row's own call index.
  const std::vector<int> sample = {0, 0, 1, 1, 2, 2};
  for (const std::vector<int>& layout : layouts) {
    std::map<int, std::vector<int64_t>> by_setting;
    for (int64_t r = 0; r < rows; ++r) by_setting[layout[r]].push_back(r);
    auto info_for = [&](const std::vector<int64_t>& rs) {
      pipeline::UNetCallInfo call{.call_index = 0};
      for (int64_t r : rs) {
        call.row_seeds.push_back(100 + sample[r]);
        call.row_is_uncond.push_back(r % 2 == 0);
        call.row_sample.push_back(sample[r]);
        call.row_call_index.push_back(static_cast<int>(r));
        call.row_hook_seeds.push_back(7);
      }
      return call;
    };
    std::vector<std::unique_ptr<pipeline::TransformerBlockHook>> hooks;
    std::vector<HookGroup> groups;
    for (const auto& [s, rs] : by_setting) {
      HookGroup g;
      if (by_setting.size() > 1) g.rows = at::tensor(rs, at::kLong);
      if (settings[s]) {
        hooks.push_back(settings[s]->ForCall(info_for(rs)));
        g.hook = hooks.back().get();
      }
      groups.push_back(std::move(g));
    }
    const at::Tensor mixed = unet.forward(x, t, ehs, groups);
    for (const auto& [s, rs] : by_setting) {
      const at::Tensor idx = at::tensor(rs, at::kLong);
      auto hook = settings[s] ? settings[s]->ForCall(info_for(rs)) : nullptr;
      const at::Tensor alone = unet.forward(x.index_select(0, idx), t.index_select(0, idx),
                                            ehs.index_select(0, idx), hook.get());
      const double diff = MaxAbs(mixed.index_select(0, idx), alone);
      const double rel = test::RelErr(mixed.index_select(0, idx), alone);
      std::printf("layout %d%d%d%d%d%d setting %d: max abs diff vs alone %g, relative %g\n", layout[0],
                  layout[1], layout[2], layout[3], layout[4], layout[5], s, diff, rel);
      EXPECT_LE(rel, 1e-5);
      if (by_setting.size() == 1) EXPECT_EQ(diff, 0.0);
      // ...and the settings matter: the same rows under another setting give another result.
      if (settings[s]) {
        const at::Tensor plain = unet.forward(x.index_select(0, idx), t.index_select(0, idx),
                                              ehs.index_select(0, idx), nullptr);
        EXPECT_GT(test::RelErr(plain, alone), 1e-3);
      }
    }
  }
}

// BasicTransformerBlock runs in one UNet call, counted as the dispatcher sees them (three layer norms per run;
// the UNet has no other LayerNorm).
int64_t BlockRuns(const std::function<void()>& forward) {
  static thread_local int64_t norms = 0;
  norms = 0;
  const at::CallbackHandle handle = at::addThreadLocalCallback(
      at::RecordFunctionCallback([](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
        if (std::string_view(fn.name()) == "aten::layer_norm") ++norms;
        return nullptr;
      }).needsInputs(false));
  forward();
  at::removeCallback(handle);
  EXPECT_EQ(norms % 3, 0);
  return norms / 3;
}

// Mixed settings split only the blocks where some group merges: with a plain group beside one that merges at
// the finest level (max_downsample 1), every other block runs once on all rows; and two groups that merge
// nowhere at this size run every block once.
TEST_F(StepBatchTest, UnmergedBlocksRunOnceForAllRows) {
  const pipeline::UNet2DConditionModelImpl& unet = sd_->unet();
  at::manual_seed(9);
  const at::Tensor x = at::randn({4, 4, 12, 10});
  const at::Tensor ehs = at::randn({4, 77, unet.config().cross_attention_dim.at(0)});
  const at::Tensor t = at::tensor({900.f, 900.f, 20.f, 20.f});
  const auto fine = Hooks({.ratio = 0.5, .max_downsample = 1, .use_rand = false});
  const auto info = [](std::vector<int64_t> rows) {
    pipeline::UNetCallInfo call{.call_index = 0};
    for (int64_t r : rows) {
      call.row_seeds.push_back(1);
      call.row_is_uncond.push_back(r % 2 == 0);
      call.row_sample.push_back(static_cast<int>(r / 2));
      call.row_call_index.push_back(static_cast<int>(r));
      call.row_hook_seeds.push_back(1);
    }
    return call;
  };
  const int64_t all_blocks = BlockRuns([&] { unet.forward(x, t, ehs, nullptr); });
  auto solo_hook = fine->ForCall(info({0, 1, 2, 3}));
  unet.forward(x, t, ehs, solo_hook.get());
  const int64_t merging_blocks = static_cast<int64_t>(fine->MergeCounts().size());
  ASSERT_GT(merging_blocks, 0);
  ASSERT_LT(merging_blocks, all_blocks);
  std::printf("tiny UNet: %lld transformer blocks, %lld merge at max_downsample 1\n",
              static_cast<long long>(all_blocks), static_cast<long long>(merging_blocks));

  auto merged_hook = fine->ForCall(info({2, 3}));
  std::vector<HookGroup> groups(2);
  groups[0].rows = at::tensor(std::vector<int64_t>{0, 1}, at::kLong);
  groups[1].rows = at::tensor(std::vector<int64_t>{2, 3}, at::kLong);
  groups[1].hook = merged_hook.get();
  at::Tensor mixed;
  EXPECT_EQ(BlockRuns([&] { mixed = unet.forward(x, t, ehs, groups); }), all_blocks + merging_blocks);
  // Still each group's own result.
  const at::Tensor idx = at::tensor(std::vector<int64_t>{2, 3}, at::kLong);
  auto alone_hook = fine->ForCall(info({2, 3}));
  const at::Tensor alone = unet.forward(x.index_select(0, idx), t.index_select(0, idx), ehs.index_select(0, idx),
                                        alone_hook.get());
  EXPECT_LE(test::RelErr(mixed.index_select(0, idx), alone), 1e-5);

  // Two merging groups: only the merging blocks run twice. Two plain groups: every block once.
  auto other_hook = Hooks({.ratio = 0.3, .max_downsample = 1, .use_rand = false})->ForCall(info({0, 1}));
  groups[0].hook = other_hook.get();
  merged_hook = fine->ForCall(info({2, 3}));
  groups[1].hook = merged_hook.get();
  EXPECT_EQ(BlockRuns([&] { unet.forward(x, t, ehs, groups); }), all_blocks + merging_blocks);
  groups[0].hook = groups[1].hook = nullptr;
  EXPECT_EQ(BlockRuns([&] { unet.forward(x, t, ehs, groups); }), all_blocks);
}

// A factory that records the rows each UNet call gives its group (in the group's row order) and patches nothing.
class RecordingHooks final : public pipeline::HookFactory {
 public:
  explicit RecordingHooks(std::string key) : key_(std::move(key)) {}
  std::unique_ptr<pipeline::TransformerBlockHook> ForCall(const pipeline::UNetCallInfo& call) const override {
    calls.push_back(call);
    return nullptr;
  }
  std::optional<std::string> CaptureKey() const override { return key_; }
  mutable std::vector<pipeline::UNetCallInfo> calls;

 private:
  std::string key_;
};

// DenoiseBatch lays a call's rows out in pipeline/graph_layout.h's canonical order whatever the order samples
// joined in: groups by settings, guided samples first as adjacent (uncond, cond) halves, then the unguided ones.
TEST_F(StepBatchTest, RowsAreInCanonicalOrder) {
  const auto a = std::make_shared<RecordingHooks>("a");
  const auto b = std::make_shared<RecordingHooks>("b");
  // Joining order: b unguided, plain guided, b guided, a guided, plain unguided, b guided.
  const std::vector<std::pair<std::shared_ptr<const pipeline::HookFactory>, double>> joins = {
      {b, 1.0}, {nullptr, 7.5}, {b, 7.5}, {a, 3.0}, {nullptr, 1.0}, {b, 5.0}};
  DenoiseBatch batch(*sd_, 8, 8);
  std::vector<int> ids;
  for (size_t i = 0; i < joins.size(); ++i) {
    SampleSpec spec{.prompt = "p" + std::to_string(i), .seed = 60 + i, .guidance_scale = joins[i].second,
                    .num_inference_steps = 2, .hooks = joins[i].first};
    auto prepared = sd_->PrepareSamples({.width = 64, .height = 64}, {spec});
    ASSERT_TRUE(prepared.ok()) << prepared.status();
    auto id = batch.Add(std::move((*prepared)[0]));
    ASSERT_TRUE(id.ok());
    ids.push_back(*id);
  }
  ASSERT_TRUE(batch.Step().ok());
  ASSERT_EQ(a->calls.size(), 1u);
  ASSERT_EQ(b->calls.size(), 1u);
  EXPECT_EQ(a->calls[0].row_sample, (std::vector<int>{ids[3], ids[3]}));
  EXPECT_EQ(a->calls[0].row_is_uncond, (std::vector<bool>{true, false}));
  EXPECT_EQ(b->calls[0].row_sample, (std::vector<int>{ids[2], ids[2], ids[5], ids[5], ids[0]}));
  EXPECT_EQ(b->calls[0].row_is_uncond, (std::vector<bool>{true, false, true, false, false}));
}

struct Planned {
  SampleSpec spec;
  int join_at;     // batch step before which it is added
  int cancel_at;   // batch step at which it is cancelled (-1: never)
};

// Samples join a running batch at random steps (seeded), some are cancelled, every one leaves when done; each
// final latent equals its solo run, bit for bit, and so does its image.
TEST_F(StepBatchTest, SamplesJoiningAndLeavingEqualTheirSoloRuns) {
  const auto tome_a = Hooks({.ratio = 0.5, .max_downsample = 2});
  const auto tome_b = Hooks({.ratio = 0.4, .max_downsample = 1, .use_rand = false});
  const std::vector<SchedulerKind> kinds = {SchedulerKind::kPndm, SchedulerKind::kDdim, SchedulerKind::kEuler,
                                            SchedulerKind::kEulerAncestral, SchedulerKind::kDpmpp2mKarras};
  std::mt19937 rng(2026);
  std::vector<Planned> plan;
  for (int i = 0; i < 7; ++i) {
    SampleSpec s{.prompt = "sample " + std::to_string(i),
                 .negative_prompt = i % 3 == 0 ? "blurry" : "",
                 .seed = static_cast<uint64_t>(40 + i),
                 .guidance_scale = i % 4 == 1 ? 1.0 : 3.0 + i};
    s.num_inference_steps = 2 + static_cast<int>(rng() % 5);
    s.scheduler = kinds[rng() % kinds.size()];
    const int which = static_cast<int>(rng() % 3);
    s.hooks = which == 0 ? nullptr : which == 1 ? tome_a : tome_b;
    s.hook_seed = i % 2;
    plan.push_back({s, static_cast<int>(rng() % 6), i == 3 ? 2 : -1});
  }

  DenoiseBatch batch(*sd_, 8, 8);
  std::map<int, int> id_of;          // plan index -> id
  std::map<int, at::Tensor> final_;  // plan index -> latents when done
  int64_t rows_computed = 0, rows_expected = 0;
  for (int step = 0; step < 20; ++step) {
    for (int i = 0; i < static_cast<int>(plan.size()); ++i) {
      if (plan[i].join_at != step) continue;
      auto prepared = sd_->PrepareSamples({.width = 64, .height = 64}, {plan[i].spec});
      ASSERT_TRUE(prepared.ok()) << prepared.status();
      auto id = batch.Add(std::move((*prepared)[0]));
      ASSERT_TRUE(id.ok());
      id_of[i] = *id;
    }
    for (auto& [i, id] : id_of) {
      if (plan[i].cancel_at == step && batch.contains(id)) batch.Cancel(id);
    }
    ASSERT_TRUE(batch.Step().ok());
    for (auto& [i, id] : id_of) {
      if (!batch.contains(id)) continue;
      const DenoiseBatch::Sample& s = batch.sample(id);
      if (s.done() || s.cancelled) {
        std::optional<DenoiseBatch::Sample> out = batch.Remove(id);
        rows_computed += out->unet_rows;
        rows_expected += static_cast<int64_t>(out->state->step_index()) * out->rows_per_call();
        if (!out->cancelled) final_[i] = out->latents;
      }
    }
  }
  EXPECT_EQ(batch.num_samples(), 0);
  EXPECT_EQ(rows_computed, rows_expected);
  ASSERT_EQ(final_.size(), plan.size() - 1);  // one was cancelled
  for (const auto& [i, latents] : final_) {
    const Planned& p = plan[i];
    auto solo = sd_->Generate({.width = 64, .height = 64}, {p.spec});
    ASSERT_TRUE(solo.ok()) << solo.status();
    const double diff = MaxAbs(latents, (*solo)[0].latents);
    const double rel = test::RelErr(latents, (*solo)[0].latents);
    auto rgb = sd_->Decode(latents);
    ASSERT_TRUE(rgb.ok());
    const int pixels = ((*rgb)[0].to(at::kInt) - (*solo)[0].rgb8.to(at::kInt)).abs().max().item<int>();
    std::printf("sample %d (%d steps, %s, joined at %d): latent max abs diff %g (relative %g), pixel diff %d\n",
                i, *p.spec.num_inference_steps,
                std::string(pipeline::SchedulerKindName(*p.spec.scheduler)).c_str(), p.join_at, diff, rel, pixels);
    EXPECT_LE(rel, 1e-5);
    EXPECT_LE(pixels, 1);
  }
}

// Distinct texts are encoded once per PrepareSamples call: samples with equal prompts (a request's N images) share
// one row of one encoder output that holds only the distinct texts, and each row is what its text alone
// encodes to.
TEST_F(StepBatchTest, EqualPromptsAreEncodedOnce) {
  std::vector<SampleSpec> specs = {{.prompt = "a red cube", .seed = 1},
                                   {.prompt = "a red cube", .seed = 2},
                                   {.prompt = "a blue ball", .negative_prompt = "blurry", .seed = 3},
                                   {.prompt = "a red cube", .seed = 4, .guidance_scale = 1.0}};
  auto prepared = sd_->PrepareSamples({.width = 64, .height = 64}, specs);
  ASSERT_TRUE(prepared.ok()) << prepared.status();
  const auto& s = *prepared;
  ASSERT_EQ(s.size(), 4u);
  // The same row, not equal copies: 4 distinct texts ("a red cube", "a blue ball", "", "blurry") were encoded,
  // where one row per prompt and per negative prompt would be 7.
  EXPECT_EQ(s[0].cond.embeds.data_ptr(), s[1].cond.embeds.data_ptr());
  EXPECT_EQ(s[0].cond.embeds.data_ptr(), s[3].cond.embeds.data_ptr());
  EXPECT_EQ(s[0].uncond.embeds.data_ptr(), s[1].uncond.embeds.data_ptr());  // the empty negative prompt, once
  EXPECT_EQ(s[0].cond.embeds.storage().nbytes(), 4 * s[0].cond.embeds.nbytes());
  EXPECT_FALSE(s[3].uncond.defined());  // no guidance, no unconditional half
  EXPECT_FALSE(at::equal(s[0].cond.embeds, s[2].cond.embeds));
  EXPECT_FALSE(at::equal(s[0].uncond.embeds, s[2].uncond.embeds));
  for (const auto& [text, got] : std::vector<std::pair<std::string, at::Tensor>>{
           {"a red cube", s[0].cond.embeds}, {"a blue ball", s[2].cond.embeds}, {"blurry", s[2].uncond.embeds}, {"", s[0].uncond.embeds}}) {
    auto alone = sd_->EncodePrompts({text});
    ASSERT_TRUE(alone.ok());
    EXPECT_TRUE(at::equal(got, alone->embeds)) << text;  // each text encoded alone: exactly its own embedding
  }
}

// Texts seen before come from the text-embedding cache: bit-identical rows, no encoder call (counted as hits).
TEST_F(StepBatchTest, RepeatedTextsComeFromTheCache) {
  const std::vector<SampleSpec> specs = {{.prompt = "a cached lighthouse", .negative_prompt = "cache-neg", .seed = 1}};
  auto first = sd_->PrepareSamples({.width = 64, .height = 64}, specs);
  ASSERT_TRUE(first.ok()) << first.status();
  const TextEmbeddingCache::Stats before = sd_->text_cache_stats();
  auto second = sd_->PrepareSamples({.width = 64, .height = 64}, specs);
  ASSERT_TRUE(second.ok()) << second.status();
  const TextEmbeddingCache::Stats after = sd_->text_cache_stats();
  EXPECT_EQ(after.hits - before.hits, 2);  // the prompt and the negative prompt
  EXPECT_EQ(after.misses, before.misses);
  EXPECT_TRUE(at::equal((*first)[0].cond.embeds, (*second)[0].cond.embeds));
  EXPECT_TRUE(at::equal((*first)[0].uncond.embeds, (*second)[0].uncond.embeds));
}

TEST(TextEmbeddingCache, EvictsTheLeastRecentlyUsed) {
  TextEmbeddingCache cache(2);
  cache.Insert("a", {.embeds = at::full({1}, 1.0)});
  cache.Insert("b", {.embeds = at::full({1}, 2.0)});
  ASSERT_TRUE(cache.Find("a").has_value());  // "a" is now the most recent
  cache.Insert("c", {.embeds = at::full({1}, 3.0)});     // evicts "b"
  EXPECT_FALSE(cache.Find("b").has_value());
  EXPECT_EQ(cache.Find("a")->embeds.item<double>(), 1.0);
  EXPECT_EQ(cache.Find("c")->embeds.item<double>(), 3.0);
  cache.Insert("c", {.embeds = at::full({1}, 4.0)});  // replacing keeps one entry
  EXPECT_EQ(cache.Find("c")->embeds.item<double>(), 4.0);
  EXPECT_EQ(cache.stats().entries, 2u);
  TextEmbeddingCache off(0);
  off.Insert("a", {.embeds = at::full({1}, 1.0)});
  EXPECT_FALSE(off.Find("a").has_value());
  EXPECT_EQ(off.stats().entries, 0u);
}

TEST_F(StepBatchTest, RejectsASampleOfAnotherSize) {
  DenoiseBatch batch(*sd_, 8, 8);
  auto prepared = sd_->PrepareSamples({.width = 64, .height = 72}, {SampleSpec{.prompt = "a"}});
  ASSERT_TRUE(prepared.ok());
  EXPECT_EQ(batch.Add(std::move((*prepared)[0])).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(batch.Remove(3).has_value());
  EXPECT_TRUE(batch.Done());
  EXPECT_TRUE(batch.Step().ok());  // an empty batch steps as a no-op
}

// No host synchronisation inside a denoising step: with CUDA's sync debug mode set to error, any operation that
// makes the host wait for the device (a blocking copy from pageable memory, .item() on a device tensor) throws,
// and the step returns that error. Mixed ToMe settings (random partitions drawn on the CPU, groups by index),
// guidance on and off, per-row timesteps, Euler ancestral (noise drawn on the CPU every step).
TEST(StepBatchCudaTest, StepsDoNotSynchronizeTheHost_CUDA) {
#ifndef TOMESERVE_HAVE_CUDA
  GTEST_SKIP() << "built without c10_cuda";
#else
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (EnvPath("TOMESERVE_TINY_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  c10::InferenceMode inference;
  auto sd = pipeline::StableDiffusion::Create({EnvPath("TOMESERVE_TINY_MODEL"), {c10::Device("cuda:0"), c10::kHalf}});
  ASSERT_TRUE(sd.ok()) << sd.status();
  const auto random = Hooks({.ratio = 0.5, .max_downsample = 2});
  const auto fixed = Hooks({.ratio = 0.3, .max_downsample = 1, .use_rand = false, .merge_mlp = true});
  const std::vector<SampleSpec> specs = {
      {.prompt = "a", .seed = 1, .guidance_scale = 7.5, .num_inference_steps = 6, .scheduler = SchedulerKind::kPndm,
       .hooks = random},
      {.prompt = "b", .seed = 2, .guidance_scale = 1.0, .num_inference_steps = 6,
       .scheduler = SchedulerKind::kEulerAncestral},
      {.prompt = "c", .seed = 3, .guidance_scale = 5.0, .num_inference_steps = 5, .scheduler = SchedulerKind::kDdim,
       .hooks = fixed},
      {.prompt = "d", .seed = 4, .guidance_scale = 4.0, .num_inference_steps = 6,
       .scheduler = SchedulerKind::kDpmpp2mKarras, .hooks = random, .hook_seed = 9}};
  DenoiseBatch batch(**sd, 8, 8);
  for (const SampleSpec& spec : specs) {
    auto prepared = (*sd)->PrepareSamples({.width = 64, .height = 64}, {spec});
    ASSERT_TRUE(prepared.ok()) << prepared.status();
    ASSERT_TRUE(batch.Add(std::move((*prepared)[0])).ok());
  }
  ASSERT_TRUE(batch.Step().ok());  // the first call initialises cuBLAS/cuDNN handles and caches (those may wait)
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  absl::Status status;
  for (int i = 0; i < 3 && status.ok(); ++i) status = batch.Step();
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  EXPECT_TRUE(status.ok()) << status;
#endif
}

}  // namespace
}  // namespace tomeserve
