// CLIP text encoder parity with transformers' CLIPTextModel (and, for SDXL, CLIPTextModelWithProjection). The reference outputs are written by
// scripts/reference_text_encoder.py from the same random-weight model folders (ctest fixtures).
// Tolerance: relative L2 error <= 1e-5 in fp32 (both sides run the same math in fp32; the remaining difference
// is summation order in matmul/attention kernels, ~1e-7 per op, well below 1e-5 over 12 layers).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <torch/cuda.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "nlohmann/json.hpp"
#include "pipeline/clip_text_model.h"
#include "pipeline/clip_tokenizer.h"
#include "pipeline/load_weights.h"
#include "pipeline/safetensors.h"
#include "pipeline/sdxl_text_encoder.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {
namespace {

using ::tomeserve::test::EnvPath;
using ::tomeserve::test::RelErr;

namespace fs = std::filesystem;
using ::testing::HasSubstr;



struct Reference {
  at::Tensor input_ids, last_hidden_state;
};

Reference LoadReference(const std::string& preset) {
  fs::path ref = EnvPath("TOMESERVE_REF_DIR") / ("text_encoder_" + preset + ".safetensors");
  auto store = WeightStore::OpenFile(ref);
  EXPECT_TRUE(store.ok()) << store.status();
  if (!store.ok()) return {};
  return {ReadTensor(*store, "input_ids").value().to(at::kLong), ReadTensor(*store, "last_hidden_state").value()};
}

fs::path ModelDir(const std::string& preset) {
  return EnvPath(preset == "tiny" ? "TOMESERVE_TINY_MODEL" : "TOMESERVE_SD15_MODEL") / "text_encoder";
}

class TextEncoderParity : public ::testing::TestWithParam<std::string> {};

// SDXL's two towers (tiny-xl): tokenizer/ + text_encoder/ (CLIPTextModel) and tokenizer_2/ (pads with "!") +
// text_encoder_2/ (CLIPTextModelWithProjection, gelu): our tokenizer gives transformers' ids for the same
// prompts, and the last and penultimate hidden states and the pooled (projected) output match in fp32.
TEST(SdxlTextTowers, MatchTransformersFp32) {
  const fs::path model = EnvPath("TOMESERVE_TINY_XL_MODEL");
  if (model.empty() || EnvPath("TOMESERVE_REF_DIR").empty()) GTEST_SKIP() << "tiny-xl fixtures not set";
  for (const std::string tower : {"1", "2"}) {
    const std::string suffix = tower == "1" ? "" : "_2";
    const fs::path ref_path = EnvPath("TOMESERVE_REF_DIR") / ("text_encoder_tiny_xl_" + tower + ".safetensors");
    auto file = SafetensorsFile::Open(ref_path);
    ASSERT_TRUE(file.ok()) << file.status();
    const nlohmann::json prompts = nlohmann::json::parse((*file)->metadata().at("prompts"));
    auto store = WeightStore::OpenFile(ref_path);
    ASSERT_TRUE(store.ok()) << store.status();
    const at::Tensor ids = ReadTensor(*store, "input_ids").value().to(at::kLong);

    auto tokenizer = ClipTokenizer::Load(model / ("tokenizer" + suffix));
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    EXPECT_EQ((*tokenizer)->pad_id(), tower == "1" ? (*tokenizer)->eos_id() : 0);  // "!" is id 0
    for (size_t i = 0; i < prompts.size(); ++i) {
      const std::vector<int32_t> ours = (*tokenizer)->EncodePadded(prompts[i].get<std::string>());
      const at::Tensor row = ids[static_cast<int64_t>(i)].to(at::kInt).contiguous();
      EXPECT_EQ(ours, std::vector<int32_t>(row.data_ptr<int32_t>(), row.data_ptr<int32_t>() + row.numel()))
          << "tower " << tower << " prompt " << i;
    }

    auto encoder = ClipTextModelImpl::Load(model / ("text_encoder" + suffix), {c10::Device(c10::kCPU), c10::kFloat});
    ASSERT_TRUE(encoder.ok()) << encoder.status();
    EXPECT_EQ((*encoder)->config().projection_dim, tower == "1" ? 0 : 32);
    at::NoGradGuard no_grad;
    const ClipTextOutput out = (*encoder)->Encode(ids);
    for (const auto& [name, got] : {std::pair{"last_hidden_state", out.last_hidden_state},
                                    std::pair{"penultimate_hidden_state", out.penultimate},
                                    std::pair{"pooled", out.pooled}}) {
      const at::Tensor want = ReadTensor(*store, name).value();
      ASSERT_EQ(got.sizes(), want.sizes()) << tower << " " << name;
      const double err = RelErr(got, want);
      std::printf("tiny-xl tower %s %s rel_err %.3g\n", tower.c_str(), name, err);
      EXPECT_LE(err, 1e-5) << tower << " " << name;
    }
  }
}

// SDXL's prompt encoding (SdxlTextEncoder) against StableDiffusionXLPipeline.encode_prompt on tiny-xl: the two
// towers' penultimate states side by side, tower 2's pooled output, and force_zeros_for_empty_prompt's zero
// negatives.
TEST(SdxlTextEncoder, MatchesTheDiffusersPipelineFp32) {
  const fs::path model = EnvPath("TOMESERVE_TINY_XL_MODEL");
  if (model.empty() || EnvPath("TOMESERVE_REF_DIR").empty()) GTEST_SKIP() << "tiny-xl fixtures not set";
  const fs::path ref_path = EnvPath("TOMESERVE_REF_DIR") / "text_encoder_tiny_xl_xl.safetensors";
  auto file = SafetensorsFile::Open(ref_path);
  ASSERT_TRUE(file.ok()) << file.status();
  const nlohmann::json prompts = nlohmann::json::parse((*file)->metadata().at("prompts"));
  auto store = WeightStore::OpenFile(ref_path);
  ASSERT_TRUE(store.ok()) << store.status();
  auto encoder = SdxlTextEncoder::Load(model, {c10::Device(c10::kCPU), c10::kFloat});
  ASSERT_TRUE(encoder.ok()) << encoder.status();
  EXPECT_EQ((*encoder)->embed_dim(), 64);
  EXPECT_EQ((*encoder)->pooled_dim(), 32);
  const SdxlTextEncoder::Encoded ours = (*encoder)->Encode(prompts.get<std::vector<std::string>>());
  const SdxlTextEncoder::Encoded zeros = (*encoder)->Zeros(static_cast<int64_t>(prompts.size()));
  for (const auto& [name, got] : {std::pair{"prompt_embeds", ours.embeds}, std::pair{"pooled_prompt_embeds", ours.pooled},
                                  std::pair{"negative_prompt_embeds", zeros.embeds},
                                  std::pair{"negative_pooled_prompt_embeds", zeros.pooled}}) {
    const at::Tensor want = ReadTensor(*store, name).value();
    ASSERT_EQ(got.sizes(), want.sizes()) << name;
    const double err = want.abs().max().item<double>() == 0 ? (got - want).abs().max().item<double>() : RelErr(got, want);
    std::printf("tiny-xl encode_prompt %s error %.3g\n", name, err);
    EXPECT_LE(err, 1e-5) << name;
  }
}

TEST_P(TextEncoderParity, MatchesTransformersFp32) {
  if (EnvPath("TOMESERVE_REF_DIR").empty()) GTEST_SKIP() << "TOMESERVE_REF_DIR not set";
  Reference ref = LoadReference(GetParam());
  auto model = ClipTextModelImpl::Load(ModelDir(GetParam()), {c10::Device(c10::kCPU), c10::kFloat});
  ASSERT_TRUE(model.ok()) << model.status();
  at::NoGradGuard no_grad;
  at::Tensor out = (*model)->forward(ref.input_ids);
  ASSERT_EQ(out.sizes(), ref.last_hidden_state.sizes());
  const double err = RelErr(out, ref.last_hidden_state);
  std::printf("text encoder %s fp32 rel_err %.3g\n", GetParam().c_str(), err);
  EXPECT_LE(err, 1e-5) << GetParam();
}

TEST_P(TextEncoderParity, Bf16OnCpuStaysCloseToFp32) {
  if (EnvPath("TOMESERVE_REF_DIR").empty()) GTEST_SKIP() << "TOMESERVE_REF_DIR not set";
  Reference ref = LoadReference(GetParam());
  auto model = ClipTextModelImpl::Load(ModelDir(GetParam()), {c10::Device(c10::kCPU), c10::kBFloat16});
  ASSERT_TRUE(model.ok()) << model.status();
  at::NoGradGuard no_grad;
  at::Tensor out = (*model)->forward(ref.input_ids);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  // bf16 keeps 8 mantissa bits (~4e-3 per rounding); over the encoder the relative error stays about 1e-2.
  const double err = RelErr(out, ref.last_hidden_state);
  std::printf("text encoder %s bf16 (cpu) rel_err %.3g\n", GetParam().c_str(), err);
  EXPECT_LE(err, 2e-2) << GetParam();  // measured 6e-3 (tiny) and 1e-2 (sd15)
}

TEST_P(TextEncoderParity, MatchesTransformers_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible";
  if (EnvPath("TOMESERVE_REF_DIR").empty()) GTEST_SKIP() << "TOMESERVE_REF_DIR not set";
  Reference ref = LoadReference(GetParam());
  at::NoGradGuard no_grad;
  auto fp32 = ClipTextModelImpl::Load(ModelDir(GetParam()), {c10::Device(c10::kCUDA, 0), c10::kFloat});
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  at::Tensor out = (*fp32)->forward(ref.input_ids.to(c10::Device(c10::kCUDA, 0))).cpu();
  // cuBLAS fp32 without TF32 (libtorch's default) keeps the same bound as the CPU.
  const double err32 = RelErr(out, ref.last_hidden_state);
  std::printf("text encoder %s fp32 (cuda) rel_err %.3g\n", GetParam().c_str(), err32);
  EXPECT_LE(err32, 1e-5);
  auto fp16 = ClipTextModelImpl::Load(ModelDir(GetParam()), {c10::Device(c10::kCUDA, 0), c10::kHalf});
  ASSERT_TRUE(fp16.ok()) << fp16.status();
  at::Tensor half = (*fp16)->forward(ref.input_ids.to(c10::Device(c10::kCUDA, 0))).cpu();
  const double err16 = RelErr(half, ref.last_hidden_state);
  std::printf("text encoder %s fp16 (cuda) rel_err %.3g\n", GetParam().c_str(), err16);
  EXPECT_LE(err16, 1e-2);  // fp16: 11 mantissa bits
}

INSTANTIATE_TEST_SUITE_P(Presets, TextEncoderParity, ::testing::Values("tiny", "sd15"));

TEST(TextEncoderLoad, ErrorsNameTheFile) {
  fs::path dir = fs::temp_directory_path() / ("tomeserve_te_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto missing = ClipTextModelImpl::Load(dir, {});
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("config.json"));

  std::ofstream(dir / "config.json") << R"({"hidden_size": 32, "num_attention_heads": 5})";
  auto bad = ClipTextModelImpl::Load(dir, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("not divisible"));

  std::ofstream(dir / "config.json") << R"({"hidden_size": 32, "num_attention_heads": 4, "hidden_act": "relu"})";
  EXPECT_THAT(ClipTextModelImpl::Load(dir, {}).status().message(), HasSubstr("hidden_act"));

  std::ofstream(dir / "config.json") << R"({"hidden_size": 32, "num_attention_heads": 4})";
  auto no_weights = ClipTextModelImpl::Load(dir, {});
  EXPECT_EQ(no_weights.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(no_weights.status().message(), HasSubstr("model.safetensors"));
  fs::remove_all(dir);
}

TEST(TextEncoderLoad, WrongArchitectureListsKeys) {
  if (EnvPath("TOMESERVE_TINY_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
  // The tiny checkpoint against a config with one layer fewer: the extra layer's tensors are unexpected.
  fs::path dir = fs::temp_directory_path() / ("tomeserve_te_arch_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  fs::copy_file(ModelDir("tiny") / "model.safetensors", dir / "model.safetensors");
  auto config = ClipTextConfig::Load(ModelDir("tiny") / "config.json");
  ASSERT_TRUE(config.ok());
  std::ofstream(dir / "config.json") << "{\"hidden_size\": " << config->hidden_size
                                     << ", \"intermediate_size\": " << config->intermediate_size
                                     << ", \"num_attention_heads\": " << config->num_attention_heads
                                     << ", \"num_hidden_layers\": " << config->num_hidden_layers - 1 << "}";
  auto model = ClipTextModelImpl::Load(dir, {});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("unexpected"));
  // Unexpected keys are listed as the checkpoint spells them (transformers >= 5 drops the "text_model." prefix).
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr("encoder.layers." + std::to_string(config->num_hidden_layers - 1) + "."));
  fs::remove_all(dir);
}

TEST(TextEncoderLoad, LegacyKeyLayoutLoadsTheSame) {
  // transformers >= 5 writes "encoder.layers..."; SD 1.x checkpoints have "text_model.encoder.layers..." plus an
  // int64 position_ids buffer. Same weights in both layouts must give bit-identical outputs.
  fs::path legacy = EnvPath("TOMESERVE_TINY_LEGACY_MODEL");
  if (legacy.empty()) GTEST_SKIP() << "TOMESERVE_TINY_LEGACY_MODEL not set";
  auto a = ClipTextModelImpl::Load(ModelDir("tiny"), {});
  auto b = ClipTextModelImpl::Load(legacy / "text_encoder", {});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  at::NoGradGuard no_grad;
  at::Tensor ids = at::tensor({49406, 320, 1125, 539, 320, 2368, 49407}, at::kLong).unsqueeze(0);
  EXPECT_TRUE(at::equal((*a)->forward(ids), (*b)->forward(ids)));
}

}  // namespace
}  // namespace tomeserve::pipeline
