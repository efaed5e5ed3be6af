// CUDA graphs for UNet calls (pipeline/unet_graphs.h) and the call layout they rely on (pipeline/unet_call.h).
// On the CPU: the layout of a call's rows and its key (equal for calls that differ only in values, different for
// calls that launch different work, none for rows out of canonical order), padding that leaves the real rows alone, and the data flow of a replay — the
// hooks' uploads recorded once, refilled for a later call and read in place by a run of the same layout give
// that call's own result. On a CUDA device (_CUDA): denoising through graphs equals eager denoising, with the
// graphs captured and replayed, and the steps do not synchronise the host.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#ifdef TOMESERVE_HAVE_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "pipeline/denoise_batch.h"
#include "pipeline/stable_diffusion.h"
#include "pipeline/unet_call.h"
#include "pipeline/unet_graphs.h"
#include "tests/test_util.h"
#include "tests/tiny_model_fixture.h"
#include "tome/tome_hooks.h"

namespace tomeserve {
namespace {

using pipeline::RecordedHookInputs;
using pipeline::UNetCall;
using pipeline::UNetGraphs;
using ::tomeserve::test::EnvPath;
using ::tomeserve::test::Hooks;

// A factory that cannot be captured (no CaptureKey): plain blocks.
class OpaqueHooks final : public pipeline::HookFactory {
 public:
  std::unique_ptr<pipeline::TransformerBlockHook> ForCall(const pipeline::UNetCallInfo&) const override {
    return nullptr;
  }
};

// Six rows in DenoiseBatch's canonical order for three guided samples: sample 0 plain (rows 0-1), samples 1 and 2
// under `tome` (rows 2-5), each sample's unconditional half before its conditional one. `step` and `seed`
// change only values.
UNetCall MakeCall(const pipeline::UNet2DConditionModelImpl& unet, const pipeline::HookFactory* tome, int step,
                  uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  UNetCall call{.sample = at::randn({6, 4, 8, 8}, gen),
                .timesteps = at::full({6}, 900.f - 100.f * static_cast<float>(step)),
                .encoder_hidden_states = at::randn({6, 77, unet.config().cross_attention_dim.at(0)}, gen)};
  UNetCall::Group plain{.factory = nullptr, .info = {.call_index = step}};
  UNetCall::Group merged{.factory = tome, .info = {.call_index = step}};
  for (int64_t r = 0; r < 6; ++r) {
    const int sample = static_cast<int>(r / 2);
    UNetCall::Group& g = sample == 0 ? plain : merged;
    g.rows.push_back(r);
    g.info.row_seeds.push_back(seed + static_cast<uint64_t>(sample));
    g.info.row_is_uncond.push_back(r % 2 == 0);
    g.info.row_sample.push_back(sample);
    g.info.row_call_index.push_back(step);
    g.info.row_hook_seeds.push_back(seed);
  }
  call.groups = {plain, merged};
  return call;
}

TEST(UNetGraphsTest, CreateNeedsACudaDevice) {
  auto graphs = UNetGraphs::Create(c10::Device(c10::kCPU), {});
  ASSERT_FALSE(graphs.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(graphs.status()) || absl::IsUnimplemented(graphs.status()))
      << graphs.status();
}

class UNetCallTest : public test::TinyModelTest {
 protected:
  c10::InferenceMode inference_;
};

TEST_F(UNetCallTest, LayoutKeyIgnoresValuesAndSeparatesWork) {
  const auto& unet = sd_->unet();
  const auto tome = Hooks({.ratio = 0.5, .max_downsample = 2});
  const auto same_settings = Hooks({.ratio = 0.5, .max_downsample = 2});
  const auto other = Hooks({.ratio = 0.3, .max_downsample = 2});
  const std::optional<std::string> key = UNetGraphs::LayoutKey(MakeCall(unet, tome.get(), 0, 1), 8);
  ASSERT_TRUE(key.has_value());
  EXPECT_EQ(UNetGraphs::LayoutKey(MakeCall(unet, tome.get(), 3, 2), 8), key);  // other step, seeds, values
  EXPECT_EQ(UNetGraphs::LayoutKey(MakeCall(unet, same_settings.get(), 0, 1), 8), key);
  EXPECT_NE(UNetGraphs::LayoutKey(MakeCall(unet, other.get(), 0, 1), 8), key);
  EXPECT_NE(UNetGraphs::LayoutKey(MakeCall(unet, tome.get(), 0, 1), 16), key);
  const std::optional<pipeline::CallLayout> layout = UNetGraphs::Layout(MakeCall(unet, tome.get(), 0, 1));
  ASSERT_TRUE(layout.has_value());
  ASSERT_EQ(layout->groups.size(), 2u);
  EXPECT_EQ(layout->groups[0].settings, "");
  EXPECT_EQ(layout->groups[0].pairs, 1);
  EXPECT_EQ(layout->groups[1].settings, *tome->CaptureKey());
  EXPECT_EQ(layout->groups[1].pairs, 2);
  EXPECT_EQ(layout->groups[1].singles, 0);
  // Rows out of canonical order have no layout (they run eagerly): halves of different samples side by side,
  // a group's rows not contiguous.
  UNetCall unpaired = MakeCall(unet, tome.get(), 0, 1);
  unpaired.groups[1].info.row_sample = {1, 2, 3, 4};
  EXPECT_FALSE(UNetGraphs::LayoutKey(unpaired, 8).has_value());
  UNetCall interleaved = MakeCall(unet, tome.get(), 0, 1);
  std::swap(interleaved.groups[0].rows[1], interleaved.groups[1].rows[0]);
  EXPECT_FALSE(UNetGraphs::LayoutKey(interleaved, 8).has_value());
  UNetCall wider = MakeCall(unet, tome.get(), 0, 1);
  wider.sample = at::randn({6, 4, 8, 10});
  EXPECT_NE(UNetGraphs::LayoutKey(wider, 8), key);
  const OpaqueHooks opaque;
  EXPECT_FALSE(UNetGraphs::LayoutKey(MakeCall(unet, &opaque, 0, 1), 8).has_value());
}

TEST_F(UNetCallTest, PaddingLeavesTheRealRowsAlone) {
  const auto& unet = sd_->unet();
  const auto tome = Hooks({.ratio = 0.5, .max_downsample = 2});
  const UNetCall call = MakeCall(unet, tome.get(), 1, 7);
  const UNetCall padded = pipeline::PadRows(call, 8);
  ASSERT_EQ(padded.rows(), 8);
  EXPECT_EQ(padded.groups.back().rows, (std::vector<int64_t>{2, 3, 4, 5, 6, 7}));
  const at::Tensor want = pipeline::RunUNetCall(unet, call);
  const at::Tensor got = pipeline::RunUNetCall(unet, padded).narrow(0, 0, 6);
  // The CPU kernels block their work by row count: last-bit differences only (see step_batch_test).
  EXPECT_LE(test::RelErr(got, want), 1e-5);
}

// SDXL's added conditions are padded with the rest (zero rows) and travel with the call.
TEST(UNetCallSdxlTest, PaddingCarriesTheAddedConditions) {
  if (EnvPath("TOMESERVE_TINY_XL_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_XL_MODEL not set";
  c10::InferenceMode inference;
  auto sd = pipeline::StableDiffusion::Create({EnvPath("TOMESERVE_TINY_XL_MODEL"), {}});
  ASSERT_TRUE(sd.ok()) << sd.status();
  const auto& unet = (*sd)->unet();
  const auto tome = Hooks({.ratio = 0.5, .max_downsample = 2});
  UNetCall call = MakeCall(unet, tome.get(), 1, 7);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  call.added = {.text_embeds = at::randn({6, unet.config().pooled_text_dim()}, gen),
                .time_ids = at::tensor({64.0, 64.0, 0.0, 0.0, 64.0, 64.0}).repeat({6, 1})};
  const UNetCall padded = pipeline::PadRows(call, 8);
  ASSERT_EQ(padded.added.text_embeds.size(0), 8);
  ASSERT_EQ(padded.added.time_ids.size(0), 8);
  EXPECT_TRUE(at::equal(padded.added.time_ids.narrow(0, 6, 2), at::zeros({2, 6})));
  const at::Tensor want = pipeline::RunUNetCall(unet, call);
  const at::Tensor got = pipeline::RunUNetCall(unet, padded).narrow(0, 0, 6);
  EXPECT_LE(test::RelErr(got, want), 1e-5);
  UNetCall other = call;  // the added conditions matter: other pooled embeddings, other output
  other.added.text_embeds = at::randn_like(call.added.text_embeds);
  EXPECT_GT(test::RelErr(pipeline::RunUNetCall(unet, other), want), 1e-3);
}

// What a replay does, on the CPU: the hooks' uploads of a recording call become slots; refilled for another call
// they hold exactly what that call's hooks draw, and a run of the layout that reads the slots in place (as the
// captured graph does) gives that call's eager result.
TEST_F(UNetCallTest, RefilledHookInputsReplayAnotherCall) {
  const auto& unet = sd_->unet();
  const auto tome = Hooks({.ratio = 0.5, .max_downsample = 2, .seed = 4});
  const UNetCall first = MakeCall(unet, tome.get(), 0, 11);
  const UNetCall later = MakeCall(unet, tome.get(), 2, 12);

  std::vector<std::unique_ptr<RecordedHookInputs>> recorded;
  std::vector<pipeline::HookInputs*> raw;
  for (size_t g = 0; g < first.groups.size(); ++g) {
    recorded.push_back(std::make_unique<RecordedHookInputs>(c10::Device(c10::kCPU)));
    raw.push_back(recorded.back().get());
  }
  const at::Tensor first_out = pipeline::RunUNetCall(unet, first, raw);
  EXPECT_TRUE(first_out.equal(pipeline::RunUNetCall(unet, first)));
  EXPECT_TRUE(recorded[0]->slots().empty());  // the plain group uploads nothing
  ASSERT_FALSE(recorded[1]->slots().empty());  // one random partition per patched block

  // A fresh recording of the later call: what its hooks draw.
  RecordedHookInputs fresh(c10::Device(c10::kCPU));
  std::vector<pipeline::HookInputs*> fresh_raw = {nullptr, &fresh};
  const at::Tensor later_out = pipeline::RunUNetCall(unet, later, fresh_raw);
  ASSERT_EQ(fresh.slots().size(), recorded[1]->slots().size());

  std::vector<at::Tensor> first_draws;
  for (const at::Tensor& slot : recorded[1]->slots()) first_draws.push_back(slot.clone());
  const auto later_factory = Hooks({.ratio = 0.5, .max_downsample = 2, .seed = 4});  // equal settings
  for (size_t g = 0; g < recorded.size(); ++g) {
    recorded[g]->Refill(g == 0 ? nullptr : later_factory.get(), later.groups[g].info);
  }
  // The replayed call's factory gets the merge counts its hooks would have recorded.
  EXPECT_EQ(later_factory->MergeCounts(), tome->MergeCounts());
  EXPECT_FALSE(later_factory->MergeCounts().empty());
  bool any_changed = false;
  for (size_t i = 0; i < fresh.slots().size(); ++i) {
    EXPECT_TRUE(recorded[1]->slots()[i].equal(fresh.slots()[i])) << "slot " << i;
    any_changed = any_changed || !first_draws[i].equal(fresh.slots()[i]);
  }
  EXPECT_TRUE(any_changed);  // the later call draws other partitions

  // The "replay": the later call's tensors, the recorded slots read in place.
  for (auto& r : recorded) r->Rewind();
  const at::Tensor replayed = pipeline::RunUNetCall(unet, later, raw);
  EXPECT_TRUE(replayed.equal(later_out));
  EXPECT_FALSE(replayed.equal(first_out));
}

// Denoising through CUDA graphs equals eager denoising: mixed ToMe settings (random partitions refilled per
// replay), guidance on and off, several schedulers, 5 rows padded to 6 and 3 to 4, a sample leaving mid-way (a
// new layout). Graphs are captured and replayed, and replays do not synchronise the host.
TEST(UNetGraphsCudaTest, GraphStepsEqualEagerSteps_CUDA) {
#ifndef TOMESERVE_HAVE_CUDA
  GTEST_SKIP() << "built without c10_cuda";
#else
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (EnvPath("TOMESERVE_TINY_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  c10::InferenceMode inference;
  c10::cuda::CUDAStreamGuard stream(c10::cuda::getStreamFromPool(false, 0));  // graphs need a non-default stream
  // SD 1.x, then SDXL (its added conditions are static graph inputs too).
  for (const char* model : {"TOMESERVE_TINY_MODEL", "TOMESERVE_TINY_XL_MODEL"}) {
    SCOPED_TRACE(model);
    if (EnvPath(model).empty()) continue;
    auto sd = pipeline::StableDiffusion::Create({EnvPath(model), {c10::Device("cuda:0"), c10::kFloat}});
    ASSERT_TRUE(sd.ok()) << sd.status();
    const auto random = Hooks({.ratio = 0.5, .max_downsample = 2});
    const auto fixed = Hooks({.ratio = 0.3, .max_downsample = 1, .use_rand = false, .merge_mlp = true});
    const std::vector<pipeline::SampleSpec> specs = {
        {.prompt = "a", .seed = 1, .guidance_scale = 7.5, .num_inference_steps = 8,
         .scheduler = pipeline::SchedulerKind::kDdim, .hooks = random},
        {.prompt = "b", .seed = 2, .guidance_scale = 1.0, .num_inference_steps = 8,
         .scheduler = pipeline::SchedulerKind::kEulerAncestral, .hooks = fixed},
        {.prompt = "c", .seed = 3, .guidance_scale = 4.0, .num_inference_steps = 5,
         .scheduler = pipeline::SchedulerKind::kDpmpp2mKarras, .hooks = random, .hook_seed = 9}};
    auto graphs = UNetGraphs::Create(c10::Device("cuda:0"), {});
    ASSERT_TRUE(graphs.ok()) << graphs.status();
    std::vector<at::Tensor> finals[2];
    for (int use_graphs = 0; use_graphs < 2; ++use_graphs) {
      pipeline::DenoiseBatch batch(**sd, 8, 8);
      if (use_graphs) batch.set_graphs(graphs->get());
      for (const pipeline::SampleSpec& spec : specs) {
        auto prepared = (*sd)->PrepareSamples({.width = 64, .height = 64}, {spec});
        ASSERT_TRUE(prepared.ok()) << prepared.status();
        ASSERT_TRUE(batch.Add(std::move((*prepared)[0])).ok());
      }
      int steps = 0;
      while (!batch.Done()) {
        const bool check_sync = use_graphs && steps >= 3 && steps < 5;  // replays of the first layout
        if (check_sync) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
        const absl::Status s = batch.Step();
        if (check_sync) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
        ASSERT_TRUE(s.ok()) << s;
        ++steps;
      }
      for (int id : batch.ids()) finals[use_graphs].push_back(batch.sample(id).latents.cpu());
    }
    const UNetGraphs::Stats stats = (*graphs)->stats();
    EXPECT_EQ(stats.capture_failures, 0);
    EXPECT_GE(stats.captures, 2);  // 5 rows (padded to 6) while all three run, then 3 rows (padded to 4)
    EXPECT_GT(stats.padded_rows, 0);
    EXPECT_GE(stats.layouts, 2);
    EXPECT_GE(stats.replays, 4);
    ASSERT_EQ(finals[0].size(), finals[1].size());
    for (size_t i = 0; i < finals[0].size(); ++i) {
      // Padding changes the row count the GEMMs see: float32 last-bit differences, grown over 8 steps.
      EXPECT_LE(test::RelErr(finals[1][i], finals[0][i]), 1e-4) << "sample " << i;
    }
  }
#endif
}

}  // namespace
}  // namespace tomeserve
