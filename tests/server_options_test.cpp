// server::ParseCommandLine: defaults, repeated --model, precedence command line > environment > config file,
// and one-line usage errors that name the flag, variable or key.
#include <filesystem>
#include <fstream>
#include <map>

#include "gtest/gtest.h"
#include "server/options.h"

namespace tomeserve::server {
namespace {

GetEnvFn Env(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::string WriteConfig(const std::string& text) {
  const auto path =
      std::filesystem::temp_directory_path() /
      ("tomeserve_options_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
       ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".yaml");
  std::ofstream(path) << text;
  return path.string();
}

TEST(OptionsTest, Defaults) {
  absl::StatusOr<CommandLine> c = ParseCommandLine({"--model", "/m/sd15"}, Env({}));
  ASSERT_TRUE(c.ok()) << c.status();
  const ServerOptions& o = c->options;
  ASSERT_EQ(o.models.size(), 1u);
  EXPECT_EQ(o.models[0].name, "sd15");
  EXPECT_EQ(o.models[0].dir, "/m/sd15");
  EXPECT_EQ(o.listen, "0.0.0.0:50051");
  EXPECT_EQ(o.max_batch_size, 8);
  EXPECT_EQ(o.default_tome_ratio, 0.0);
  EXPECT_EQ(o.drain_timeout, absl::Seconds(30));
  EXPECT_EQ(o.max_prompt_tokens, 77);
  EXPECT_EQ(o.shutdown_grace, absl::ZeroDuration());
  EXPECT_EQ(o.max_connection_age, absl::ZeroDuration());  // off
  EXPECT_EQ(o.inject_oom_above_batch, -1);                // off
  EXPECT_EQ(o.batching, "step");
  EXPECT_EQ(o.max_batch_cost, 0);  // derived per device
  EXPECT_EQ(o.adaptive_tome_max_ratio, 0);
  EXPECT_TRUE(o.inject_fault.empty());
  EXPECT_TRUE(o.auth_token_file.empty());
  EXPECT_EQ(o.max_connection_age_grace, absl::Seconds(600));
  EXPECT_EQ(o.max_request_bytes, 64 * 1024);
  EXPECT_EQ(o.max_concurrent_streams, 32);
  EXPECT_EQ(o.keepalive_time, absl::Seconds(60));
  EXPECT_EQ(o.keepalive_timeout, absl::Seconds(20));
  EXPECT_EQ(o.min_client_ping_interval, absl::Seconds(10));
  EXPECT_FALSE(o.log_prompts);  // prompts are never logged unless asked for
}

TEST(OptionsTest, TransportLimits) {
  absl::StatusOr<CommandLine> c = ParseCommandLine(
      {"--model", "/m", "--max-request-bytes", "20000", "--max-prompt-bytes", "8000", "--max-concurrent-streams",
       "4", "--keepalive-time", "0", "--min-client-ping-interval", "1", "--max-connection-age-grace", "900",
       "--log-prompts"},
      Env({}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->options.max_request_bytes, 20000);
  EXPECT_EQ(c->options.max_concurrent_streams, 4);
  EXPECT_EQ(c->options.keepalive_time, absl::ZeroDuration());  // the server never pings
  EXPECT_EQ(c->options.min_client_ping_interval, absl::Seconds(1));
  EXPECT_EQ(c->options.max_connection_age_grace, absl::Seconds(900));
  EXPECT_TRUE(c->options.log_prompts);
  // The message limit must hold two prompts of --max-prompt-bytes and the rest of the request.
  absl::StatusOr<CommandLine> small =
      ParseCommandLine({"--model", "/m", "--max-request-bytes", "9000", "--max-prompt-bytes", "4096"}, Env({}));
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("9216"), absl::string_view::npos) << small.status();
}

TEST(OptionsTest, WorkerFaultInjection) {
  absl::StatusOr<CommandLine> c =
      ParseCommandLine({"--model", "/m", "--enable-fault-injection", "--inject-worker-fault", "stuck@7",
                        "--step-timeout-seconds", "2"},
                       Env({}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->options.inject_fault, "stuck");
  EXPECT_EQ(c->options.inject_fault_at_step, 7);
  EXPECT_EQ(c->options.step_timeout_seconds, 2);
  EXPECT_FALSE(c->options.inject_fault_every);
  absl::StatusOr<CommandLine> every = ParseCommandLine({"--model", "/m", "--enable-fault-injection", "--inject-worker-fault", "request%50"}, Env({}));
  ASSERT_TRUE(every.ok()) << every.status();
  EXPECT_TRUE(every->options.inject_fault_every);
  EXPECT_EQ(every->options.inject_fault_at_step, 50);
  EXPECT_FALSE(ParseCommandLine({"--model", "/m", "--enable-fault-injection", "--inject-worker-fault", "fatal%5"}, Env({})).ok());
}

// The testing aids break a server on purpose: only on the command line, and only next to the switch.
TEST(OptionsTest, FaultInjectionOnlyOnTheCommandLineWithTheSwitch) {
  absl::StatusOr<CommandLine> without = ParseCommandLine({"--model", "/m", "--inject-oom-above-batch", "3"}, Env({}));
  EXPECT_EQ(without.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(without.status().message().find("--inject-oom-above-batch is a testing aid: add --enable-fault-injection"),
            absl::string_view::npos)
      << without.status();
  for (const char* var : {"TOMESERVE_INJECT_WORKER_FAULT", "TOMESERVE_INJECT_OOM_ABOVE_BATCH",
                          "TOMESERVE_ENABLE_FAULT_INJECTION"}) {
    absl::StatusOr<CommandLine> env =
        ParseCommandLine({"--model", "/m", "--enable-fault-injection"}, Env({{var, "1"}}));
    EXPECT_EQ(env.status().code(), absl::StatusCode::kInvalidArgument) << var;
    EXPECT_NE(env.status().message().find(std::string(var) + ": fault-injection settings are accepted only on the command line"),
              absl::string_view::npos)
        << env.status();
  }
  const std::string config = ::testing::TempDir() + "/fault_config.yaml";
  std::ofstream(config) << "max-batch-size: 2\ninject-worker-fault: request@3\n";
  absl::StatusOr<CommandLine> file =
      ParseCommandLine({"--model", "/m", "--enable-fault-injection", "--config", config}, Env({}));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(file.status().message().find("key inject-worker-fault: fault-injection settings are accepted only"),
            absl::string_view::npos)
      << file.status();
  absl::StatusOr<CommandLine> off = ParseCommandLine({"--model", "/m", "--enable-fault-injection=false",
                                                      "--inject-worker-fault", "request@3"},
                                                     Env({}));
  EXPECT_FALSE(off.ok());
  absl::StatusOr<CommandLine> on = ParseCommandLine({"--model", "/m", "--enable-fault-injection",
                                                     "--inject-oom-above-batch", "3"},
                                                    Env({}));
  ASSERT_TRUE(on.ok()) << on.status();
  EXPECT_EQ(on->options.inject_oom_above_batch, 3);
}

TEST(OptionsTest, ShutdownGraceAndConnectionAge) {
  absl::StatusOr<CommandLine> c =
      ParseCommandLine({"--model", "/m", "--shutdown-grace", "10", "--max-connection-age=300",
                        "--enable-fault-injection", "--inject-oom-above-batch", "0"},
                       Env({}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->options.shutdown_grace, absl::Seconds(10));
  EXPECT_EQ(c->options.max_connection_age, absl::Seconds(300));
  EXPECT_EQ(c->options.inject_oom_above_batch, 0);  // every batch, single images included
  absl::StatusOr<CommandLine> env =
      ParseCommandLine({"--model", "/m"}, Env({{"TOMESERVE_MAX_CONNECTION_AGE", "1.5"}}));
  ASSERT_TRUE(env.ok()) << env.status();
  EXPECT_EQ(env->options.max_connection_age, absl::Milliseconds(1500));
}

TEST(OptionsTest, DefaultTomeRatioUpToTomesdCapForDefaultStrides) {
  absl::StatusOr<CommandLine> c =
      ParseCommandLine({"--model", "/m", "--default-tome-ratio", "0.75"}, Env({}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->options.default_tome_ratio, 0.75);
  for (const char* bad : {"0.8", "-0.1"}) {
    absl::StatusOr<CommandLine> b = ParseCommandLine({"--model", "/m", "--default-tome-ratio", bad}, Env({}));
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(b.status().message().find("--default-tome-ratio"), absl::string_view::npos) << b.status();
    EXPECT_NE(b.status().message().find("[0, 0.75]"), absl::string_view::npos) << b.status();
  }
}

TEST(OptionsTest, RepeatedModelsAndDashedNames) {
  absl::StatusOr<CommandLine> c =
      ParseCommandLine({"--model", "/m/a/", "--model=b=/m/other", "--max-batch-size", "3",
                        "--max_queue_delay_ms=7", "--drain-timeout", "1.5"},
                       Env({}));
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->options.models.size(), 2u);
  EXPECT_EQ(c->options.models[0].name, "a");
  EXPECT_EQ(c->options.models[1].name, "b");
  EXPECT_EQ(c->options.models[1].dir, "/m/other");
  EXPECT_EQ(c->options.max_batch_size, 3);
  EXPECT_EQ(c->options.max_queue_delay_ms, 7);
  EXPECT_EQ(c->options.drain_timeout, absl::Milliseconds(1500));
}

TEST(OptionsTest, PrecedenceFlagsOverEnvOverFile) {
  const std::string config =
      WriteConfig("model: /m/file\nmax-batch-size: 2\nmax_queue_size: 5\nmax-steps: 9\nlog-format: json\n");
  absl::StatusOr<CommandLine> c =
      ParseCommandLine({"--config", config, "--max-batch-size", "4"},
                       Env({{"TOMESERVE_MAX_BATCH_SIZE", "3"}, {"TOMESERVE_MAX_QUEUE_SIZE", "6"}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->options.models.at(0).dir, "/m/file");
  EXPECT_EQ(c->options.max_batch_size, 4);  // flag
  EXPECT_EQ(c->options.max_queue_size, 6);  // environment
  EXPECT_EQ(c->options.max_steps, 9);       // file
  EXPECT_EQ(c->options.log_format, "json");
}

TEST(OptionsTest, JsonConfigWithModelMap) {
  const std::string config = WriteConfig(R"({"models": {"x": "/m/x"}, "default_tome_ratio": 0.25})");
  absl::StatusOr<CommandLine> c = ParseCommandLine({}, Env({{"TOMESERVE_CONFIG", config}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->options.models.at(0).name, "x");
  EXPECT_EQ(c->options.default_tome_ratio, 0.25);
}

TEST(OptionsTest, Help) {
  absl::StatusOr<CommandLine> c = ParseCommandLine({"--help"}, Env({}));
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->help);
  const std::string help = HelpText();
  for (const char* flag :
       {"--model", "--listen", "--metrics-listen", "--devices", "--max-batch-size", "--max-queue-delay-ms",
        "--max-queue-size", "--default-tome-ratio", "--drain-timeout", "--config", "--tls-cert", "--tls-key",
        "--tls-client-ca", "--inject-oom-above-batch", "--port-file", "--log-format", "--max-prompt-tokens",
        "--shutdown-grace", "--max-connection-age"}) {
    EXPECT_NE(help.find(flag), std::string::npos) << flag;
  }
}

TEST(OptionsTest, UsageErrorsNameTheProblem) {
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{}, "--model"},
      {{"--model", "/m", "--bogus", "1"}, "--bogus"},
      {{"--model", "/m", "--max-batch-size", "x"}, "--max-batch-size"},
      {{"--model", "/m", "--max-batch-size", "0"}, "--max-batch-size"},
      {{"--model", "/m", "--default-tome-ratio", "1.5"}, "--default-tome-ratio"},
      {{"--model", "/m", "--log-format", "xml"}, "--log-format"},
      {{"--model", "/m", "--dtype", "fp64"}, "--dtype"},
      {{"--model", "/m", "--tls-cert", "c.pem"}, "--tls-cert"},
      {{"--model", "/m", "--max-prompt-tokens", "78"}, "--max-prompt-tokens"},
      {{"--model", "/m", "stray"}, "stray"},
      {{"--model", "/m/a", "--model", "/n/a"}, "\"a\""},
      {{"--model", "/m", "--listen"}, "--listen"},
      {{"--model", "/m", "--max-connection-age", "-1"}, "--max-connection-age"},
      {{"--model", "/m", "--shutdown-grace", "-1"}, "--shutdown-grace"},
      {{"--model", "/m", "--enable-fault-injection", "--inject-oom-above-batch", "-2"}, "--inject-oom-above-batch"},
      {{"--model", "/m", "--batching", "continuous"}, "--batching"},
      {{"--model", "/m", "--max-batch-cost", "-1"}, "--max-batch-cost"},
      {{"--model", "/m", "--adaptive-tome-max-ratio", "0.9"}, "--adaptive-tome-max-ratio"},
      {{"--model", "/m", "--default-latency-target-seconds", "-1"}, "--default-latency-target-seconds"},
      {{"--model", "/m", "--enable-fault-injection", "--inject-worker-fault", "melt@3"}, "--inject-worker-fault"},
      {{"--model", "/m", "--enable-fault-injection", "--inject-worker-fault", "fatal@0"}, "--inject-worker-fault"},
      {{"--model", "/m", "--step-timeout-seconds", "-1"}, "--step-timeout-seconds"},
      {{"--model", "/m", "--max-concurrent-streams", "0"}, "--max-concurrent-streams"},
      {{"--model", "/m", "--keepalive-timeout", "0"}, "--keepalive-timeout"},
      {{"--model", "/m", "--min-client-ping-interval", "-1"}, "--min-client-ping-interval"},
      {{"--model", "/m", "--max-connection-age-grace", "-5"}, "--max-connection-age-grace"},
      // A listen address without a port would bind gRPC's default 443.
      {{"--model", "/m", "--listen", "127.0.0.1"}, "--listen"},
      {{"--model", "/m", "--listen", "127.0.0.1:"}, "--listen"},
      {{"--model", "/m", "--listen", "127.0.0.1:65536"}, "--listen"},
      {{"--model", "/m", "--listen", "::1"}, "--listen"},
  };
  for (const auto& [args, needle] : cases) {
    absl::StatusOr<CommandLine> c = ParseCommandLine(args, Env({}));
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(c.status().message().find(needle), absl::string_view::npos) << c.status();
    EXPECT_EQ(c.status().message().find('\n'), absl::string_view::npos) << c.status();
  }
  absl::StatusOr<CommandLine> env = ParseCommandLine({"--model", "/m"}, Env({{"TOMESERVE_MAX_STEPS", "x"}}));
  EXPECT_NE(env.status().message().find("TOMESERVE_MAX_STEPS"), absl::string_view::npos) << env.status();
  const std::string config = WriteConfig("model: /m\nnot_a_flag: 1\n");
  absl::StatusOr<CommandLine> file = ParseCommandLine({"--config", config}, Env({}));
  EXPECT_NE(file.status().message().find("not_a_flag"), absl::string_view::npos) << file.status();
}

TEST(OptionsTest, ListenAddressForms) {
  for (const std::string listen : {"127.0.0.1:0", "0.0.0.0:50051", "[::1]:9000", "localhost:1", "unix:/tmp/s"}) {
    absl::StatusOr<CommandLine> c = ParseCommandLine({"--model", "/m", "--listen", listen}, Env({}));
    EXPECT_TRUE(c.ok()) << listen << ": " << c.status();
  }
}

TEST(OptionsTest, MisspeltEnvironmentVariableNamesTheFlagMeant) {
  absl::Status s = CheckEnvironmentNames({"PATH", "TOMESERVE_MAX_BATCHSIZE"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("TOMESERVE_MAX_BATCHSIZE"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("--max-batch-size"), absl::string_view::npos) << s;
  EXPECT_EQ(s.message().find('\n'), absl::string_view::npos) << s;
  EXPECT_EQ(CheckEnvironmentNames({"TOMESERVE_DEVICE"}).code(), absl::StatusCode::kInvalidArgument);
  // Real settings and the other tools' own variables pass.
  EXPECT_TRUE(CheckEnvironmentNames({"TOMESERVE_MAX_BATCH_SIZE", "TOMESERVE_LISTEN", "TOMESERVE_CONFIG",
                                     "TOMESERVE_TARGET", "TOMESERVE_TINY_MODEL", "TOMESERVE_SD15_MODEL",
                                     "TOMESERVE_REF_DIR", "TOMESERVE_BIN_DIR", "TOMESERVE_PYTHON",
                                     "TOMESERVE_CLI_GRPC_LOG", "TOMESERVE_PLOT_OUT", "TOMESERVE_EXTRA_APT",
                                     "TOMESERVE_TEST_TOKENIZER_DIR", "TOMESERVE_TINY_LEGACY_MODEL"})
                  .ok());
}

}  // namespace
}  // namespace tomeserve::server
