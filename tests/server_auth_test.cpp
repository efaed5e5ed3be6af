// server::TokenAuth: the token file's format, bearer parsing, wrong and missing tokens, reload on change and on
// demand (a failed reload keeps the previous tokens), and the constant-time comparison's results.
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/auth.h"

namespace tomeserve::server {
namespace {

namespace fs = std::filesystem;

class TokenAuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    file_ = fs::temp_directory_path() /
            ("tomeserve_tokens_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  void TearDown() override { fs::remove(file_); }
  void Write(const std::string& text) {
    std::ofstream(file_, std::ios::trunc) << text;
    // A distinct modification time even on coarse file systems.
    fs::last_write_time(file_, fs::file_time_type::clock::now() + std::chrono::seconds(++generation_));
  }
  fs::path file_;
  int generation_ = 0;
};

TEST_F(TokenAuthTest, AcceptsListedTokensOnly) {
  Write("# team tokens\n\n  alpha-123  \nbeta-456\n");
  auto auth = TokenAuth::Create(file_);
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE((*auth)->Check("Bearer alpha-123").ok());
  EXPECT_TRUE((*auth)->Check("bearer beta-456").ok());  // the scheme is case-insensitive (RFC 7235)
  for (const char* bad : {"Bearer alpha-12", "Bearer alpha-1234", "Bearer ", "Basic alpha-123", "alpha-123",
                          "Bearer # team tokens"}) {
    const absl::Status s = (*auth)->Check(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << bad;
    EXPECT_EQ(s.message().find("alpha"), std::string::npos) << "a token leaked into: " << s.message();
  }
  const absl::Status missing = (*auth)->Check(std::nullopt);
  EXPECT_EQ(missing.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(missing.message().find("authorization: Bearer"), std::string::npos) << missing;
}

TEST_F(TokenAuthTest, RejectsMissingOrEmptyFiles) {
  auto missing = TokenAuth::Create(file_);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("--auth-token-file"), std::string::npos);
  Write("# only a comment\n\n");
  auto empty = TokenAuth::Create(file_);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.status().message().find("no token"), std::string::npos);
}

TEST_F(TokenAuthTest, ReloadsOnChangeAndKeepsTokensWhenTheNewFileIsBad) {
  Write("old\n");
  auto auth = TokenAuth::Create(file_);
  ASSERT_TRUE(auth.ok());
  Write("new\n");
  // A change is noticed by the next check (at most once a second): wait past the first check's window.
  EXPECT_TRUE((*auth)->Check("Bearer old").ok() || (*auth)->Check("Bearer new").ok());
  absl::SleepFor(absl::Milliseconds(1100));
  EXPECT_TRUE((*auth)->Check("Bearer new").ok());
  EXPECT_FALSE((*auth)->Check("Bearer old").ok());
  Write("# emptied by mistake\n");
  EXPECT_FALSE((*auth)->Reload().ok());
  EXPECT_TRUE((*auth)->Check("Bearer new").ok());  // the previous tokens stay
  Write("third\n");
  absl::StatusOr<int> n = (*auth)->Reload();
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1);
  EXPECT_TRUE((*auth)->Check("Bearer third").ok());
}

TEST(ConstantTimeEquals, ComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secreT", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secret-and-more", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secre", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("", "secret"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

}  // namespace
}  // namespace tomeserve::server
