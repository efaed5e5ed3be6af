// VAE decoder parity with diffusers' AutoencoderKL.decode + VaeImageProcessor.postprocess. The references are
// written by scripts/reference_vae.py from the same random-weight model folders (ctest fixtures).
// Tolerances:
//  - decode, fp32 CPU: relative L2 error <= 1e-5. Both sides run the same ops in fp32 (the C++ even calls the
//    same libtorch kernels); what differs is summation order where kernels are chosen differently, ~1e-7 per
//    op.
//  - RGB8: max abs difference <= 1. ToRgb8 repeats diffusers' arithmetic exactly (checked bit-exact on the
//    reference image), so a difference can only come from a decode difference of ~1e-7 moving a value across
//    a .5 rounding boundary of x * 255, which changes that byte by exactly 1.
#include "pipeline/vae.h"

#include <torch/cuda.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "pipeline/load_weights.h"
#include "pipeline/safetensors_writer.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {
namespace {

using ::tomeserve::test::EnvPath;
using ::tomeserve::test::RelErr;

namespace fs = std::filesystem;
using ::testing::HasSubstr;



std::string Sci(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3e", v);
  return buf;
}

fs::path VaeDir(const std::string& preset) {
  return EnvPath(preset == "tiny"      ? "TOMESERVE_TINY_MODEL"
                 : preset == "tiny_xl" ? "TOMESERVE_TINY_XL_MODEL"
                                       : "TOMESERVE_SD15_MODEL") /
         "vae";
}

struct Case {
  at::Tensor latents, image, rgb8;
};

std::vector<Case> LoadReference(const std::string& preset) {
  auto store = WeightStore::OpenFile(EnvPath("TOMESERVE_REF_DIR") / ("vae_" + preset + ".safetensors"));
  EXPECT_TRUE(store.ok()) << store.status();
  std::vector<Case> cases;
  for (int i = 0; store.ok() && store->Find("latents_" + std::to_string(i)) != nullptr; ++i) {
    const std::string n = std::to_string(i);
    cases.push_back({ReadTensor(*store, "latents_" + n).value(), ReadTensor(*store, "image_" + n).value(),
                     ReadTensor(*store, "rgb8_" + n).value()});
  }
  EXPECT_FALSE(cases.empty());
  return cases;
}

class VaeParity : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (EnvPath("TOMESERVE_REF_DIR").empty()) GTEST_SKIP() << "TOMESERVE_REF_DIR not set";
  }
};

TEST_P(VaeParity, DecodeMatchesDiffusersFp32) {
  auto vae = VaeDecoderImpl::Load(VaeDir(GetParam()), {c10::Device(c10::kCPU), c10::kFloat});
  ASSERT_TRUE(vae.ok()) << vae.status();
  EXPECT_EQ((*vae)->upscale_factor(), 8);
  for (const Case& c : LoadReference(GetParam())) {
    at::Tensor image = (*vae)->Decode(c.latents);
    ASSERT_EQ(image.sizes(), c.image.sizes());
    const double err = RelErr(image, c.image);
    RecordProperty("rel_err_" + std::to_string(c.latents.size(2)) + "x" + std::to_string(c.latents.size(3)),
                   Sci(err));
    EXPECT_LE(err, 1e-5) << GetParam() << " latents " << c.latents.sizes();

    at::Tensor rgb = ToRgb8(image);
    ASSERT_EQ(rgb.scalar_type(), at::kByte);
    ASSERT_EQ(rgb.sizes(), c.rgb8.sizes());
    const int64_t max_diff = (rgb.to(at::kInt) - c.rgb8.to(at::kInt)).abs().max().item<int64_t>();
    EXPECT_LE(max_diff, 1) << GetParam() << " latents " << c.latents.sizes();
    const int64_t off_by_one = (rgb.to(at::kFloat) != c.rgb8).sum().item<int64_t>();
    RecordProperty(
        "rgb8_bytes_differing_" + std::to_string(c.latents.size(2)) + "x" + std::to_string(c.latents.size(3)),
        std::to_string(off_by_one) + "/" + std::to_string(rgb.numel()));
    // The postprocess alone is exact: diffusers' image through ToRgb8 gives diffusers' bytes.
    EXPECT_TRUE(at::equal(ToRgb8(c.image).to(at::kFloat), c.rgb8)) << GetParam();
  }
}

// diffusers' tiled decode (enable_tiling) of latents larger than a tile: same tiles, same blend, same seams.
TEST_P(VaeParity, TiledDecodeMatchesDiffusersFp32) {
  auto store = WeightStore::OpenFile(EnvPath("TOMESERVE_REF_DIR") / ("vae_" + GetParam() + ".safetensors"));
  ASSERT_TRUE(store.ok()) << store.status();
  if (store->Find("tiled_latents_0") == nullptr) GTEST_SKIP() << GetParam() << ": no tiled reference (big VAE)";
  auto vae = VaeDecoderImpl::Load(VaeDir(GetParam()), {c10::Device(c10::kCPU), c10::kFloat});
  ASSERT_TRUE(vae.ok()) << vae.status();
  for (int i = 0; store->Find("tiled_latents_" + std::to_string(i)) != nullptr; ++i) {
    const at::Tensor latents = ReadTensor(*store, "tiled_latents_" + std::to_string(i)).value();
    const at::Tensor want = ReadTensor(*store, "tiled_image_" + std::to_string(i)).value();
    ASSERT_GT(latents.size(2), (*vae)->tile_latent_size());  // several tiles, so seams are blended
    const at::Tensor tiled = (*vae)->DecodeTiled(latents);
    ASSERT_EQ(tiled.sizes(), want.sizes());
    const double err = RelErr(tiled, want);
    RecordProperty("rel_err_tiled_" + std::to_string(i), Sci(err));
    EXPECT_LE(err, 1e-5) << GetParam() << " latents " << latents.sizes();
    // ...and the seams are really blended: the whole-image decode differs.
    EXPECT_GT(RelErr((*vae)->Decode(latents), want), 1e-3);
  }
  // Latents within one tile decode exactly as Decode().
  const Case small = LoadReference(GetParam()).front();
  ASSERT_LE(small.latents.size(2), (*vae)->tile_latent_size());
  EXPECT_TRUE((*vae)->DecodeTiled(small.latents).equal((*vae)->Decode(small.latents)));
}

TEST_P(VaeParity, Bf16OnCpuStaysClose) {
  auto vae = VaeDecoderImpl::Load(VaeDir(GetParam()), {c10::Device(c10::kCPU), c10::kBFloat16});
  ASSERT_TRUE(vae.ok()) << vae.status();
  const Case c = LoadReference(GetParam()).front();
  at::Tensor image = (*vae)->Decode(c.latents);  // fp32 latents: divided in fp32, then cast
  EXPECT_EQ(image.scalar_type(), at::kBFloat16);
  // bf16 keeps 8 mantissa bits (~4e-3 per rounding); through ~30 convolutions the error stays a few 1e-2.
  const double err = RelErr(image, c.image);
  RecordProperty("rel_err", Sci(err));
  EXPECT_LE(err, 5e-2) << GetParam();
}

TEST_P(VaeParity, MatchesDiffusers_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible";
  const c10::Device cuda(c10::kCUDA, 0);
  const std::vector<Case> cases = LoadReference(GetParam());
  auto fp32 = VaeDecoderImpl::Load(VaeDir(GetParam()), {cuda, c10::kFloat});
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  // libtorch lets cuDNN use TF32 for fp32 convolutions by default (as PyTorch does); switch it off to compare
  // IEEE fp32 with fp32 (1e-5, as on the CPU), then check the default (TF32 keeps 10 mantissa bits: ~1e-3).
  const bool tf32 = at::globalContext().allowTF32CuDNN();
  at::globalContext().setAllowTF32CuDNN(false);
  for (const Case& c : cases) {
    at::Tensor image = (*fp32)->Decode(c.latents.to(cuda));
    const double err = RelErr(image.cpu(), c.image);
    RecordProperty(
        "fp32_rel_err_" + std::to_string(c.latents.size(2)) + "x" + std::to_string(c.latents.size(3)),
        Sci(err));
    EXPECT_LE(err, 1e-5) << GetParam() << " fp32, TF32 off";
    const int64_t diff = (ToRgb8(image).to(at::kInt) - c.rgb8.to(at::kInt)).abs().max().item<int64_t>();
    EXPECT_LE(diff, 1) << GetParam();
  }
  at::globalContext().setAllowTF32CuDNN(true);
  const double tf32_err = RelErr((*fp32)->Decode(cases[0].latents.to(cuda)).cpu(), cases[0].image);
  at::globalContext().setAllowTF32CuDNN(tf32);
  RecordProperty("tf32_rel_err", Sci(tf32_err));
  EXPECT_LE(tf32_err, 1e-2) << GetParam() << " TF32 on";

  // fp16 as diffusers' SD 1.x pipeline runs it (latents in fp16, no upcast): 11 mantissa bits.
  auto fp16 = VaeDecoderImpl::Load(VaeDir(GetParam()), {cuda, c10::kHalf});
  ASSERT_TRUE(fp16.ok()) << fp16.status();
  at::Tensor half = (*fp16)->Decode(cases[0].latents.to(cuda).to(at::kHalf));
  EXPECT_EQ(half.scalar_type(), at::kHalf);
  const double half_err = RelErr(half.cpu(), cases[0].image);
  RecordProperty("fp16_rel_err", Sci(half_err));
  EXPECT_LE(half_err, 1e-2) << GetParam() << " fp16";
  const int64_t half_diff =
      (ToRgb8(half).to(at::kInt) - cases[0].rgb8.to(at::kInt)).abs().max().item<int64_t>();
  RecordProperty("fp16_rgb8_max_diff", std::to_string(half_diff));
}

// tiny_xl: SDXL's VAE settings (scaling_factor 0.13025, force_upcast).
INSTANTIATE_TEST_SUITE_P(Presets, VaeParity, ::testing::Values("tiny", "sd15", "tiny_xl"));

// Copies the tiny VAE to `dir` with every tensor name passed through `rename` and weights through `reshape`.
void WriteRenamedCopy(const fs::path& dir, const std::function<std::string(const std::string&)>& rename,
                      const std::function<at::Tensor(const std::string&, at::Tensor)>& reshape) {
  auto store = WeightStore::OpenComponent(VaeDir("tiny"), "diffusion_pytorch_model");
  ASSERT_TRUE(store.ok()) << store.status();
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const std::string& name : store->Names()) {
    const std::string renamed = rename(name);
    tensors.emplace_back(renamed, reshape(renamed, ReadTensor(*store, name).value()));
  }
  fs::create_directories(dir);
  ASSERT_TRUE(SaveSafetensors(dir / "diffusion_pytorch_model.safetensors", tensors).ok());
  fs::copy_file(VaeDir("tiny") / "config.json", dir / "config.json", fs::copy_options::overwrite_existing);
}

std::string ToLegacy(const std::string& name) {
  return absl::StrReplaceAll(name, {{".attentions.0.to_q.", ".attentions.0.query."},
                                    {".attentions.0.to_k.", ".attentions.0.key."},
                                    {".attentions.0.to_v.", ".attentions.0.value."},
                                    {".attentions.0.to_out.0.", ".attentions.0.proj_attn."}});
}

bool IsLegacyProjection(const std::string& name) {
  return name.find(".attentions.0.") != std::string::npos && name.find("group_norm") == std::string::npos;
}

class VaeLoad : public ::testing::Test {
 protected:
  void SetUp() override {
    if (EnvPath("TOMESERVE_TINY_MODEL").empty()) GTEST_SKIP() << "TOMESERVE_TINY_MODEL not set";
    dir_ = fs::temp_directory_path() / ("tomeserve_vae_" + std::to_string(::getpid()));
  }
  void TearDown() override {
    // Not fs::remove_all: the copy of it that the libtorch wheel exports crashes (null call) when this binary
    // resolves to it. The folder holds only these two files.
    for (const char* name : {"config.json", "diffusion_pytorch_model.safetensors"})
      std::remove((dir_ / name).c_str());
    std::remove(dir_.c_str());
  }
  fs::path dir_;
};

TEST_F(VaeLoad, LegacyAttentionKeysLoadTheSame) {
  // Checkpoints from before diffusers 0.14 spell the attention query/key/value/proj_attn (same [C, C]
  // shapes).
  WriteRenamedCopy(dir_, ToLegacy, [](const std::string&, at::Tensor t) { return t; });
  auto modern = VaeDecoderImpl::Load(VaeDir("tiny"), {});
  auto legacy = VaeDecoderImpl::Load(dir_, {});
  ASSERT_TRUE(modern.ok()) << modern.status();
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  at::Tensor latents = at::randn({1, 4, 6, 5}, at::TensorOptions().dtype(at::kFloat));
  EXPECT_TRUE(at::equal((*modern)->Decode(latents), (*legacy)->Decode(latents)));
}

TEST_F(VaeLoad, ConvShapedLegacyWeightsAreRejectedLikeDiffusers) {
  // [C, C, 1, 1] projection weights (original LDM layout) fail diffusers' from_pretrained with a size
  // mismatch; they need the single-file converter, which is out of scope. The error must name the tensor.
  WriteRenamedCopy(dir_, ToLegacy, [](const std::string& name, at::Tensor t) {
    return IsLegacyProjection(name) && t.dim() == 2 ? t.unsqueeze(-1).unsqueeze(-1).contiguous() : t;
  });
  auto vae = VaeDecoderImpl::Load(dir_, {});
  ASSERT_FALSE(vae.ok());
  EXPECT_THAT(vae.status().message(), HasSubstr("decoder.mid_block.attentions.0."));
  EXPECT_THAT(vae.status().message(), HasSubstr("shape"));
}

TEST_F(VaeLoad, MissingDecoderTensorIsNamed) {
  WriteRenamedCopy(
      dir_, [](const std::string& n) { return n == "decoder.conv_out.bias" ? "encoder.dropped" : n; },
      [](const std::string&, at::Tensor t) { return t; });
  auto vae = VaeDecoderImpl::Load(dir_, {});
  ASSERT_FALSE(vae.ok());
  EXPECT_THAT(vae.status().message(), HasSubstr("missing 1: decoder.conv_out.bias"));
}

TEST_F(VaeLoad, ConfigErrors) {
  fs::create_directories(dir_);
  EXPECT_EQ(VaeDecoderImpl::Load(dir_, {}).status().code(), absl::StatusCode::kNotFound);
  auto message = [&](const std::string& json) {
    std::ofstream(dir_ / "config.json") << json;
    return std::string(VaeDecoderImpl::Load(dir_, {}).status().message());
  };
  EXPECT_THAT(message(R"({"shift_factor": 0.1159})"), HasSubstr("shift_factor"));
  EXPECT_THAT(message(R"({"latents_mean": [0, 0, 0, 0]})"), HasSubstr("latents_mean"));
  EXPECT_THAT(message(R"({"up_block_types": ["AttnUpDecoderBlock2D"]})"), HasSubstr("only UpDecoderBlock2D"));
  EXPECT_THAT(message(R"({"block_out_channels": [64, 64]})"), HasSubstr("up_block_types"));
  EXPECT_THAT(message(R"({"block_out_channels": [48], "norm_num_groups": 32})"), HasSubstr("not divisible"));
  EXPECT_THAT(message(R"({"act_fn": "gelu"})"), HasSubstr("act_fn"));
  EXPECT_THAT(message(R"({"layers_per_block": 0})"), HasSubstr("layers_per_block"));
  // Valid config, no weights: the error names the file that is missing.
  EXPECT_THAT(message(R"({"shift_factor": null, "sample_size": [64, 64]})"),
              HasSubstr("diffusion_pytorch_model.safetensors"));
}

TEST(VaeDecode, RejectsBadLatents) {
  VaeConfig config;
  config.block_out_channels = {32, 32};
  config.up_block_types = {"UpDecoderBlock2D", "UpDecoderBlock2D"};
  VaeDecoderImpl vae(config, at::TensorOptions().dtype(at::kFloat));
  EXPECT_EQ(vae.upscale_factor(), 2);
  EXPECT_THROW(vae.Decode(at::zeros({1, 3, 4, 4})), c10::Error);
  EXPECT_THROW(vae.Decode(at::zeros({4, 4, 4})), c10::Error);
  EXPECT_THROW(vae.Decode(at::zeros({1, 4, 4, 4}, at::kLong)), c10::Error);
}

TEST(ToRgb8, FollowsDiffusersPostprocess) {
  // x in [-1, 1] -> (x * 0.5 + 0.5) * 255 in float32, rounded half to even like numpy: 0.4 -> 178.5 -> 178
  // (half up would give 179), 0 -> 127.5 -> 128. Clamped; NaN -> 0. Expected bytes computed with diffusers'
  // numpy path.
  at::Tensor image =
      at::tensor({-1.0f, 1.0f, 0.0f, -5.0f, 5.0f, std::nanf(""), 0.5f, -0.5f, 0.1f, 0.2f, 0.3f, 0.4f})
          .view({1, 3, 2, 2});
  at::Tensor rgb = ToRgb8(image);
  ASSERT_EQ(rgb.sizes(), (std::vector<int64_t>{1, 2, 2, 3}));
  ASSERT_TRUE(rgb.is_contiguous());
  // Channel-last: pixel (0,0) is channels (image[0], image[4], image[8]).
  const std::vector<int> want = {0, 255, 140, 255, 0, 153, 128, 191, 166, 0, 64, 178};
  ASSERT_EQ(std::vector<uint8_t>(rgb.data_ptr<uint8_t>(), rgb.data_ptr<uint8_t>() + 12),
            std::vector<uint8_t>(want.begin(), want.end()));
  EXPECT_THROW(ToRgb8(at::zeros({1, 4, 2, 2})), c10::Error);
}

}  // namespace
}  // namespace tomeserve::pipeline
