// SafetensorsFile and WeightStore on valid, corrupt and hostile inputs. Built under AddressSanitizer and
// UBSan (tests/CMakeLists.txt): every corrupt input must give an error naming the file (and the tensor where
// one is at fault) without reading outside the mapping.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/safetensors.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("tomeserve_st_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes [u64 header length][header][data]; `declared_len` overrides the length field when >= 0.
  fs::path Write(const std::string& name, const std::string& header, const std::string& data,
                 int64_t declared_len = -1) {
    fs::path p = dir_ / name;
    std::ofstream out(p, std::ios::binary);
    uint64_t n = declared_len >= 0 ? static_cast<uint64_t>(declared_len) : header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
    out << header << data;
    return p;
  }
  std::string Bytes(size_t n, char fill = '\x01') { return std::string(n, fill); }

  std::string ErrorOf(const fs::path& p) {
    auto f = SafetensorsFile::Open(p);
    EXPECT_FALSE(f.ok()) << p;
    return f.ok() ? "" : std::string(f.status().message());
  }

  fs::path dir_;
};

TEST_F(SafetensorsTest, ReadsValidFile) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[3],"data_offsets":[8,14]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string data(14, '\0');
  float two[2] = {1.5f, -2.0f};
  std::memcpy(data.data(), two, 8);
  auto f = SafetensorsFile::Open(Write("ok.safetensors", header, data));
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ((*f)->tensors().size(), 2u);
  EXPECT_EQ((*f)->tensors()[0].name, "a");  // data-offset order
  const TensorRecord* a = (*f)->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, StorageDType::kF32);
  EXPECT_EQ(a->shape, std::vector<int64_t>({2}));
  float back[2];
  std::memcpy(back, a->data.data(), 8);
  EXPECT_EQ(back[1], -2.0f);
  EXPECT_EQ((*f)->Find("b")->numel(), 3);
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->Find("missing"), nullptr);
}

TEST_F(SafetensorsTest, AcceptsEmptyHeaderAndScalars) {
  auto f = SafetensorsFile::Open(Write("empty.safetensors", "{}", ""));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->tensors().empty());
  auto s = SafetensorsFile::Open(
      Write("scalar.safetensors", R"({"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}})", Bytes(2)));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->Find("s")->numel(), 1);
}

TEST_F(SafetensorsTest, RejectsMissingAndNonRegularFiles) {
  EXPECT_THAT(ErrorOf(dir_ / "nope.safetensors"), HasSubstr("nope.safetensors"));
  EXPECT_THAT(ErrorOf(dir_), HasSubstr("not a regular file"));
}

TEST_F(SafetensorsTest, RejectsTruncatedHeaderLength) {
  fs::path p = dir_ / "short.safetensors";
  std::ofstream(p, std::ios::binary) << "abc";
  EXPECT_THAT(ErrorOf(p), HasSubstr("truncated"));
  EXPECT_THAT(ErrorOf(p), HasSubstr("short.safetensors"));
}

TEST_F(SafetensorsTest, RejectsHeaderLengthPastEof) {
  EXPECT_THAT(ErrorOf(Write("past.safetensors", "{}", "", 1000)), HasSubstr("past the end"));
}

TEST_F(SafetensorsTest, RejectsHugeHeaderLength) {
  EXPECT_THAT(ErrorOf(Write("huge.safetensors", "{}", "", int64_t{1} << 40)), HasSubstr("exceeds the limit"));
}

TEST_F(SafetensorsTest, RejectsBadJson) {
  EXPECT_THAT(ErrorOf(Write("bad.safetensors", R"({"a": {)", "")), HasSubstr("not valid JSON"));
  EXPECT_THAT(ErrorOf(Write("arr.safetensors", "[1,2]", "")), HasSubstr("not a JSON object"));
  EXPECT_THAT(ErrorOf(Write("meta.safetensors", R"({"__metadata__": 3})", "")), HasSubstr("__metadata__"));
}

TEST_F(SafetensorsTest, RejectsMalformedEntries) {
  EXPECT_THAT(ErrorOf(Write("e1.safetensors", R"({"w": 1})", "")), HasSubstr("tensor \"w\""));
  EXPECT_THAT(ErrorOf(Write("e2.safetensors", R"({"w":{"shape":[1],"data_offsets":[0,4]}})", Bytes(4))),
              HasSubstr("dtype"));
  EXPECT_THAT(ErrorOf(Write("e3.safetensors", R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", Bytes(4))),
              HasSubstr("non-negative"));
  EXPECT_THAT(ErrorOf(Write("e4.safetensors", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", Bytes(4))),
              HasSubstr("data_offsets"));
  EXPECT_THAT(ErrorOf(Write("e5.safetensors", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", Bytes(4))),
              HasSubstr("reversed"));
}

TEST_F(SafetensorsTest, ParsesNonFloatDtypesButMarksThemUnloadable) {
  // Real SD 1.x text encoders carry an int64 position_ids buffer: the file must open, the loader refuses it.
  auto f = SafetensorsFile::Open(
      Write("i64.safetensors", R"({"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", Bytes(16)));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Find("ids")->dtype, StorageDType::kI64);
  EXPECT_FALSE(IsLoadable(StorageDType::kI64));
  EXPECT_TRUE(IsLoadable(StorageDType::kBF16));
  // Sizes are still checked with the dtype's element size.
  EXPECT_THAT(ErrorOf(Write("i64bad.safetensors", R"({"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,8]}})",
                            Bytes(8))),
              HasSubstr("needs 16 bytes"));
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  std::string msg =
      ErrorOf(Write("q4.safetensors", R"({"w":{"dtype":"Q4_K","shape":[1],"data_offsets":[0,1]}})", Bytes(1)));
  EXPECT_THAT(msg, HasSubstr("tensor \"w\""));
  EXPECT_THAT(msg, HasSubstr("unknown dtype \"Q4_K\""));
  EXPECT_THAT(msg, HasSubstr("q4.safetensors"));
}

TEST_F(SafetensorsTest, RejectsShapeSizeMismatch) {
  std::string msg = ErrorOf(
      Write("mismatch.safetensors", R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", Bytes(20)));
  EXPECT_THAT(msg, HasSubstr("tensor \"w\""));
  EXPECT_THAT(msg, HasSubstr("needs 24 bytes"));
}

TEST_F(SafetensorsTest, RejectsShapeOverflow) {
  EXPECT_THAT(ErrorOf(Write("ovf.safetensors",
                            R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}})",
                            Bytes(4))),
              HasSubstr("overflows"));
}

TEST_F(SafetensorsTest, RejectsOffsetsOutOfRange) {
  std::string msg =
      ErrorOf(Write("oob.safetensors", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", Bytes(8)));
  EXPECT_THAT(msg, HasSubstr("outside the data buffer"));
  EXPECT_THAT(msg, HasSubstr("tensor \"w\""));
}

TEST_F(SafetensorsTest, RejectsOverlapsGapsAndTrailingBytes) {
  EXPECT_THAT(ErrorOf(Write("overlap.safetensors",
                            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                            Bytes(12))),
              HasSubstr("overlap"));
  EXPECT_THAT(ErrorOf(Write("gap.safetensors",
                            R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                            Bytes(12))),
              HasSubstr("gap"));
  EXPECT_THAT(ErrorOf(Write("trail.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                            Bytes(9))),
              HasSubstr("trailing"));
}

// Random byte flips and truncations of a valid file: Open() may fail but must never read out of bounds
// (ASan/UBSan abort the test if it does). Deterministic seed, so a failure reproduces.
TEST_F(SafetensorsTest, SurvivesRandomCorruption) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}})";
  std::string good;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) good.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  good += header + Bytes(22);
  std::mt19937 rng(1234);
  for (int iter = 0; iter < 3000; ++iter) {
    std::string bytes = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) bytes[rng() % bytes.size()] = static_cast<char>(rng() & 0xff);
    if (rng() % 4 == 0) bytes.resize(rng() % bytes.size());
    fs::path p = dir_ / "fuzz.safetensors";
    std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
    auto f = SafetensorsFile::Open(p);
    if (f.ok()) {
      for (const TensorRecord& t : (*f)->tensors()) {
        volatile std::byte sink{};
        for (std::byte b : t.data) sink = b;  // touching every byte proves the spans are in bounds
      }
    }
  }
}

class WeightStoreTest : public SafetensorsTest {
 protected:
  void WriteIndex(const std::string& body) { std::ofstream(dir_ / "model.safetensors.index.json") << body; }
};

// The plain file, or the only variant file when there is no plain one (Hugging Face folders often carry only
// fp16 files).
TEST_F(WeightStoreTest, OpensSingleFileOrItsOnlyVariant) {
  for (const std::string name : {"model.safetensors", "model.fp16.safetensors"}) {
    Write(name, R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Bytes(4));
    auto store = WeightStore::OpenComponent(dir_, "model");
    ASSERT_TRUE(store.ok()) << name << ": " << store.status();
    EXPECT_EQ(store->Names(), std::vector<std::string>({"x"}));
    fs::remove(dir_ / name);
  }
}

// --variant (diffusers' variant=): that variant even when plain weights are there; a missing one is NOT_FOUND
// naming what was looked for and what the folder has.
TEST_F(WeightStoreTest, AnExplicitVariantWinsAndAMissingOneIsNamed) {
  Write("model.safetensors", R"({"plain":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Bytes(4));
  Write("model.fp16.safetensors", R"({"half":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", Bytes(4));
  auto plain = WeightStore::OpenComponent(dir_, "model");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->Names(), std::vector<std::string>({"plain"}));
  auto half = WeightStore::OpenComponent(dir_, "model", "fp16");
  ASSERT_TRUE(half.ok()) << half.status();
  EXPECT_EQ(half->Names(), std::vector<std::string>({"half"}));
  auto missing = WeightStore::OpenComponent(dir_, "model", "bf16");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("model.bf16.safetensors or model.safetensors.index.bf16.json"));
  EXPECT_THAT(missing.status().message(), HasSubstr("model.fp16.safetensors, model.safetensors"));
}

TEST_F(WeightStoreTest, OpensShardedFolder) {
  Write("model-00001-of-00002.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Bytes(4));
  Write("model-00002-of-00002.safetensors", R"({"b":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", Bytes(4));
  WriteIndex(R"({"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors",)"
             R"("b":"model-00002-of-00002.safetensors"}})");
  auto store = WeightStore::OpenComponent(dir_, "model");
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(store->size(), 2u);
  ASSERT_NE(store->Find("b"), nullptr);
  EXPECT_EQ(store->Find("b")->record->dtype, StorageDType::kF16);
}

TEST_F(WeightStoreTest, RejectsIndexNamingAbsentTensor) {
  Write("s1.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Bytes(4));
  WriteIndex(R"({"weight_map":{"a":"s1.safetensors","zzz":"s1.safetensors"}})");
  auto store = WeightStore::OpenComponent(dir_, "model");
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("\"zzz\""));
}

TEST_F(WeightStoreTest, RejectsDuplicateAcrossShards) {
  Write("s1.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Bytes(4));
  Write("s2.safetensors",
        R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"c":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
        Bytes(8));
  WriteIndex(R"({"weight_map":{"a":"s1.safetensors","c":"s2.safetensors"}})");
  auto store = WeightStore::OpenComponent(dir_, "model");
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("tensor \"a\" appears in both"));
}

TEST_F(WeightStoreTest, RejectsShardPathEscapes) {
  WriteIndex(R"({"weight_map":{"a":"../etc/passwd"}})");
  auto store = WeightStore::OpenComponent(dir_, "model");
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("plain file name"));
}

TEST_F(WeightStoreTest, OpensTheOnlyShardedVariant) {
  Write("model.fp16-00001-of-00002.safetensors", R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})",
        Bytes(4));
  Write("model.fp16-00002-of-00002.safetensors", R"({"b":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})",
        Bytes(4));
  std::ofstream(dir_ / "model.safetensors.index.fp16.json")
      << R"({"weight_map":{"a":"model.fp16-00001-of-00002.safetensors","b":"model.fp16-00002-of-00002.safetensors"}})";
  auto store = WeightStore::OpenComponent(dir_, "model");
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(store->Names(), std::vector<std::string>({"a", "b"}));
}

TEST_F(WeightStoreTest, PlainWeightsWinOverVariantsAndSeveralVariantsAreNamed) {
  Write("model.fp16.safetensors", R"({"half":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", Bytes(4));
  Write("model.bf16.safetensors", R"({"brain":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})", Bytes(4));
  auto several = WeightStore::OpenComponent(dir_, "model");
  ASSERT_FALSE(several.ok());
  EXPECT_THAT(several.status().message(), HasSubstr("model.bf16.safetensors, model.fp16.safetensors"));
  Write("model.safetensors", R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Bytes(4));
  auto plain = WeightStore::OpenComponent(dir_, "model");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->Names(), std::vector<std::string>({"x"}));
}

TEST_F(WeightStoreTest, ReportsMissingWeights) {
  auto store = WeightStore::OpenComponent(dir_, "diffusion_pytorch_model");
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(store.status().message(), HasSubstr("diffusion_pytorch_model.safetensors"));
}

}  // namespace
}  // namespace tomeserve::pipeline
