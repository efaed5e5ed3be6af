// Token Merging: parity with tomesd 0.1.3 (use_rand=False) on diffusers' UNet and StableDiffusionPipeline
// (references from scripts/reference_tome.py), the partition itself, seeded randomness, validation.
// Tolerances: UNet relative L2 <= 1e-5 in fp32 (same ops; tomesd's unstable argsort orders tokens differently
// inside attention, which only changes summation order); images <= 1 level of 255 (the pipeline's bound).
#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/load_weights.h"
#include "pipeline/safetensors.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/unet.h"
#include "pipeline/weight_store.h"
#include "tests/test_util.h"
#include "tome/merge.h"
#include "tome/tome_hooks.h"
#include "tome/token_merging.h"

namespace tomeserve::tome {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::tomeserve::test::EnvPath;
using ::tomeserve::test::RelErr;

TokenMerging FromJson(const nlohmann::json& j) {
  return TokenMerging{.ratio = j["ratio"], .max_downsample = j["max_downsample"], .sx = j["sx"], .sy = j["sy"],
                      .use_rand = j["use_rand"], .merge_attn = j["merge_attn"],
                      .merge_crossattn = j["merge_crossattn"], .merge_mlp = j["merge_mlp"]};
}

fs::path ModelDir(const std::string& preset) {
  return EnvPath(preset == "tiny"      ? "TOMESERVE_TINY_MODEL"
                 : preset == "tiny_xl" ? "TOMESERVE_TINY_XL_MODEL"
                                       : "TOMESERVE_SD15_MODEL");
}

std::shared_ptr<pipeline::UNet2DConditionModelImpl> LoadUNet(const std::string& preset) {
  static std::map<std::string, std::shared_ptr<pipeline::UNet2DConditionModelImpl>> cache;  // main thread only
  auto& slot = cache[preset];
  if (!slot) {
    auto model = pipeline::UNet2DConditionModelImpl::Load(ModelDir(preset) / "unet", {});
    EXPECT_TRUE(model.ok()) << model.status();
    if (model.ok()) slot = *model;
  }
  return slot;
}

std::shared_ptr<TokenMergingHooks> Hooks(const TokenMerging& tome) {
  auto hooks = TokenMergingHooks::Create(tome);
  EXPECT_TRUE(hooks.ok()) << hooks.status();
  return hooks.ok() ? *hooks : nullptr;
}

struct Reference {
  std::unique_ptr<pipeline::WeightStore> store;
  nlohmann::json unet_cases, pipeline_cases;
};

Reference OpenReference(const std::string& preset) {
  const fs::path file = EnvPath("TOMESERVE_REF_DIR") / ("tome_" + preset + ".safetensors");
  auto meta = pipeline::SafetensorsFile::Open(file);
  EXPECT_TRUE(meta.ok()) << meta.status();
  auto store = pipeline::WeightStore::OpenFile(file);
  EXPECT_TRUE(store.ok()) << store.status();
  if (!meta.ok() || !store.ok()) return {};
  return {std::make_unique<pipeline::WeightStore>(std::move(*store)),
          nlohmann::json::parse((*meta)->metadata().at("unet_cases")),
          nlohmann::json::parse((*meta)->metadata().at("pipeline_cases"))};
}

class TomeUNetParity : public ::testing::TestWithParam<std::string> {};

TEST_P(TomeUNetParity, MatchesTomesdNoRand) {
  if (EnvPath("TOMESERVE_REF_DIR").empty() || ModelDir(GetParam()).empty()) {
    GTEST_SKIP() << "TOMESERVE_REF_DIR or the preset's model not set";
  }
  auto model = LoadUNet(GetParam());
  ASSERT_TRUE(model);
  Reference ref = OpenReference(GetParam());
  ASSERT_TRUE(ref.store);
  ASSERT_GE(ref.unet_cases.size(), 4u);
  at::NoGradGuard no_grad;
  double max_err = 0;
  for (const auto& c : ref.unet_cases) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto read = [&](const char* field) {
      return pipeline::ReadTensor(*ref.store, "unet/" + name + "/" + field).value();
    };
    const TokenMerging tome = FromJson(c["tome"]);
    auto hooks = Hooks(tome);
    ASSERT_TRUE(hooks);
    auto hook = hooks->ForCall({});
    // SDXL (tiny_xl): the added conditions.
    std::optional<pipeline::UNetAddedConditions> added;
    if (ref.store->Find("unet/" + name + "/text_embeds") != nullptr) {
      added = pipeline::UNetAddedConditions{read("text_embeds"), read("time_ids")};
    }
    const pipeline::UNetAddedConditions* cond = added ? &*added : nullptr;
    const at::Tensor out =
        model->forward(read("sample"), read("timesteps"), read("encoder_hidden_states"), hook.get(), cond);
    const at::Tensor want = read("out");
    const double err = RelErr(out, want);
    max_err = std::max(max_err, err);
    EXPECT_LE(err, 1e-5);
    const double plain = RelErr(
        model->forward(read("sample"), read("timesteps"), read("encoder_hidden_states"), nullptr, cond), want);
    std::printf("[%s] %s rel err %.3g (unmerged UNet: %.3g)\n", GetParam().c_str(), name.c_str(), err, plain);
    if (c["blocks"].empty()) {
      // Settings that patch no block (SDXL at max_downsample 1): tomesd leaves the UNet as it is; so do we.
      EXPECT_TRUE(hooks->MergeCounts().empty());
      EXPECT_LE(plain, 1e-5);
    } else {
      // The plain UNet is far from the merged one: the comparison above is not vacuous.
      EXPECT_GT(plain, 100 * err + 1e-6);
    }

    // Same blocks patched with the same token counts as tomesd: [N, w, h, r] per patched block.
    const std::vector<BlockMergeCount> counts = hooks->MergeCounts();
    ASSERT_EQ(counts.size(), c["blocks"].size());
    for (size_t i = 0; i < counts.size(); ++i) {
      const auto& b = c["blocks"][i];
      const int64_t n = b[0], w = b[1], h = b[2], r = b[3];
      const int64_t num_src = n - (h / tome.sy) * (w / tome.sx);
      EXPECT_EQ(counts[i].tokens_before, n) << counts[i].block;
      EXPECT_EQ(counts[i].tokens_after, n - std::min(r, num_src)) << counts[i].block;
    }
  }
  std::printf("[%s] max rel err %.3g over %zu cases\n", GetParam().c_str(), max_err, ref.unet_cases.size());
}

INSTANTIATE_TEST_SUITE_P(Presets, TomeUNetParity, ::testing::Values("tiny", "sd15", "tiny_xl"));

// The whole pipeline with tomesd applied: StableDiffusionPipeline on tiny, StableDiffusionXLPipeline on
// tiny-xl (max_downsample 2 and 4, and 1, which patches nothing on SDXL).
class TomePipeline : public ::testing::TestWithParam<std::string> {};

INSTANTIATE_TEST_SUITE_P(Presets, TomePipeline, ::testing::Values("tiny", "tiny_xl"));

TEST_P(TomePipeline, MatchesDiffusersWithTomesd) {
  if (EnvPath("TOMESERVE_REF_DIR").empty() || ModelDir(GetParam()).empty()) {
    GTEST_SKIP() << "TOMESERVE_REF_DIR or the preset's model not set";
  }
  auto sd = pipeline::StableDiffusion::Create({ModelDir(GetParam()), {}});
  ASSERT_TRUE(sd.ok()) << sd.status();
  Reference ref = OpenReference(GetParam());
  ASSERT_TRUE(ref.store);
  ASSERT_GE(ref.pipeline_cases.size(), 3u);
  for (const auto& c : ref.pipeline_cases) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    std::string scheduler = c["scheduler"];
    const std::map<std::string, pipeline::SchedulerKind> kinds = {
        {"PNDMScheduler", pipeline::SchedulerKind::kPndm},
        {"DDIMScheduler", pipeline::SchedulerKind::kDdim},
        {"EulerDiscreteScheduler", pipeline::SchedulerKind::kEuler}};
    pipeline::BatchSpec spec{.width = c["width"], .height = c["height"], .num_inference_steps = c["steps"],
                             .scheduler = kinds.at(scheduler), .hooks = Hooks(FromJson(c["tome"]))};
    std::vector<pipeline::SampleSpec> samples;
    samples.push_back({.prompt = c["prompt"].get<std::string>(),
                       .negative_prompt = c["negative_prompt"].get<std::string>(),
                       .seed = c["seed"].get<uint64_t>(),
                       .guidance_scale = c["guidance"].get<double>(),
                       .init_latents = pipeline::ReadTensor(*ref.store, "pipe/" + name + "/latents").value()});
    auto images = (*sd)->Generate(spec, std::move(samples));
    ASSERT_TRUE(images.ok()) << images.status();
    const at::Tensor want = pipeline::ReadTensor(*ref.store, "pipe/" + name + "/image").value();
    const int diff = ((*images)[0].rgb8.to(at::kInt) - want.to(at::kInt)).abs().max().item<int>();
    std::printf("tome pipeline %s: max abs pixel diff %d\n", name.c_str(), diff);
    EXPECT_LE(diff, 1);
  }
}

TEST(TomePipeline, RandomPartitionsAreBatchInvariant) {
  if (ModelDir("tiny").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  auto sd = pipeline::StableDiffusion::Create({ModelDir("tiny"), {}});
  ASSERT_TRUE(sd.ok()) << sd.status();
  // Batch-mates with and without guidance make the UNet batch odd (5 rows): the guided sample keeps its own
  // random partition (tomesd would turn randomness off for the whole batch).
  const TokenMerging tome{.ratio = 0.5, .max_downsample = 2, .use_rand = true, .seed = 8};
  const pipeline::BatchSpec spec{.width = 96, .height = 64, .num_inference_steps = 3,
                                 .scheduler = pipeline::SchedulerKind::kDdim, .hooks = Hooks(tome)};
  const pipeline::SampleSpec target{.prompt = "a lighthouse", .negative_prompt = "fog", .seed = 3,
                                    .guidance_scale = 7.5};
  auto alone = (*sd)->Generate(spec, {target});
  ASSERT_TRUE(alone.ok()) << alone.status();
  auto batch = (*sd)->Generate(spec, {{.prompt = "a boat", .seed = 4, .guidance_scale = 1.0}, target,
                                      {.prompt = "a tree", .seed = 5, .guidance_scale = 5.0}});
  ASSERT_TRUE(batch.ok()) << batch.status();
  const int diff = ((*batch)[1].rgb8.to(at::kInt) - (*alone)[0].rgb8.to(at::kInt)).abs().max().item<int>();
  std::printf("ToMe batch invariance: max abs pixel diff %d\n", diff);
  EXPECT_LE(diff, 1);
  // ...and the partitions matter: another settings seed changes the image.
  const pipeline::BatchSpec reseeded{.width = 96, .height = 64, .num_inference_steps = 3,
                                     .scheduler = pipeline::SchedulerKind::kDdim,
                                     .hooks = Hooks({.ratio = 0.5, .max_downsample = 2, .seed = 9})};
  auto other = (*sd)->Generate(reseeded, {target});
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(at::equal((*other)[0].rgb8, (*alone)[0].rgb8));
}

// ---- Without the reference stack ----

class TomeUNetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (ModelDir("tiny").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
    model_ = LoadUNet("tiny");
    ASSERT_TRUE(model_);
    at::manual_seed(7);
    sample_ = at::randn({2, 4, 9, 13});
    ehs_ = at::randn({2, 77, model_->config().cross_attention_dim.at(0)});
  }
  at::Tensor Run(const std::shared_ptr<TokenMergingHooks>& hooks, pipeline::UNetCallInfo call = {}) {
    auto hook = hooks ? hooks->ForCall(call) : nullptr;
    return model_->forward(sample_, at::full({2}, 500.0), ehs_, hook.get());
  }
  std::shared_ptr<pipeline::UNet2DConditionModelImpl> model_;
  at::Tensor sample_, ehs_;
  at::NoGradGuard no_grad_;
};

TEST_F(TomeUNetTest, RatioZeroOrNothingMergedIsBitIdentical) {
  const at::Tensor plain = Run(nullptr);
  EXPECT_TRUE(at::equal(Run(Hooks({.ratio = 0.0, .max_downsample = 8})), plain));
  EXPECT_TRUE(at::equal(Run(Hooks({.ratio = 0.5, .merge_attn = false})), plain));
  EXPECT_FALSE(IsActive({.ratio = 0.0}));
  EXPECT_FALSE(IsActive({.ratio = 0.5, .merge_attn = false}));
  EXPECT_TRUE(IsActive({.ratio = 0.5}));
}

TEST_F(TomeUNetTest, SameSeedSameOutputDifferentSeedDifferentOutput) {
  const pipeline::UNetCallInfo call{
      .call_index = 3, .row_seeds = {11, 11}, .row_is_uncond = {true, false}, .row_sample = {0, 0}};
  const TokenMerging tome{.ratio = 0.5, .max_downsample = 2, .use_rand = true, .seed = 1};
  const at::Tensor a = Run(Hooks(tome), call);
  EXPECT_TRUE(at::equal(Run(Hooks(tome), call), a));
  TokenMerging other = tome;
  other.seed = 2;
  EXPECT_FALSE(at::equal(Run(Hooks(other), call), a));
  pipeline::UNetCallInfo next = call;
  next.call_index = 4;
  EXPECT_FALSE(at::equal(Run(Hooks(tome), next), a));
  // use_rand off: the top-left partition, whatever the seeds.
  const TokenMerging fixed{.ratio = 0.5, .max_downsample = 2, .use_rand = false, .seed = 1};
  const at::Tensor top_left = Run(Hooks(fixed), call);
  EXPECT_TRUE(at::equal(Run(Hooks(fixed), next), top_left));
  EXPECT_FALSE(at::equal(top_left, Run(nullptr)));
  EXPECT_FALSE(at::equal(top_left, a));
}

TEST_F(TomeUNetTest, GridTomesdMisjudgesIsLeftUnmerged) {
  // 9x13 latents: the third level's block has 3x4 tokens, but tomesd's ceil(9/3) x ceil(13/3) = 3x5 grid does
  // not match it (tomesd raises there). tomeserve runs that block unmerged and reports it.
  auto hooks = Hooks({.ratio = 0.5, .max_downsample = 4, .use_rand = false});
  const at::Tensor out = Run(hooks);
  EXPECT_TRUE(at::isfinite(out).all().item<bool>());
  int unmerged = 0;
  for (const BlockMergeCount& c : hooks->MergeCounts()) {
    if (c.tokens_before == 12) {
      EXPECT_EQ(c.tokens_after, 12) << c.block;
      ++unmerged;
    } else {
      EXPECT_EQ(c.tokens_after, c.tokens_before - c.tokens_before / 2) << c.block;
    }
  }
  EXPECT_EQ(unmerged, 5);  // down_blocks.2 (2 blocks) and up_blocks.1 (3 blocks)
}

TEST_F(TomeUNetTest, CudaMatchesCpuWithTheSameSeeds_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto cuda = pipeline::UNet2DConditionModelImpl::Load(ModelDir("tiny") / "unet", {c10::Device("cuda:0")});
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  // Random partitions are drawn on the CPU from the seeds, so both devices merge the same tokens; what is left
  // is kernel summation order (bound as in the UNet's CUDA test).
  const pipeline::UNetCallInfo call{
      .call_index = 0, .row_seeds = {4, 4}, .row_is_uncond = {true, false}, .row_sample = {0, 0}};
  const TokenMerging tome{.ratio = 0.5, .max_downsample = 2, .seed = 5};
  auto hook = Hooks(tome)->ForCall(call);
  const at::Tensor got = (*cuda)->forward(sample_.cuda(), at::full({2}, 500.0).cuda(), ehs_.cuda(), hook.get());
  EXPECT_LE(RelErr(got, Run(Hooks(tome), call)), 1e-3);
}

// ---- The partition and the merge itself ----

std::shared_ptr<const MergePlan> PlanFor(pipeline::TransformerBlockHook& hook, const at::Tensor& x, int64_t h,
                                         int64_t w) {
  pipeline::BlockTokenOps ops = hook.ForBlock({"down_blocks.0.attentions.0.transformer_blocks.0", h, w}, x);
  return std::dynamic_pointer_cast<const MergePlan>(ops.attn);
}

TEST(MergePlan, OneDstPerCellLeftoverIsSrcAndRTokensGo) {
  at::manual_seed(3);
  const int64_t h = 9, w = 13, n = h * w;
  const at::Tensor x = at::randn({2, n, 8});
  const at::Tensor choice = at::randint(4, {1, h / 2, w / 2}, at::kLong);
  auto plan = MergePlan::Build(x, {.w = w, .h = h, .sx = 2, .sy = 2}, 40, choice);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->tokens_before(), n);
  EXPECT_EQ(plan->tokens_after(), n - 40);
  const at::Tensor dst = plan->dst_positions()[0], src = plan->src_positions()[0];
  ASSERT_EQ(dst.numel(), (h / 2) * (w / 2));
  ASSERT_EQ(src.numel(), n - dst.numel());
  EXPECT_TRUE(at::equal(std::get<0>(at::cat({dst, src}).sort()), at::arange(n, at::kLong)));
  for (int64_t k = 0; k < dst.numel(); ++k) {
    const int64_t pos = dst[k].item<int64_t>(), y = pos / w, xx = pos % w;
    ASSERT_LT(y, h - 1) << "the bottom remainder row is always src";
    ASSERT_LT(xx, w - 1) << "the right remainder column is always src";
    const int64_t c = choice[0][y / 2][xx / 2].item<int64_t>();
    EXPECT_EQ((y % 2) * 2 + xx % 2, c) << "dst sits where the cell's choice says";
    if (k > 0) EXPECT_GT(pos, dst[k - 1].item<int64_t>()) << "dst positions in raster order";
  }
  EXPECT_EQ(plan->Merge(x).sizes(), (std::vector<int64_t>{2, n - 40, 8}));
  EXPECT_EQ(plan->Unmerge(plan->Merge(x)).sizes(), x.sizes());
  // r is clamped to the number of src tokens, as tomesd does.
  EXPECT_EQ(MergePlan::Build(x, {.w = w, .h = h, .sx = 2, .sy = 2}, n, choice)->tokens_after(), dst.numel());
  EXPECT_EQ(MergePlan::Build(x, {.w = w, .h = h, .sx = 2, .sy = 2}, 0, choice), nullptr);
}

TEST(MergePlan, MergeAveragesIntoDstAndUnmergeCopiesBack) {
  // Two token values on a 4x4 grid, top-left dst: every src has an identical dst, so merging r of them and
  // unmerging gives back exactly the input (means of equal small integers are exact).
  const int64_t h = 4, w = 4, n = 16;
  at::Tensor x = at::zeros({1, n, 3});
  for (int64_t i = 0; i < n; ++i) x[0][i].fill_((i / w) < 2 ? 1.0 : 2.0);
  x = x + at::arange(3).to(at::kFloat);
  auto plan = MergePlan::Build(x, {.w = w, .h = h, .sx = 2, .sy = 2}, 12, at::Tensor());
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->tokens_after(), 4);
  EXPECT_TRUE(at::equal(plan->Unmerge(plan->Merge(x)), x));
  // Merge is a mean with the dst included: one 2x2 cell, all three src merged into its top-left dst.
  const at::Tensor cell = at::randn({2, 4, 5});
  auto one = MergePlan::Build(cell, {.w = 2, .h = 2, .sx = 2, .sy = 2}, 3, at::Tensor());
  ASSERT_TRUE(one);
  EXPECT_TRUE(at::allclose(one->Merge(cell), cell.mean(1, /*keepdim=*/true), 1e-6, 1e-6));
  EXPECT_TRUE(at::equal(one->Unmerge(one->Merge(cell)), one->Merge(cell).expand({2, 4, 5})));
}

// The top-left (no_rand) partition is built once per grid and shared: a second plan reads the same tensor, and it
// equals the partition built from explicit all-zero (top-left) choices. Merge results do not depend on which.
TEST(MergePlan, TopLeftPartitionIsSharedAndEqualsExplicitChoices) {
  const int64_t h = 9, w = 13;  // leftover right/bottom tokens stay src
  const at::Tensor x = at::randn({2, h * w, 8});
  auto first = MergePlan::Build(x, {.w = w, .h = h, .sx = 3, .sy = 2}, 30, at::Tensor());
  auto second = MergePlan::Build(x + 1, {.w = w, .h = h, .sx = 3, .sy = 2}, 10, at::Tensor());
  auto explicit_choice =
      MergePlan::Build(x, {.w = w, .h = h, .sx = 3, .sy = 2}, 30, at::zeros({1, h / 2, w / 3}, at::kLong));
  ASSERT_TRUE(first && second && explicit_choice);
  EXPECT_EQ(first->dst_positions().data_ptr(), second->dst_positions().data_ptr());
  EXPECT_TRUE(at::equal(first->dst_positions(), explicit_choice->dst_positions()));
  EXPECT_TRUE(at::equal(first->src_positions(), explicit_choice->src_positions()));
  EXPECT_TRUE(at::equal(first->Merge(x), explicit_choice->Merge(x)));
  // Another grid gets its own partition.
  auto other = MergePlan::Build(x, {.w = w, .h = h, .sx = 2, .sy = 2}, 30, at::Tensor());
  ASSERT_TRUE(other);
  EXPECT_NE(other->dst_positions().data_ptr(), first->dst_positions().data_ptr());
  EXPECT_EQ(other->dst_positions().size(1), (h / 2) * (w / 2));
}

// Every whole cell of a w x h grid holds exactly one of `dst`; the right/bottom remainder holds none.
void ExpectOneDstPerCell(const at::Tensor& dst, int64_t h, int64_t w, int sx, int sy) {
  std::vector<int> per_cell((h / sy) * (w / sx), 0);
  for (int64_t k = 0; k < dst.numel(); ++k) {
    const int64_t pos = dst[k].item<int64_t>(), y = pos / w, x = pos % w;
    ASSERT_LT(y, (h / sy) * sy);
    ASSERT_LT(x, (w / sx) * sx);
    ++per_cell[(y / sy) * (w / sx) + x / sx];
  }
  for (int c : per_cell) EXPECT_EQ(c, 1);
}

std::vector<int64_t> TopLeft(int64_t h, int64_t w) {
  std::vector<int64_t> positions;
  for (int64_t y = 0; y + 1 < h; y += 2)
    for (int64_t x = 0; x + 1 < w; x += 2) positions.push_back(y * w + x);
  return positions;
}

TEST(TokenMergingHooks, PartitionsPerSampleSeedCfgHalvesShare) {
  auto hooks = Hooks({.ratio = 0.5, .use_rand = true, .seed = 9});
  const at::Tensor x = at::randn({4, 64, 8});
  const at::Tensor top_left = at::tensor(TopLeft(8, 8), at::kLong);
  // Two samples with guidance: rows [uncond 0, uncond 1, cond 0, cond 1].
  auto call = hooks->ForCall({.call_index = 0, .row_seeds = {5, 6, 5, 6},
                              .row_is_uncond = {true, true, false, false}, .row_sample = {0, 1, 0, 1}});
  auto plan = PlanFor(*call, x, 8, 8);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->tokens_after(), 32);
  const at::Tensor dst = plan->dst_positions();
  ASSERT_EQ(dst.size(0), 4);
  EXPECT_TRUE(at::equal(dst[0], dst[2]));   // uncond and cond half of sample 0
  EXPECT_TRUE(at::equal(dst[1], dst[3]));
  EXPECT_FALSE(at::equal(dst[0], dst[1]));  // different samples, different partitions
  for (int64_t row = 0; row < 4; ++row) {
    ExpectOneDstPerCell(dst[row], 8, 8, 2, 2);
    EXPECT_FALSE(at::equal(dst[row], top_left)) << "random, not every cell's top-left";
  }
  // A sample's partition does not depend on its batch-mates.
  auto alone = hooks->ForCall({.call_index = 0, .row_seeds = {6, 6}, .row_is_uncond = {true, false},
                               .row_sample = {0, 0}});
  EXPECT_TRUE(at::equal(PlanFor(*alone, x.slice(0, 0, 2), 8, 8)->dst_positions()[0], dst[1]));
  // Another seed of the settings, another partition.
  auto reseeded = Hooks({.ratio = 0.5, .use_rand = true, .seed = 10})
                      ->ForCall({.call_index = 0, .row_seeds = {6, 6}, .row_is_uncond = {true, false},
                                 .row_sample = {0, 0}});
  EXPECT_FALSE(at::equal(PlanFor(*reseeded, x.slice(0, 0, 2), 8, 8)->dst_positions()[0], dst[1]));

  // A sample without guidance (one row) uses the top-left of every cell (tomesd's odd-batch rule, per sample);
  // a guided batch-mate keeps its random partition: rows [uncond 0, cond 0, cond 1].
  auto mixed = hooks->ForCall({.call_index = 0, .row_seeds = {6, 6, 7}, .row_is_uncond = {true, false, false},
                               .row_sample = {0, 0, 1}});
  const at::Tensor mixed_dst = PlanFor(*mixed, x.slice(0, 0, 3), 8, 8)->dst_positions();
  ASSERT_EQ(mixed_dst.size(0), 3);
  EXPECT_TRUE(at::equal(mixed_dst[0], dst[1]));
  EXPECT_TRUE(at::equal(mixed_dst[1], dst[1]));
  EXPECT_TRUE(at::equal(mixed_dst[2], top_left));
  // No guided sample at all: top-left everywhere.
  auto odd = hooks->ForCall({.call_index = 0, .row_seeds = {5, 6, 7}, .row_is_uncond = {false, false, false},
                             .row_sample = {0, 1, 2}});
  const at::Tensor fixed = PlanFor(*odd, x.slice(0, 0, 3), 8, 8)->dst_positions();
  ASSERT_EQ(fixed.size(0), 1);
  EXPECT_TRUE(at::equal(fixed[0], top_left));
  // Without row information the batch-wide rule applies: an odd batch is top-left, an even one shares a draw.
  auto bare_odd = hooks->ForCall({});
  EXPECT_TRUE(at::equal(PlanFor(*bare_odd, x.slice(0, 0, 3), 8, 8)->dst_positions()[0], top_left));
  auto bare_even = hooks->ForCall({});
  const at::Tensor shared = PlanFor(*bare_even, x, 8, 8)->dst_positions();
  ASSERT_EQ(shared.size(0), 1);
  ExpectOneDstPerCell(shared[0], 8, 8, 2, 2);

  ASSERT_EQ(hooks->MergeCounts().size(), 1u);
  EXPECT_EQ(hooks->MergeCounts()[0], (BlockMergeCount{"down_blocks.0.attentions.0.transformer_blocks.0", 64, 32}));
}

TEST(TokenMergingHooks, RandomPartitionsOnOddGridsAndOtherStrides) {
  // 9x13 tokens with 3x3 cells: 3x4 whole cells, the last column is always src.
  auto hooks = Hooks({.ratio = 0.5, .sx = 3, .sy = 3, .use_rand = true, .seed = 1});
  const at::Tensor x = at::randn({2, 9 * 13, 8});
  auto call = hooks->ForCall({.call_index = 2, .row_seeds = {1, 1}, .row_is_uncond = {true, false},
                              .row_sample = {0, 0}});
  auto plan = PlanFor(*call, x, 9, 13);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->tokens_after(), 117 - 58);  // r = int(117 * 0.5)
  ExpectOneDstPerCell(plan->dst_positions()[0], 9, 13, 3, 3);
}

TEST(MergePlan, RejectsMalformedInputs) {
  const at::Tensor x = at::randn({2, 16, 4});
  EXPECT_THROW(MergePlan::Build(x, {.w = 4, .h = 4, .sx = 2, .sy = 2}, 4, at::full({1, 2, 2}, 4, at::kLong)),
               c10::Error);
  EXPECT_THROW(MergePlan::Build(x, {.w = 4, .h = 4, .sx = 2, .sy = 2}, 4, at::zeros({3, 2, 2}, at::kLong)),
               c10::Error);
  EXPECT_THROW(MergePlan::Build(x, {.w = 4, .h = 4, .sx = 0, .sy = 2}, 4, at::Tensor()), c10::Error);
  auto plan = MergePlan::Build(x, {.w = 4, .h = 4, .sx = 2, .sy = 2}, 4, at::Tensor());
  ASSERT_TRUE(plan);
  EXPECT_THROW(plan->Merge(at::randn({2, 20, 4})), c10::Error);
  EXPECT_THROW(plan->Unmerge(at::randn({2, 16, 4})), c10::Error);
}

TEST(TokenMerging, CanonicalDropsWhatCannotMatter) {
  EXPECT_EQ(Canonical({.ratio = 0, .sx = 3, .seed = 4}), TokenMerging{.ratio = 0});
  EXPECT_EQ(Canonical({.ratio = 0.5, .merge_attn = false}), TokenMerging{.ratio = 0});
  EXPECT_EQ(Canonical({.ratio = 0.5, .use_rand = false, .seed = 4}).seed, 0u);
  EXPECT_EQ(Canonical({.ratio = 0.5, .seed = 4}).seed, 4u);
}

TEST(TokenMergingValidate, RejectsWhatTomesdMishandles) {
  EXPECT_TRUE(Validate({}).ok());
  EXPECT_TRUE(Validate({.ratio = 0.75}).ok());
  const absl::Status over = Validate({.ratio = 0.8});
  EXPECT_EQ(over.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(over.message(), HasSubstr("tome.ratio must be in [0, 0.75]"));
  EXPECT_THAT(Validate({.ratio = 0.6, .sx = 1, .sy = 2}).message(), HasSubstr("[0, 0.5]"));
  EXPECT_THAT(Validate({.ratio = 0.9, .sx = 3, .sy = 3}).ToString(), HasSubstr("0.888889"));
  EXPECT_THAT(Validate({.ratio = -0.1}).message(), HasSubstr("tome.ratio"));
  EXPECT_THAT(Validate({.ratio = std::nan("")}).message(), HasSubstr("tome.ratio"));
  EXPECT_THAT(Validate({.max_downsample = 3}).message(), HasSubstr("tome.max_downsample must be one of 1, 2, 4, 8"));
  EXPECT_THAT(Validate({.sx = 0}).message(), HasSubstr("tome.sx must be in [1, 16]"));
  EXPECT_THAT(Validate({.sy = 17}).message(), HasSubstr("tome.sy"));
  EXPECT_FALSE(TokenMergingHooks::Create({.ratio = 2}).ok());
}

}  // namespace
}  // namespace tomeserve::tome
