#include "tools/cli_args.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tomeserve::tools {
namespace {

using ::testing::HasSubstr;

TEST(CliArgs, ParsesValuesAndSwitches) {
  auto a = CliArgs::Parse({"--model", "m", "--steps=20", "--pad"}, {"model", "steps"}, {"pad"});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->Get("model"), "m");
  EXPECT_TRUE(a->Has("pad"));
  EXPECT_EQ(a->GetInt("steps", 50, 1, 1000).value(), 20);
  EXPECT_EQ(a->GetInt("absent", 50, 1, 1000).value(), 50);
}

TEST(CliArgs, RejectsUnknownMissingAndMalformed) {
  EXPECT_THAT(CliArgs::Parse({"--nope"}, {}, {}).status().message(), HasSubstr("unknown flag --nope"));
  EXPECT_THAT(CliArgs::Parse({"--model"}, {"model"}, {}).status().message(), HasSubstr("needs a value"));
  EXPECT_THAT(CliArgs::Parse({"stray"}, {}, {}).status().message(), HasSubstr("unexpected argument"));
  EXPECT_THAT(CliArgs::Parse({"--pad=1"}, {}, {"pad"}).status().message(), HasSubstr("takes no value"));
  auto a = CliArgs::Parse({"--steps", "0", "--g", "nan"}, {"steps", "g"}, {});
  ASSERT_TRUE(a.ok());
  EXPECT_THAT(a->GetInt("steps", 1, 1, 10).status().message(), HasSubstr("--steps must be an integer in [1, 10]"));
  EXPECT_THAT(a->GetDouble("g", 1, 0, 10).status().message(), HasSubstr("--g must be a number"));
  EXPECT_THAT(a->Required("model").status().message(), HasSubstr("--model is required"));
}

}  // namespace
}  // namespace tomeserve::tools
