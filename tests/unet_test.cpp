// UNet2DConditionModel parity with diffusers, the Token Merging hook seam, config validation. References come
// from scripts/reference_unet.py on the same random-weight models (ctest fixtures). Tolerance: relative L2
// <= 1e-5 in fp32: same ops in the same order; what remains is kernel summation order (it even depends on the
// weights' memory alignment in MKL's sgemm), ~1e-7 per op, measured <= 1e-6 over the whole UNet.
#include "pipeline/unet.h"

#include <ATen/Context.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "pipeline/load_weights.h"
#include "pipeline/model_config.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {
namespace {

using ::tomeserve::test::EnvPath;
using ::tomeserve::test::RelErr;

namespace fs = std::filesystem;
using ::testing::HasSubstr;


fs::path UNetDir(const std::string& preset) {
  return EnvPath(preset == "tiny"      ? "TOMESERVE_TINY_MODEL"
                 : preset == "tiny_xl" ? "TOMESERVE_TINY_XL_MODEL"
                                       : "TOMESERVE_SD15_MODEL") /
         "unet";
}


struct Case {
  std::string name;
  at::Tensor sample, timesteps, encoder_hidden_states, out;
  std::optional<UNetAddedConditions> added;  // SDXL ("text_time") models
};

std::vector<Case> LoadCases(const std::string& preset) {
  fs::path file = EnvPath("TOMESERVE_REF_DIR") / ("unet_" + preset + ".safetensors");
  auto store = WeightStore::OpenFile(file);
  EXPECT_TRUE(store.ok()) << store.status();
  if (!store.ok()) return {};
  std::vector<Case> cases;
  for (const std::string& key : store->Names()) {
    if (!absl::EndsWith(key, ".out")) continue;
    const std::string name = key.substr(0, key.size() - 4);
    auto read = [&](const char* field) { return ReadTensor(*store, name + field).value(); };
    cases.push_back(
        {name, read(".sample"), read(".timesteps"), read(".encoder_hidden_states"), read(".out"), std::nullopt});
    if (store->Find(name + ".text_embeds") != nullptr) {
      cases.back().added = UNetAddedConditions{read(".text_embeds"), read(".time_ids")};
    }
  }
  EXPECT_FALSE(cases.empty()) << file;
  return cases;
}

// Models are large (sd15: 3.4 GB in fp32): load each once per process and share it across tests, which is
// also what the server does (forward is const).
std::shared_ptr<UNet2DConditionModelImpl> CpuModel(const std::string& preset) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<UNet2DConditionModelImpl>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[preset];
  if (!slot) {
    auto model = UNet2DConditionModelImpl::Load(UNetDir(preset), {});
    EXPECT_TRUE(model.ok()) << model.status();
    if (model.ok()) slot = *model;
  }
  return slot;
}

bool HaveReferences() {
  return !EnvPath("TOMESERVE_REF_DIR").empty() && !EnvPath("TOMESERVE_TINY_MODEL").empty();
}
// The tiny-xl preset's model is generated where TOMESERVE_TINY_XL_MODEL says (ctest's fixture, the GPU script).
bool HaveModel(const std::string& preset) {
  return preset != "tiny_xl" || !EnvPath("TOMESERVE_TINY_XL_MODEL").empty();
}

class UNetParity : public ::testing::TestWithParam<std::string> {};

TEST_P(UNetParity, MatchesDiffusersFp32) {
  if (!HaveReferences() || !HaveModel(GetParam())) GTEST_SKIP() << "TOMESERVE_REF_DIR / model paths not set";
  auto model = CpuModel(GetParam());
  ASSERT_TRUE(model);
  at::NoGradGuard no_grad;
  double max_err = 0;
  for (const Case& c : LoadCases(GetParam())) {
    at::Tensor out = model->forward(c.sample, c.timesteps, c.encoder_hidden_states, nullptr,
                                    c.added ? &*c.added : nullptr);
    ASSERT_EQ(out.sizes(), c.out.sizes()) << c.name;
    const double err = RelErr(out, c.out);
    max_err = std::max(max_err, err);
    EXPECT_LE(err, 1e-5) << GetParam() << " " << c.name;
    std::printf("[%s] %s rel err %.3g (|want| %.3g)\n", GetParam().c_str(), c.name.c_str(), err,
                c.out.norm().item<double>());
  }
  RecordProperty("max_rel_err", std::to_string(max_err));
  std::printf("[%s] max rel err %.3g\n", GetParam().c_str(), max_err);
}

TEST_P(UNetParity, ScalarAndIntegerTimestepsMatchAVector) {
  if (!HaveReferences() || !HaveModel(GetParam())) GTEST_SKIP() << "TOMESERVE_REF_DIR / model paths not set";
  auto model = CpuModel(GetParam());
  ASSERT_TRUE(model);
  at::NoGradGuard no_grad;
  // This checks the timestep plumbing, not the network: one case, every batch element at its first timestep.
  // A 0-dim int64 tensor and an int32 [1] expand like diffusers' timesteps[None].expand(B).
  const Case c = LoadCases(GetParam()).at(0);
  const UNetAddedConditions* added = c.added ? &*c.added : nullptr;
  const int64_t t = static_cast<int64_t>(c.timesteps[0].item<float>());
  at::Tensor want = model->forward(c.sample, at::full({c.sample.size(0)}, t, at::kFloat), c.encoder_hidden_states,
                                   nullptr, added);
  EXPECT_TRUE(at::equal(
      model->forward(c.sample, at::scalar_tensor(t, at::kLong), c.encoder_hidden_states, nullptr, added), want));
  EXPECT_TRUE(at::equal(
      model->forward(c.sample, at::full({1}, t, at::kInt), c.encoder_hidden_states, nullptr, added), want));
}

INSTANTIATE_TEST_SUITE_P(Presets, UNetParity, ::testing::Values("tiny", "sd15", "tiny_xl"));

// ---- The Token Merging seam ----

struct Recorded {
  std::string path;
  int64_t latent_height, latent_width;
  std::vector<int64_t> x_shape;
};

class RecordingHook : public TransformerBlockHook {
 public:
  BlockTokenOps ForBlock(const BlockContext& ctx, const at::Tensor& x) override {
    calls.push_back({std::string(ctx.path), ctx.latent_height, ctx.latent_width, x.sizes().vec()});
    return ops ? ops(ctx, x) : BlockTokenOps{};
  }
  std::function<BlockTokenOps(const BlockContext&, const at::Tensor&)> ops;
  std::vector<Recorded> calls;
};

// Keeps every other token; Unmerge writes the processed tokens back to their slots and the rest as zeros.
// Records the tensors it sees.
class HalvingOps : public TokenOps {
 public:
  explicit HalvingOps(int64_t tokens) : tokens_(tokens) {}
  at::Tensor Merge(const at::Tensor& x) const override {
    merged_inputs.push_back(x);
    return x.slice(1, 0, tokens_, 2);
  }
  at::Tensor Unmerge(const at::Tensor& x) const override {
    unmerged_inputs.push_back(x);
    at::Tensor out = at::zeros({x.size(0), tokens_, x.size(2)}, x.options());
    out.slice(1, 0, tokens_, 2).copy_(x);
    return out;
  }
  mutable std::vector<at::Tensor> merged_inputs, unmerged_inputs;  // test-only bookkeeping, one thread

 private:
  int64_t tokens_;
};

class IdentityOps : public TokenOps {
 public:
  at::Tensor Merge(const at::Tensor& x) const override { return x; }
  at::Tensor Unmerge(const at::Tensor& x) const override { return x; }
};

// The 16 BasicTransformerBlocks of the SD 1.x layout (the tiny model has the same): 6 down, 1 mid, 9 up.
std::vector<std::string> Sd1BlockPaths() {
  std::vector<std::string> paths;
  for (int d : {0, 1, 2}) {
    for (int m : {0, 1})
      paths.push_back(absl::StrCat("down_blocks.", d, ".attentions.", m, ".transformer_blocks.0"));
  }
  paths.push_back("mid_block.attentions.0.transformer_blocks.0");
  for (int u : {1, 2, 3}) {
    for (int m : {0, 1, 2})
      paths.push_back(absl::StrCat("up_blocks.", u, ".attentions.", m, ".transformer_blocks.0"));
  }
  return paths;
}

class UNetHookTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveReferences()) GTEST_SKIP() << "TOMESERVE_REF_DIR / model paths not set";
    model_ = CpuModel("tiny");
    ASSERT_TRUE(model_);
    for (Case& c : LoadCases("tiny")) {
      if (c.name == "b2_9x13") case_ = c;
    }
    ASSERT_TRUE(case_.sample.defined()) << "reference case b2_9x13 missing";
  }
  at::Tensor Run(TransformerBlockHook* hook) const {
    return model_->forward(case_.sample, case_.timesteps, case_.encoder_hidden_states, hook);
  }
  std::shared_ptr<UNet2DConditionModelImpl> model_;
  Case case_;
  at::NoGradGuard no_grad_;
};

TEST_F(UNetHookTest, HookWithoutOpsIsBitIdentical) {
  RecordingHook hook;  // returns empty BlockTokenOps
  EXPECT_TRUE(at::equal(Run(&hook), Run(nullptr)));
  RecordingHook identity;
  identity.ops = [](const BlockContext&, const at::Tensor&) {
    auto id = std::make_shared<IdentityOps>();
    return BlockTokenOps{id, id, id};
  };
  EXPECT_TRUE(at::equal(Run(&identity), Run(nullptr)));
}

TEST_F(UNetHookTest, SeesEveryTransformerBlockOncePerCall) {
  RecordingHook hook;
  Run(&hook);
  const std::vector<std::string> expected = Sd1BlockPaths();
  ASSERT_EQ(hook.calls.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(hook.calls[i].path, expected[i]);
    EXPECT_EQ(hook.calls[i].latent_height, 9);
    EXPECT_EQ(hook.calls[i].latent_width, 13);
    ASSERT_EQ(hook.calls[i].x_shape.size(), 3u);
    EXPECT_EQ(hook.calls[i].x_shape[0], 2);
  }
  EXPECT_EQ(hook.calls[0].x_shape[1], 9 * 13);  // level 0 runs at full resolution
  Run(&hook);
  EXPECT_EQ(hook.calls.size(), 2 * expected.size());
}

TEST_F(UNetHookTest, AttnOpsWrapSelfAttentionOnly) {
  RecordingHook hook;
  std::vector<std::shared_ptr<HalvingOps>> ops;
  std::vector<at::Tensor> block_inputs;
  hook.ops = [&](const BlockContext&, const at::Tensor& x) {
    ops.push_back(std::make_shared<HalvingOps>(x.size(1)));
    block_inputs.push_back(x);
    return BlockTokenOps{.attn = ops.back()};
  };
  at::Tensor merged = Run(&hook);
  EXPECT_FALSE(at::equal(merged, Run(nullptr)));
  EXPECT_TRUE(at::isfinite(merged).all().item<bool>());
  ASSERT_EQ(ops.size(), 16u);
  auto params = model_->named_parameters();
  for (size_t i = 0; i < ops.size(); ++i) {
    // Exactly one Merge and one Unmerge per block: only attn1 is wrapped.
    ASSERT_EQ(ops[i]->merged_inputs.size(), 1u) << hook.calls[i].path;
    ASSERT_EQ(ops[i]->unmerged_inputs.size(), 1u) << hook.calls[i].path;
    // Merge sees norm1(x) of the block input...
    const std::string& path = hook.calls[i].path;
    at::Tensor norm1 = at::layer_norm(block_inputs[i], {block_inputs[i].size(2)},
                                      params[path + ".norm1.weight"], params[path + ".norm1.bias"], 1e-5);
    EXPECT_TRUE(at::equal(ops[i]->merged_inputs[0], norm1)) << path;
    // ...and Unmerge sees attn1's output on the merged tokens.
    const int64_t tokens = block_inputs[i].size(1);
    EXPECT_EQ(ops[i]->unmerged_inputs[0].size(1), (tokens + 1) / 2) << path;
    EXPECT_EQ(ops[i]->unmerged_inputs[0].size(2), block_inputs[i].size(2)) << path;
  }
}

TEST_F(UNetHookTest, ConcurrentForwardsAgree) {
  const at::Tensor want = Run(nullptr);
  std::vector<at::Tensor> got(3);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i) {
    threads.emplace_back([&, i] {
      at::NoGradGuard no_grad;
      got[i] = Run(nullptr);
    });
  }
  for (std::thread& t : threads) t.join();
  for (const at::Tensor& g : got) EXPECT_TRUE(at::equal(g, want));
}

// ---- Config ----

nlohmann::json TinyConfigJson() {
  auto j = ReadJsonFile(UNetDir("tiny") / "config.json");
  EXPECT_TRUE(j.ok()) << j.status();
  return j.ok() ? *j : nlohmann::json::object();
}

TEST(UNetConfigTest, ReadsTinyAndSd15) {
  if (EnvPath("TOMESERVE_TINY_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  auto tiny = UNet2DConditionConfig::FromJson(TinyConfigJson(), "tiny");
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  EXPECT_EQ(tiny->block_out_channels, (std::vector<int64_t>{32, 32, 64, 64}));
  EXPECT_EQ(tiny->num_attention_heads, (std::vector<int64_t>{4, 4, 4, 4}));  // from "attention_head_dim"
  EXPECT_EQ(tiny->norm_num_groups, 8);
  EXPECT_EQ(tiny->time_embed_dim(), 128);
  if (EnvPath("TOMESERVE_SD15_MODEL").empty()) return;
  auto sd15 = UNet2DConditionConfig::Load(UNetDir("sd15") / "config.json");
  ASSERT_TRUE(sd15.ok()) << sd15.status();
  EXPECT_EQ(sd15->num_attention_heads, (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_EQ(sd15->cross_attention_dim, (std::vector<int64_t>{768, 768, 768, 768}));
  EXPECT_EQ(sd15->sample_height, 64);
}

TEST(UNetConfigTest, MathChangingKeysAreRejectedByName) {
  if (EnvPath("TOMESERVE_TINY_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  // [key, value] pairs, each of which would change the math (diffusers supports them; we do not).
  const nlohmann::json bad = nlohmann::json::parse(R"([
    ["class_embed_type", "timestep"], ["num_class_embeds", 10], ["addition_embed_type", "text_time"],
    ["addition_embed_type", "image"],
    ["encoder_hid_dim", 32], ["time_cond_proj_dim", 256], ["time_embedding_act_fn", "silu"],
    ["timestep_post_act", "silu"], ["resnet_time_scale_shift", "scale_shift"], ["dual_cross_attention", true],
    ["only_cross_attention", true], ["mid_block_type", "UNetMidBlock2DSimpleCrossAttn"],
    ["mid_block_type", null], ["attention_type", "gated"], ["time_embedding_type", "fourier"],
    ["num_attention_heads", 8], ["act_fn", "gelu"],
    ["down_block_types", ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]],
    ["transformer_layers_per_block", [[1, 1], [1, 1], [1, 1], [1, 1]]]])");
  for (const nlohmann::json& pair : bad) {
    const std::string key = pair[0].get<std::string>();
    const nlohmann::json& value = pair[1];
    nlohmann::json j = TinyConfigJson();
    j[key] = value;
    auto config = UNet2DConditionConfig::FromJson(j, "unet/config.json");
    ASSERT_FALSE(config.ok()) << key << " = " << value.dump();
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(config.status().message(), HasSubstr("\"" + key + "\"")) << config.status();
  }
  // Keys diffusers ignores for these block types stay accepted.
  nlohmann::json j = TinyConfigJson();
  j["dropout"] = 0.1;
  j["cross_attention_norm"] = "group_norm";
  j["some_future_key"] = 1;
  EXPECT_TRUE(UNet2DConditionConfig::FromJson(j, "unet/config.json").ok());
}

TEST(UNetConfigTest, LoadNamesTheFileAndKey) {
  if (EnvPath("TOMESERVE_TINY_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  fs::path dir = fs::temp_directory_path() / ("tomeserve_unet_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  EXPECT_THAT(UNet2DConditionModelImpl::Load(dir, {}).status().message(), HasSubstr("config.json"));
  nlohmann::json j = TinyConfigJson();
  j["addition_embed_type"] = "text";
  std::ofstream(dir / "config.json") << j.dump();
  auto model = UNet2DConditionModelImpl::Load(dir, {});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("addition_embed_type"));
  EXPECT_THAT(model.status().message(), HasSubstr((dir / "config.json").string()));
  // A valid config over the wrong weights: the strict loader lists what is missing.
  j.erase("addition_embed_type");
  j["layers_per_block"] = 3;
  std::ofstream(dir / "config.json") << j.dump();
  fs::copy_file(UNetDir("tiny") / "diffusion_pytorch_model.safetensors",
                dir / "diffusion_pytorch_model.safetensors");
  model = UNet2DConditionModelImpl::Load(dir, {});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("down_blocks.0.attentions.2."));
  // Not fs::remove_all: the libtorch wheel exports its own copy, which crashes (null call) when linked to.
  for (const char* name : {"config.json", "diffusion_pytorch_model.safetensors"})
    std::remove((dir / name).c_str());
  std::remove(dir.c_str());
}

// ---- CUDA ----

TEST_P(UNetParity, MatchesDiffusers_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible";
  if (!HaveReferences() || !HaveModel(GetParam())) GTEST_SKIP() << "TOMESERVE_REF_DIR / model paths not set";
  const c10::Device cuda(c10::kCUDA, 0);
  // cuDNN convolutions default to TF32 (10-bit mantissa), as in PyTorch; the 1e-5 bound needs IEEE fp32.
  const bool tf32 = at::globalContext().allowTF32CuDNN();
  at::globalContext().setAllowTF32CuDNN(false);
  at::NoGradGuard no_grad;
  std::vector<Case> cases = LoadCases(GetParam());
  {
    auto fp32 = UNet2DConditionModelImpl::Load(UNetDir(GetParam()), {cuda, c10::kFloat});
    ASSERT_TRUE(fp32.ok()) << fp32.status();
    for (const Case& c : cases) {
      std::optional<UNetAddedConditions> added;
      if (c.added) added = UNetAddedConditions{c.added->text_embeds.to(cuda), c.added->time_ids.to(cuda)};
      at::Tensor out = (*fp32)->forward(c.sample.to(cuda), c.timesteps.to(cuda), c.encoder_hidden_states.to(cuda),
                                        nullptr, added ? &*added : nullptr);
      const double err = RelErr(out, c.out);
      std::printf("[%s cuda fp32] %s rel err %.3g\n", GetParam().c_str(), c.name.c_str(), err);
      EXPECT_LE(err, 1e-5) << c.name;
    }
  }
  at::globalContext().setAllowTF32CuDNN(tf32);
  auto fp16 = UNet2DConditionModelImpl::Load(UNetDir(GetParam()), {cuda, c10::kHalf});
  ASSERT_TRUE(fp16.ok()) << fp16.status();
  for (const Case& c : cases) {
    std::optional<UNetAddedConditions> added;
    if (c.added) added = UNetAddedConditions{c.added->text_embeds.to(cuda, c10::kHalf), c.added->time_ids.to(cuda)};
    at::Tensor out = (*fp16)->forward(c.sample.to(cuda, c10::kHalf), c.timesteps.to(cuda),
                                      c.encoder_hidden_states.to(cuda, c10::kHalf), nullptr,
                                      added ? &*added : nullptr);
    EXPECT_EQ(out.scalar_type(), c10::kHalf);
    const double err = RelErr(out, c.out);
    std::printf("[%s cuda fp16] %s rel err %.3g\n", GetParam().c_str(), c.name.c_str(), err);
    EXPECT_LE(err, 2e-2) << c.name;  // fp16: 11 mantissa bits, rounding accumulates over ~100 layers
  }
}

}  // namespace
}  // namespace tomeserve::pipeline
