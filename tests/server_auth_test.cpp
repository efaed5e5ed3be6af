// server::TokenAuth: the token file's format (tenants and their limits included), bearer parsing, wrong and
// missing tokens, reload on change (by the watcher, without calls) and on demand (a failed reload keeps the
// previous tokens), the constant-time comparison's results; server::TenantLimits' concurrency and rate limits.
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
    const absl::Status s = (*auth)->Check(bad).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << bad;
    EXPECT_EQ(s.message().find("alpha"), std::string::npos) << "a token leaked into: " << s.message();
  }
  const absl::Status missing = (*auth)->Check(std::nullopt).status();
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
  // The watcher notices the change within about a second.
  EXPECT_TRUE((*auth)->Check("Bearer old").ok() || (*auth)->Check("Bearer new").ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!(*auth)->Check("Bearer new").ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
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

TEST_F(TokenAuthTest, TokensNameTheirTenantAndItsLimits) {
  Write("plain\nheavy-1 tenant=heavy weight=3 max_concurrent=8\nheavy-2 tenant=heavy calls_per_second=2.5\n"
        "light-1 tenant=light\n");
  auto auth = TokenAuth::Create(file_);
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ((*auth)->tenants(), 3);
  absl::StatusOr<TenantSpec> plain = (*auth)->Check("Bearer plain");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(*plain, TenantSpec{});  // "default", weight 1, no limits
  for (const char* token : {"Bearer heavy-1", "Bearer heavy-2"}) {
    absl::StatusOr<TenantSpec> heavy = (*auth)->Check(token);
    ASSERT_TRUE(heavy.ok());
    EXPECT_EQ(*heavy, (TenantSpec{.name = "heavy", .weight = 3, .max_concurrent = 8, .calls_per_second = 2.5}));
  }
  EXPECT_EQ((*auth)->Check("Bearer light-1")->name, "light");
  EXPECT_EQ((*auth)->Check("Bearer heavy-1 tenant=heavy").status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(TokenAuthTest, BadTenantLinesNameTheFileLineAndField) {
  const std::pair<const char*, const char*> cases[] = {
      {"a\nb colour=red\n", "line 2: unknown field \"colour\""},
      {"a tenant=x weight=0\n", "line 1: weight=0: allowed (0, 1000]"},
      {"a tenant=x max_concurrent=1.5\n", "max_concurrent=1.5: allowed an integer"},
      {"a tenant=x calls_per_second=-1\n", "calls_per_second=-1"},
      {"a tenant=x weight=2\nb tenant=x weight=3\n", "line 2: tenant \"x\" has weight=2 on line 1"},
      {"a tenant=no/slash\n", "tenant \"no/slash\""},
  };
  for (const auto& [text, needle] : cases) {
    Write(text);
    auto auth = TokenAuth::Create(file_);
    ASSERT_FALSE(auth.ok()) << text;
    EXPECT_NE(auth.status().message().find(needle), std::string::npos) << auth.status();
    EXPECT_NE(auth.status().message().find(file_.string()), std::string::npos) << auth.status();
  }
}

TEST_F(TokenAuthTest, TheWatcherReloadsWithoutAnyCall) {
  Write("old\n");
  auto auth = TokenAuth::Create(file_);
  ASSERT_TRUE(auth.ok());
  EXPECT_EQ((*auth)->loads(), 1);
  Write("new tenant=t\n");
  // No Check in between: the watcher thread notices the change (it looks once a second).
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while ((*auth)->loads() < 2 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ((*auth)->loads(), 2);
  EXPECT_EQ((*auth)->Check("Bearer new")->name, "t");
}

TEST(TenantLimitsTest, ConcurrencyAndRateLimitsNameTheLimit) {
  TenantLimits limits;
  const TenantSpec two{.name = "a", .max_concurrent = 2};
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_TRUE(limits.Acquire(two, t0).ok());
  EXPECT_TRUE(limits.Acquire(two, t0).ok());
  const absl::Status full = limits.Acquire(two, t0);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("tenant \"a\" is at its limit of 2 concurrent calls (max_concurrent"),
            std::string::npos)
      << full;
  limits.Release("a");
  EXPECT_EQ(limits.in_flight("a"), 1);
  EXPECT_TRUE(limits.Acquire(two, t0).ok());
  // 2 calls per second: a burst of 2, then one more every half second.
  const TenantSpec rate{.name = "b", .calls_per_second = 2};
  EXPECT_TRUE(limits.Acquire(rate, t0).ok());
  EXPECT_TRUE(limits.Acquire(rate, t0).ok());
  const absl::Status fast = limits.Acquire(rate, t0);
  EXPECT_EQ(fast.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(fast.message().find("over its limit of 2 calls per second (calls_per_second"), std::string::npos) << fast;
  EXPECT_FALSE(limits.Acquire(rate, t0 + absl::Milliseconds(400)).ok());
  EXPECT_TRUE(limits.Acquire(rate, t0 + absl::Milliseconds(600)).ok());
  // Another tenant is not affected.
  EXPECT_TRUE(limits.Acquire(TenantSpec{.name = "c", .max_concurrent = 1}, t0).ok());
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
