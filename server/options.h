// Server configuration: abseil flags (declared in options.cpp), the environment (TOMESERVE_<FLAG>, e.g.
// TOMESERVE_MAX_BATCH_SIZE) and an optional YAML or JSON file (--config FILE or TOMESERVE_CONFIG; keys are
// flag names with '-' or '_'). Precedence: command line > environment > file > defaults. Parsed once in main,
// before any thread starts. Torch-free.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tomeserve::server {

struct ModelSpec {
  std::string name;  // "NAME=DIR" gives NAME; a bare DIR is named after its folder
  std::string dir;
};

struct ServerOptions {
  std::vector<ModelSpec> models;  // the first is the default model
  std::string listen = "0.0.0.0:50051";
  std::string metrics_listen;  // empty: no metrics endpoint
  std::string http_listen;     // empty: no HTTP front door
  std::string devices = "auto";
  std::string dtype = "auto";
  std::string variant;  // diffusers weight variant ("fp16"); empty: plain weights or the only variant
  std::string batching = "step";  // "step" or "request"
  int max_batch_size = 8;
  int max_running_batches = 2;
  int64_t max_batch_cost = 0;  // rows x latent pixels; 0 = derived per device
  double default_latency_target_seconds = 0;
  double adaptive_tome_max_ratio = 0;
  int max_queue_delay_ms = 20;
  int max_queue_size = 64;
  double default_tome_ratio = 0;  // off: see --default-tome-ratio's help
  absl::Duration drain_timeout = absl::Seconds(30);
  absl::Duration shutdown_grace = absl::ZeroDuration();
  absl::Duration max_connection_age = absl::ZeroDuration();  // zero: connections are never aged out
  absl::Duration max_connection_age_grace = absl::Seconds(600);
  // Transport limits (gRPC channel arguments): they protect the process from what validation never sees.
  int max_request_bytes = 64 * 1024;
  int max_concurrent_streams = 32;
  absl::Duration keepalive_time = absl::Seconds(60);  // zero: the server never pings
  absl::Duration keepalive_timeout = absl::Seconds(20);
  absl::Duration min_client_ping_interval = absl::Seconds(10);
  bool log_prompts = false;
  int max_prompt_bytes = 4096;
  int max_prompt_tokens = 77;
  int max_side = 1024;
  int64_t max_pixels = 1024 * 1024;
  int max_steps = 150;
  int max_images = 4;
  std::string log_format = "text";
  std::string tls_cert, tls_key, tls_client_ca;
  std::string auth_token_file;  // empty: no authentication
  int inject_oom_above_batch = -1;  // -1: off; N >= 0: fail UNet batches of more than N images
  std::string inject_fault;       // "", "request", "fatal" or "stuck" (--inject-worker-fault KIND@N)
  int inject_fault_at_step = 0;
  bool inject_fault_every = false;  // request%N: every Nth step
  double step_timeout_seconds = 0;  // 0 = automatic
  std::string port_file;
  std::string http_port_file;
  int warmup_steps = 2;
  bool cuda_graphs = true;
  int encode_threads = -1;  // -1: 2 on CUDA devices, 0 on the CPU
};

struct CommandLine {
  bool help = false;  // --help: print HelpText() and exit 0
  ServerOptions options;
};

// Looks up an environment variable; tests pass a fake.
using GetEnvFn = std::function<std::optional<std::string>(const std::string&)>;
GetEnvFn RealEnvironment();
// The names of the process's environment variables.
std::vector<std::string> EnvironmentNames();
// A TOMESERVE_* variable that is no flag but within two edits of one (a misspelling such as
// TOMESERVE_MAX_BATCHSIZE) is INVALID_ARGUMENT naming the variable and the flag meant; other TOMESERVE_*
// variables (the test and client tools' own, such as TOMESERVE_TARGET) pass.
absl::Status CheckEnvironmentNames(const std::vector<std::string>& names);

// Parses argv[1..] (flags as --name=value or --name value; '-' and '_' are interchangeable), the environment
// and the config file. Errors are INVALID_ARGUMENT with a one-line message naming the flag, variable or key.
// Resets the flags to their defaults first, so it may be called more than once (tests).
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args, const GetEnvFn& getenv);

std::string HelpText();

}  // namespace tomeserve::server
