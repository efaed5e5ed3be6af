// Unit tests for ClipTokenizer. The first group builds a miniature vocabulary in a temp folder and always
// runs; the second loads the real CLIP vocabulary from $TOMESERVE_TEST_TOKENIZER_DIR (a tokenizer/ folder, or
// a model folder holding one) and is skipped without it. Expected ids there come from the pinned transformers
// CLIPTokenizer and must match exactly: token ids have no tolerance.
#include "pipeline/clip_tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace tomeserve::pipeline {
namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int32_t>;

// A fresh folder per test under gtest's temp dir.
fs::path TestDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  fs::path dir = fs::path(::testing::TempDir()) /
                 ("clip_tokenizer_test_" + std::to_string(::getpid()) + "_" + info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void WriteFile(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// Ids: <|startoftext|> 0, <|endoftext|> 1, then a/b/c and merges chosen so that rank order and position order
// disagree on "abc" (b c</w> has the best rank, a b is leftmost).
constexpr char kMiniVocab[] =
    R"({"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "c": 4, "a</w>": 5, "b</w>": 6, "c</w>": 7,)"
    R"( "ab": 8, "bc</w>": 9, "abc</w>": 10, "ab</w>": 11})";
constexpr char kMiniMerges[] = "#version: 0.2\nb c</w>\na b\na bc</w>\na b</w>\n";

std::unique_ptr<ClipTokenizer> LoadMini(const std::string& vocab = kMiniVocab,
                                        const std::string& merges = kMiniMerges) {
  const fs::path dir = TestDir();
  WriteFile(dir / "vocab.json", vocab);
  WriteFile(dir / "merges.txt", merges);
  absl::StatusOr<std::unique_ptr<ClipTokenizer>> tok = ClipTokenizer::Load(dir);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

absl::Status LoadError(const std::string& vocab, const std::string& merges) {
  const fs::path dir = TestDir();
  WriteFile(dir / "vocab.json", vocab);
  WriteFile(dir / "merges.txt", merges);
  return ClipTokenizer::Load(dir).status();
}

TEST(ClipTokenizerMiniTest, MergesByRankNotPosition) {
  auto tok = LoadMini();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), 0);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_EQ(tok->pad_id(), 1);
  EXPECT_EQ(tok->vocab_size(), 12u);
  EXPECT_EQ(tok->Encode("abc"), (Ids{0, 10, 1}));  // b c</w>, then a bc</w>; never ab + c</w>
  EXPECT_EQ(tok->Encode("ab"), (Ids{0, 11, 1}));
  EXPECT_EQ(tok->Encode("CAB"), (Ids{0, 4, 11, 1}));  // lowercased first
  EXPECT_EQ(tok->Encode("a b c"), (Ids{0, 5, 6, 7, 1}));
}

TEST(ClipTokenizerMiniTest, UnknownSymbolsBecomeEndOfText) {
  auto tok = LoadMini();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("abz"), (Ids{0, 8, 1, 1}));  // "z</w>" is not in the vocabulary
}

TEST(ClipTokenizerMiniTest, SpecialTokensTruncationAndPadding) {
  auto tok = LoadMini();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode(""), (Ids{0, 1}));
  EXPECT_EQ(tok->Encode("ab<|endoftext|>c<|startoftext|>"), (Ids{0, 11, 1, 7, 0, 1}));
  EXPECT_EQ(tok->Encode("a a a a a", 4), (Ids{0, 5, 5, 1}));
  EXPECT_EQ(tok->Encode("a a a", 1), (Ids{0, 1}));  // below 2 counts as 2
  EXPECT_EQ(tok->EncodePadded("a", 5), (Ids{0, 5, 1, 1, 1}));
  EXPECT_EQ(tok->EncodePadded("a a a a a", 4), (Ids{0, 5, 5, 1}));
}

TEST(ClipTokenizerLoadTest, MissingFilesNameThePath) {
  const fs::path dir = TestDir();
  absl::Status s = ClipTokenizer::Load(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find((dir / "vocab.json").string()), std::string::npos) << s;

  WriteFile(dir / "vocab.json", kMiniVocab);
  s = ClipTokenizer::Load(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find((dir / "merges.txt").string()), std::string::npos) << s;
}

TEST(ClipTokenizerLoadTest, MalformedVocabNamesFileAndLine) {
  absl::Status s = LoadError("{\n  \"a\": 1,\n  \"b\": \n}\n", kMiniMerges);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("vocab.json"), std::string::npos) << s;
  EXPECT_NE(s.message().find("line 4"), std::string::npos) << s;

  s = LoadError(R"({"<|startoftext|>": 0, "<|endoftext|>": "one"})", kMiniMerges);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("vocab.json"), std::string::npos) << s;
  EXPECT_NE(s.message().find("<|endoftext|>"), std::string::npos) << s;

  s = LoadError(R"({"a": -1})", kMiniMerges);
  EXPECT_NE(s.message().find("\"a\""), std::string::npos) << s;
  s = LoadError(R"(["a", "b"])", kMiniMerges);
  EXPECT_NE(s.message().find("flat object"), std::string::npos) << s;
  s = LoadError(R"({"<|startoftext|>": 0, "a": 1})", "#version: 0.2\n");
  EXPECT_NE(s.message().find("<|endoftext|> is missing"), std::string::npos) << s;
}

TEST(ClipTokenizerLoadTest, MalformedMergesNameFileAndLine) {
  absl::Status s = LoadError(kMiniVocab, "#version: 0.2\nb c</w>\nabc\n");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("merges.txt:3"), std::string::npos) << s;

  s = LoadError(kMiniVocab, "#version: 0.2\na b c\n");
  EXPECT_NE(s.message().find("merges.txt:2"), std::string::npos) << s;
  s = LoadError(kMiniVocab, "#version: 0.2\nb c</w>\n\na b\n");
  EXPECT_NE(s.message().find("merges.txt:3"), std::string::npos) << s;
  s = LoadError(kMiniVocab, "#version: 0.2\nb c</w>\na c\n");  // "ac" is not a token
  EXPECT_NE(s.message().find("merges.txt:3"), std::string::npos) << s;
  EXPECT_NE(s.message().find("\"ac\""), std::string::npos) << s;
}

// --- The real CLIP vocabulary ---------------------------------------------------------------------------

class ClipTokenizerRealTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* env = std::getenv("TOMESERVE_TEST_TOKENIZER_DIR");
    if (env == nullptr || *env == '\0') return;
    fs::path dir = env;
    if (!fs::exists(dir / "vocab.json") && fs::exists(dir / "tokenizer" / "vocab.json")) dir /= "tokenizer";
    absl::StatusOr<std::unique_ptr<ClipTokenizer>> tok = ClipTokenizer::Load(dir);
    load_status_ = new absl::Status(tok.status());
    if (tok.ok()) tok_ = tok->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete load_status_;
    tok_ = nullptr;
    load_status_ = nullptr;
  }
  void SetUp() override {
    if (load_status_ == nullptr)
      GTEST_SKIP() << "set TOMESERVE_TEST_TOKENIZER_DIR to a CLIP tokenizer folder";
    ASSERT_TRUE(load_status_->ok()) << *load_status_;
  }

  static const ClipTokenizer* tok_;
  static absl::Status* load_status_;
};

const ClipTokenizer* ClipTokenizerRealTest::tok_ = nullptr;
absl::Status* ClipTokenizerRealTest::load_status_ = nullptr;

TEST_F(ClipTokenizerRealTest, Accessors) {
  EXPECT_EQ(tok_->bos_id(), 49406);
  EXPECT_EQ(tok_->eos_id(), 49407);
  EXPECT_EQ(tok_->pad_id(), 49407);
  EXPECT_EQ(tok_->vocab_size(), 49408u);
}

TEST_F(ClipTokenizerRealTest, KnownIds) {
  const std::vector<std::pair<std::string, Ids>> cases = {
      {"a photo of a cat", {49406, 320, 1125, 539, 320, 2368, 49407}},
      {"A Photo Of A CAT, 8k, (masterpiece:1.2)",
       {49406, 320, 1125, 539, 320, 2368, 267, 279, 330, 267, 263, 12066, 281, 272, 269, 273, 264, 49407}},
      {"it's rock'n'roll, y'all! O'Neil's",
       {49406, 585, 568, 2172, 262, 333, 262, 3341, 267, 344, 262, 615, 256, 334, 262, 8030, 568, 49407}},
      {"İstanbul straße ΟΔΥΣΣΕΥΣ",  // İ -> i + U+0307; no final sigma
       {49406, 328, 16384, 11231, 1894, 127, 253, 324, 138, 123, 138, 112,  139,
        227,   139, 225,   139,   225,  138, 113, 139, 227, 139, 481, 49407}},
      {"東京の夜景 🐱\u200d👤 👍🏽",
       {49406, 48338, 21078, 105, 21575, 23170, 250, 48132, 363, 35710, 4244, 964, 353, 43722, 49407}},
      {"caf\u00e9 cafe\u0301", {49406, 15304, 15304, 49407}},  // NFC
      {"a<|endoftext|>b", {49406, 320, 49407, 321, 49407}},
      // Special tokens match case-sensitively in the raw text; other spellings are ordinary text.
      {"a<|ENDOFTEXT|>b", {49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407}},
  };
  for (const auto& [text, ids] : cases) EXPECT_EQ(tok_->Encode(text), ids) << text;
}

TEST_F(ClipTokenizerRealTest, EmptyAndPadding) {
  EXPECT_EQ(tok_->Encode(""), (Ids{49406, 49407}));
  Ids padded = tok_->EncodePadded("");
  ASSERT_EQ(padded.size(), 77u);
  EXPECT_EQ(padded[0], 49406);
  for (size_t i = 1; i < padded.size(); ++i) EXPECT_EQ(padded[i], 49407) << i;

  padded = tok_->EncodePadded("a photo of a cat");
  ASSERT_EQ(padded.size(), 77u);
  const Ids head = {49406, 320, 1125, 539, 320, 2368, 49407};
  EXPECT_EQ(Ids(padded.begin(), padded.begin() + 7), head);
  for (size_t i = 7; i < padded.size(); ++i) EXPECT_EQ(padded[i], 49407) << i;
}

TEST_F(ClipTokenizerRealTest, TruncationKeepsBosAndEos) {
  std::string text = "a very detailed painting of ";
  for (int i = 0; i < 40; ++i) text += i ? ", a red fox" : "a red fox";  // 166 tokens untruncated
  Ids expected = {49406, 320, 1070, 12609, 3086, 539};
  while (expected.size() < 76) {
    for (int32_t id : {320, 736, 3240, 267}) expected.push_back(id);
  }
  expected.resize(76);
  expected.push_back(49407);
  EXPECT_EQ(tok_->Encode(text), expected);
  EXPECT_EQ(tok_->EncodePadded(text), expected);
  EXPECT_EQ(tok_->Encode("a photo of a cat", 5), (Ids{49406, 320, 1125, 539, 49407}));
  for (const std::string& huge :
       {std::string(1 << 20, 'q'), std::string(1 << 20, '!'), std::string(1 << 20, ' ')}) {
    const Ids ids = tok_->Encode(huge);
    EXPECT_LE(ids.size(), 77u);
    EXPECT_EQ(ids.front(), 49406);
    EXPECT_EQ(ids.back(), 49407);
  }
}

TEST_F(ClipTokenizerRealTest, WhitespaceRunsCollapse) {
  const Ids expected = tok_->Encode("a photo of a cat");
  EXPECT_EQ(tok_->Encode("a\tphoto\n\nof \r\n a\u00a0cat\u3000"), expected);
  EXPECT_EQ(tok_->Encode("\n\t a \v\f photo\u2028of\u0085a\u2003cat \n"), expected);
}

TEST_F(ClipTokenizerRealTest, InvalidUtf8BecomesReplacementCharacters) {
  // Expected ids are transformers' for bytes.decode("utf-8", "replace").
  const std::vector<std::pair<std::string, Ids>> cases = {
      {"caf\xC3", {49406, 20867, 39802, 49407}},
      {"\x80"
       "abc",
       {49406, 39802, 5334, 49407}},
      {"\xE2\x82x", {49406, 39802, 343, 49407}},                         // truncated sequence: one U+FFFD
      {"\xED\xA0\x80", {49406, 47356, 47356, 39802, 49407}},             // surrogate: three
      {"\xF4\x90\x80\x80", {49406, 47356, 47356, 47356, 39802, 49407}},  // above U+10FFFF: four
      {"\xC0\xAF", {49406, 47356, 39802, 49407}},                        // overlong: two
      {"\xFF\xFE ok", {49406, 47356, 39802, 2481, 49407}},
      {"\xF0\x9F\x98", {49406, 39802, 49407}},
  };
  for (const auto& [bytes, ids] : cases)
    EXPECT_EQ(tok_->Encode(bytes), ids) << ::testing::PrintToString(bytes);
  EXPECT_EQ(tok_->Encode(std::string("a\0b", 3)).size(), 5u);  // NUL is an ordinary symbol
}

TEST_F(ClipTokenizerRealTest, ConcurrentEncodeMatchesSerial) {
  std::vector<std::string> prompts = {"a photo of a cat", "東京の夜景 🐱\u200d👤",
                                      "It'S <|endoftext|> rock'n'roll", "İstanbul", ""};
  for (int i = 0; i < 40; ++i)
    prompts.push_back("prompt number " + std::to_string(i * 7919) + ", highly detailed");
  prompts.push_back(std::string(3000, 'z'));
  std::vector<Ids> serial;
  for (const std::string& p : prompts) serial.push_back(tok_->EncodePadded(p));

  constexpr int kThreads = 8;
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < prompts.size(); ++i) {
          const size_t k = (i + t * 5 + round) % prompts.size();
          if (tok_->EncodePadded(prompts[k]) != serial[k]) ++mismatches[t];
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

}  // namespace
}  // namespace tomeserve::pipeline
