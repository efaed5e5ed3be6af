// LoadWeights: strict name matching, shape checks and dtype conversion, on small synthetic modules written with
// SaveSafetensors (whose output SafetensorsFile must read back).
#include <filesystem>
#include <fstream>

#include <torch/nn/modules/container/modulelist.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/layers.h"
#include "pipeline/load_weights.h"
#include "pipeline/safetensors_writer.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// proj.{weight,bias} + blocks.0.norm.{weight,bias}: a nested tree like the real models.
struct TinyNetImpl : torch::nn::Module {
  explicit TinyNetImpl(const at::TensorOptions& o) {
    proj = register_module("proj", Linear(3, 2, true, o));
    blocks = register_module("blocks", torch::nn::ModuleList());
    auto block = std::make_shared<torch::nn::Module>();
    block->register_module("norm", LayerNorm(2, 1e-5, o));
    blocks->push_back(block);
  }
  Linear proj{nullptr};
  torch::nn::ModuleList blocks;
};

class LoadWeightsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("tomeserve_lw_" + std::to_string(::getpid()) + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::pair<std::string, at::Tensor>> Good(at::ScalarType dtype = at::kFloat) {
    at::manual_seed(0);
    return {{"proj.weight", at::randn({2, 3}).to(dtype)},
            {"proj.bias", at::randn({2}).to(dtype)},
            {"blocks.0.norm.weight", at::randn({2}).to(dtype)},
            {"blocks.0.norm.bias", at::randn({2}).to(dtype)}};
  }
  WeightStore Store(const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
    EXPECT_TRUE(SaveSafetensors(dir_ / "model.safetensors", tensors).ok());
    auto store = WeightStore::OpenComponent(dir_, "model");
    EXPECT_TRUE(store.ok()) << store.status();
    return *std::move(store);
  }

  fs::path dir_;
};

TEST_F(LoadWeightsTest, LoadsEveryParameterByName) {
  auto tensors = Good();
  TinyNetImpl net(at::TensorOptions().dtype(at::kFloat));
  ASSERT_TRUE(LoadWeights(net, Store(tensors)).ok());
  EXPECT_TRUE(at::equal(net.proj->weight, tensors[0].second));
  auto params = net.named_parameters();
  EXPECT_TRUE(at::equal(params["blocks.0.norm.bias"], tensors[3].second));
}

TEST_F(LoadWeightsTest, ConvertsStorageDtypeToComputeDtype) {
  auto half = Good(at::kHalf);
  TinyNetImpl net(at::TensorOptions().dtype(at::kFloat));
  ASSERT_TRUE(LoadWeights(net, Store(half)).ok());
  EXPECT_EQ(net.proj->weight.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(net.proj->weight, half[0].second.to(at::kFloat)));  // f16 -> f32 is exact

  TinyNetImpl bf(at::TensorOptions().dtype(at::kBFloat16));
  ASSERT_TRUE(LoadWeights(bf, Store(Good())).ok());
  EXPECT_EQ(bf.proj->bias.scalar_type(), at::kBFloat16);
}

TEST_F(LoadWeightsTest, ListsMissingAndUnexpected) {
  auto tensors = Good();
  tensors.erase(tensors.begin() + 2);                    // drop blocks.0.norm.weight
  tensors.push_back({"proj.extra", at::zeros({1})});     // and add a stranger
  TinyNetImpl net{at::TensorOptions()};
  absl::Status s = LoadWeights(net, Store(tensors));
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("missing 1: blocks.0.norm.weight"));
  EXPECT_THAT(s.message(), HasSubstr("unexpected 1: proj.extra"));
  EXPECT_THAT(s.message(), HasSubstr("model.safetensors"));
}

TEST_F(LoadWeightsTest, IgnoresListedKeysAndRenames) {
  auto tensors = Good();
  tensors.push_back({"position_ids", at::zeros({4})});
  tensors[0].first = "proj.legacy_weight";
  TinyNetImpl net{at::TensorOptions()};
  LoadOptions options{.ignore_unexpected = {"position_ids"},
                      .rename = [](absl::string_view k) {
                        return k == "proj.legacy_weight" ? std::string("proj.weight") : std::string(k);
                      }};
  EXPECT_TRUE(LoadWeights(net, Store(tensors), options).ok());
}

TEST_F(LoadWeightsTest, RejectsShapeMismatchNamingTensor) {
  auto tensors = Good();
  tensors[0].second = at::zeros({3, 2});
  TinyNetImpl net{at::TensorOptions()};
  absl::Status s = LoadWeights(net, Store(tensors));
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("tensor \"proj.weight\" has shape [3, 2] but the model expects [2, 3]"));
}

TEST_F(LoadWeightsTest, ReadTensorCopiesOut) {
  auto tensors = Good();
  auto store = Store(tensors);
  auto t = ReadTensor(store, "proj.bias");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(at::equal(*t, tensors[1].second));
  EXPECT_EQ(ReadTensor(store, "nope").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(LoadWeightsTest, RejectsNonFloatWeightNamingIt) {
  // SaveSafetensors only writes float dtypes, so write an I64 tensor by hand.
  const std::string header = R"({"proj.bias":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})";
  {
    std::ofstream out(dir_ / "model.safetensors", std::ios::binary);
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
    out << header << std::string(16, '\0');
  }
  auto store = WeightStore::OpenComponent(dir_, "model");
  ASSERT_TRUE(store.ok()) << store.status();
  absl::Status s = ReadTensor(*store, "proj.bias").status();
  EXPECT_THAT(s.message(), HasSubstr("tensor \"proj.bias\" has dtype I64; weights must be F32, F16 or BF16"));
}

TEST_F(LoadWeightsTest, WriterRejectsUnsupportedDtype) {
  absl::Status s = SaveSafetensors(dir_ / "x.safetensors", {{"ids", at::zeros({2}, at::kLong)}});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("ids"));
}

}  // namespace
}  // namespace tomeserve::pipeline
