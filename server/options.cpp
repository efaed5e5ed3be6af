#include "server/options.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <vector>

#include <unistd.h>  // environ

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "tome/token_merging.h"

// Every server flag. --model is repeatable and handled by ParseCommandLine itself; the declaration documents
// it.
ABSL_FLAG(
    std::string, model, "",
    "Model folder (diffusers layout: SD 1.x or SDXL, from its model_index.json). Repeat as --model NAME=DIR to "
    "serve several (e.g. --model sd15=DIR --model sdxl=DIR); the first is the default model, a bare DIR is named "
    "after its folder. Environment/file: comma-separated or a list.");
ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "gRPC address HOST:PORT (port 0 picks a free port).");
ABSL_FLAG(std::string, metrics_listen, "", "Prometheus /metrics address HOST:PORT; empty turns metrics off.");
ABSL_FLAG(std::string, http_listen, "",
          "HTTP address HOST:PORT (port 0 picks a free port) for the OpenAI Images API (/v1/images/generations), "
          "the AUTOMATIC1111 API (/sdapi/v1/...) and the playground page (/), on the same scheduler and workers as "
          "gRPC; TLS and bearer tokens as for gRPC (--tls-cert, --auth-token-file); empty turns it off.");
ABSL_FLAG(std::string, devices, "auto",
          "auto (every CUDA device, else cpu), cpu, or cuda:0,cuda:1,...; one "
          "worker thread per device (cpu:0,cpu:1,... names several CPU workers sharing the cores).");
ABSL_FLAG(std::string, dtype, "auto", "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.");
ABSL_FLAG(std::string, variant, "",
          "diffusers weight variant to load in every model component, as diffusers' variant= (fp16 loads "
          "<name>.fp16.safetensors); empty: the plain weights, or the only variant a folder has.");
ABSL_FLAG(std::string, batching, "step",
          "step: running batches re-formed at every denoising step (calls join and leave at step boundaries "
          "when the batching policy finds it pays; any steps, scheduler, guidance and ToMe settings share a UNet "
          "call); request: a batch of calls with equal settings runs start to end (the pre-step-level "
          "behaviour, for comparison).");
ABSL_FLAG(int32_t, max_batch_size, 8, "Most images in one UNet batch.");
ABSL_FLAG(int32_t, max_running_batches, 2,
          "--batching step: batches of different model or size a worker holds side by side; at each step "
          "boundary the one with the most urgent call steps, so a call of another size need not wait for a "
          "running batch to drain. 1 = one at a time.");
ABSL_FLAG(int64_t, max_batch_cost, 0,
          "Budget of one running batch in UNet rows x latent pixels (a guided 512x512 image is 2 x 64 x 64 = "
          "8192); a call larger than it runs alone. 0 = derived: on CUDA from the memory left after loading, on "
          "CPU 65536.");
ABSL_FLAG(int32_t, max_queue_delay_ms, 20,
          "--batching request only: how long the oldest queued request may wait for batch-mates.");
ABSL_FLAG(double, default_latency_target_seconds, 0,
          "SLO ratio controller: end-to-end latency target for requests that set no latency_target_seconds "
          "(0 = none).");
ABSL_FLAG(double, adaptive_tome_max_ratio, 0,
          "SLO ratio controller: the highest ToMe ratio the server may raise a request's ratio to when the "
          "request sets no tome.max_ratio (0 = off; at most 0.75 with the default strides).");
ABSL_FLAG(int32_t, max_queue_size, 64,
          "Most queued (not yet running) requests; beyond it RESOURCE_EXHAUSTED.");
ABSL_FLAG(double, default_tome_ratio, 0,
          "Token Merging ratio for requests that leave tome.ratio unset (0 = off, the default: on an H200 ratio "
          "0.5 made SD 1.5 at 512x512 slower, docs/benchmarks.md; at most 0.75, tomesd's cap for its default "
          "strides sx = sy = 2). A request opts in with tome.ratio, or lets the SLO controller choose with "
          "tome.max_ratio and a latency target.");
ABSL_FLAG(double, drain_timeout, 30,
          "Seconds to finish in-flight calls after SIGTERM/SIGINT before exiting.");
ABSL_FLAG(double, shutdown_grace, 0,
          "Seconds between health turning NOT_SERVING on SIGTERM/SIGINT and the listener closing, so that load "
          "balancers stop routing here first; calls still arrive and run meanwhile.");
ABSL_FLAG(double, max_connection_age, 0,
          "Seconds after which a client connection is asked to go away (GOAWAY; in-flight calls get "
          "--max-connection-age-grace to finish), so clients behind a Kubernetes Service reconnect and spread over "
          "new replicas; 0 = never.");
ABSL_FLAG(double, max_connection_age_grace, 600,
          "Seconds that calls in flight on a connection aged out by --max-connection-age get to finish before "
          "it closes (longer than the slowest call, or they are cut off).");
ABSL_FLAG(int32_t, max_request_bytes, 64 * 1024,
          "Largest request message in bytes; gRPC refuses a larger one with RESOURCE_EXHAUSTED before it is "
          "parsed.");
ABSL_FLAG(int32_t, max_concurrent_streams, 32,
          "Most calls in flight on one client connection (HTTP/2 MAX_CONCURRENT_STREAMS); the client holds "
          "further calls until one ends.");
ABSL_FLAG(double, keepalive_time, 60,
          "Seconds without traffic after which the server pings a client connection to find dead peers "
          "(0 = never).");
ABSL_FLAG(double, keepalive_timeout, 20, "Seconds the server waits for a ping's answer before closing.");
ABSL_FLAG(double, min_client_ping_interval, 10,
          "Shortest interval of client keepalive pings the server accepts; a client pinging faster is sent "
          "GOAWAY (too_many_pings) after 2 strikes.");
ABSL_FLAG(bool, log_prompts, false,
          "Include prompts and negative prompts in the per-call log line (off: prompts are never logged).");
ABSL_FLAG(int32_t, max_prompt_bytes, 4096, "Longest prompt / negative prompt in bytes.");
ABSL_FLAG(int32_t, max_prompt_tokens, 77,
          "Longest prompt in CLIP tokens including start/end (at most 77; "
          "longer prompts are rejected, not truncated).");
ABSL_FLAG(int32_t, max_side, 1024, "Largest width or height in pixels.");
ABSL_FLAG(int64_t, max_pixels, 1024 * 1024, "Largest width*height.");
ABSL_FLAG(int32_t, max_steps, 150, "Most num_inference_steps.");
ABSL_FLAG(int32_t, max_images, 4, "Most num_images per request.");
ABSL_FLAG(std::string, log_format, "text", "text or json (one JSON object per line).");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain; with --tls-key serves TLS.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls-cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; when set, clients must present a certificate it "
          "signed (mTLS).");
ABSL_FLAG(std::string, auth_token_file, "",
          "File of bearer tokens, one per line ('#' comments): every ImageGenerator call must send metadata "
          "\"authorization: Bearer <token>\" (else UNAUTHENTICATED); health and reflection stay open. Re-read on "
          "SIGHUP and when the file changes. Empty: no authentication.");
ABSL_FLAG(bool, enable_fault_injection, false,
          "TESTING AID: allow the --inject-* flags. They and this switch are accepted only on the command line "
          "(never from TOMESERVE_* variables or --config), so a stray setting cannot break a production server.");
ABSL_FLAG(int32_t, inject_oom_above_batch, -1,
          "TESTING AID (needs --enable-fault-injection): fail every UNet batch of more than N images with an "
          "injected out-of-memory error (0 fails every batch, single images included; the warm-up is never "
          "affected; -1 = off).");
ABSL_FLAG(std::string, inject_worker_fault, "",
          "TESTING AID (needs --enable-fault-injection): KIND@N injects one fault into every worker. At its Nth "
          "denoising step: request (a request-level error), fatal (a device-fatal error), stuck (the step never "
          "returns) or oom (a transient out-of-memory error); start: an exception while starting its Nth call; "
          "text-oom: an out-of-memory error in its Nth text encoding. request%N fails every Nth step (soak "
          "tests). Empty: off.");
ABSL_FLAG(double, step_timeout_seconds, 0,
          "The watchdog takes a worker out of service when one piece of device work (a denoising step, a text "
          "encoding, a VAE decode, the wait for the image encoders) runs longer than this (a hung device); 0 = "
          "50x the worker's last step, at least 120 s.");
ABSL_FLAG(std::string, port_file, "", "After startup, write the bound gRPC port to this file.");
ABSL_FLAG(std::string, http_port_file, "", "After startup, write the bound --http-listen port to this file.");
ABSL_FLAG(int32_t, warmup_steps, 2, "Denoising steps of the warm-up run per model and device at startup.");
ABSL_FLAG(int32_t, encode_threads, -1,
          "Threads per worker that encode finished images (PNG), so the device keeps stepping the rest of the "
          "batch meanwhile; 0 = on the worker's own thread; -1 = 2 on CUDA devices, 0 on the CPU (where they "
          "would take cores from the UNet).");
ABSL_FLAG(bool, cuda_graphs, true,
          "On CUDA devices, run UNet calls through CUDA graphs: each batch layout (size, rows, ToMe groups) is "
          "captured on its second call and replayed after (ignored on the CPU).");
ABSL_FLAG(std::string, config, "", "YAML or JSON file of flag values (keys are flag names).");

namespace tomeserve::server {
namespace {

std::string Canonical(absl::string_view name) { return absl::StrReplaceAll(name, {{"-", "_"}}); }
std::string Dashed(absl::string_view name) { return absl::StrReplaceAll(name, {{"_", "-"}}); }
std::string EnvName(absl::string_view name) {
  return absl::StrCat("TOMESERVE_", absl::AsciiStrToUpper(name));
}

// Our flags (declared in this file), by canonical name.
std::map<std::string, absl::CommandLineFlag*> OwnFlags() {
  std::map<std::string, absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (absl::EndsWith(flag->Filename(), "server/options.cpp")) flags[std::string(name)] = flag;
  }
  return flags;
}

// Usage errors are one line: messages from libraries (absl's flag parser quotes the value raw; yaml-cpp) may
// hold newlines from user text.
std::string OneLine(absl::string_view message) {
  return absl::StrReplaceAll(message, {{"\n", "\\n"}, {"\r", "\\r"}});
}

absl::Status SetFlag(absl::CommandLineFlag* flag, const std::string& value, const std::string& where) {
  std::string error;
  if (!flag->ParseFrom(value, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": invalid value \"", absl::CHexEscape(value), "\": ", OneLine(error)));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelSpec> ParseModel(const std::string& text, const std::string& where) {
  if (text.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": empty model folder"));
  ModelSpec m;
  const size_t eq = text.find('=');
  if (eq != std::string::npos && eq > 0 && text.find('/') > eq) {
    m.name = text.substr(0, eq);
    m.dir = text.substr(eq + 1);
  } else {
    m.dir = text;
    std::filesystem::path p(text);
    m.name = (p.has_filename() ? p.filename() : p.parent_path().filename()).string();
  }
  if (m.name.empty() || m.dir.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": expected DIR or NAME=DIR, got \"", absl::CHexEscape(text), "\""));
  }
  return m;
}

absl::Status AddModels(const std::vector<std::string>& texts, const std::string& where,
                       std::vector<ModelSpec>* out) {
  for (const std::string& t : texts) {
    absl::StatusOr<ModelSpec> m = ParseModel(t, where);
    if (!m.ok()) return m.status();
    for (const ModelSpec& other : *out) {
      if (other.name == m->name) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": two models are named \"", absl::CHexEscape(m->name),
                         "\"; name them with NAME=DIR"));
      }
    }
    out->push_back(*m);
  }
  return absl::OkStatus();
}

// The testing aids that break a server on purpose, and the switch that allows them: command line only.
bool IsFaultInjectionFlag(absl::string_view name) {
  return name == "enable_fault_injection" || absl::StartsWith(name, "inject_");
}

constexpr absl::string_view kFaultInjectionOnlyOnCommandLine =
    "fault-injection settings are accepted only on the command line, next to --enable-fault-injection";

absl::Status ApplyConfigEntries(const std::string& path, const YAML::Node& root,
                                const std::map<std::string, absl::CommandLineFlag*>& flags,
                                std::vector<std::string>* models) {
  for (const auto& kv : root) {
    const std::string raw_key = kv.first.as<std::string>();
    const std::string key = Canonical(raw_key);
    const std::string where = absl::StrCat("--config ", path, ": key ", absl::CHexEscape(raw_key));
    const YAML::Node& value = kv.second;
    if (key == "model" || key == "models") {
      if (value.IsScalar()) {
        models->push_back(value.as<std::string>());
      } else if (value.IsSequence()) {
        for (const auto& v : value) {
          if (!v.IsScalar()) {
            return absl::InvalidArgumentError(absl::StrCat(where, ": expected DIR or NAME=DIR items"));
          }
          models->push_back(v.as<std::string>());
        }
      } else if (value.IsMap()) {
        for (const auto& v : value) {
          if (!v.first.IsScalar() || !v.second.IsScalar())
            return absl::InvalidArgumentError(absl::StrCat(where, ": expected NAME: DIR entries"));
          models->push_back(v.first.as<std::string>() + "=" + v.second.as<std::string>());
        }
      }
      continue;
    }
    auto it = flags.find(key);
    if (it == flags.end() || key == "config") {
      return absl::InvalidArgumentError(absl::StrCat(where, ": unknown setting"));
    }
    if (IsFaultInjectionFlag(key)) return absl::InvalidArgumentError(absl::StrCat(where, ": ", kFaultInjectionOnlyOnCommandLine));
    if (!value.IsScalar())
      return absl::InvalidArgumentError(absl::StrCat(where, ": expected a single value"));
    if (absl::Status s = SetFlag(it->second, value.as<std::string>(), where); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ApplyConfigFile(const std::string& path,
                             const std::map<std::string, absl::CommandLineFlag*>& flags,
                             std::vector<std::string>* models) {
  // Any yaml-cpp exception (a malformed file, a key or value of the wrong kind) is a usage error; found by
  // tests/fuzz/fuzz_config.cpp (a list item that is itself a mapping used to escape as an exception).
  try {
    YAML::Node root = YAML::LoadFile(path);
    if (root.IsNull()) return absl::OkStatus();
    if (!root.IsMap()) return absl::InvalidArgumentError(absl::StrCat("--config ", path, ": expected a mapping"));
    return ApplyConfigEntries(path, root, flags, models);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("--config ", path, ": ", OneLine(e.what())));
  }
}

// A gRPC listen address: HOST:PORT with PORT in 0..65535 ([v6]:PORT too), or a unix: socket path. A bare host
// would otherwise bind gRPC's default port 443.
bool IsListenAddress(absl::string_view address) {
  if (absl::StartsWith(address, "unix:")) return address.size() > 5;
  const size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  const absl::string_view host = address.substr(0, colon);
  if (absl::StrContains(host, ':') && !(absl::StartsWith(host, "[") && absl::EndsWith(host, "]"))) return false;
  int port = -1;
  return absl::SimpleAtoi(address.substr(colon + 1), &port) && port >= 0 && port <= 65535 &&
         std::all_of(address.begin() + colon + 1, address.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Edit distance (insertions, deletions, substitutions, adjacent transpositions) between two short names.
int EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<std::vector<int>> d(a.size() + 1, std::vector<int>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = static_cast<int>(i);
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

absl::Status Check(bool ok, absl::string_view flag, absl::string_view allowed) {
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--", Dashed(flag), ": allowed: ", allowed));
}

}  // namespace

std::vector<std::string> EnvironmentNames() {
  std::vector<std::string> names;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const absl::string_view entry(*e);
    names.emplace_back(entry.substr(0, entry.find('=')));
  }
  return names;
}

absl::Status CheckEnvironmentNames(const std::vector<std::string>& names) {
  const auto flags = OwnFlags();
  for (const std::string& name : names) {
    if (!absl::StartsWith(name, "TOMESERVE_")) continue;
    const std::string given = absl::AsciiStrToLower(name.substr(10));
    if (flags.contains(given)) continue;
    // Compared without underscores, so TOMESERVE_MAXBATCH_SIZE and TOMESERVE_MAX_BATCHSIZE both find their flag.
    const std::string squeezed = absl::StrReplaceAll(given, {{"_", ""}});
    for (const auto& [flag, unused] : flags) {
      const std::string target = absl::StrReplaceAll(flag, {{"_", ""}});
      const int distance = EditDistance(squeezed, target);
      if (distance <= 2 && 3 * distance <= static_cast<int>(target.size())) {
        return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, " is not a tomeserve setting; did you mean ",
                                                       EnvName(flag), " (--", Dashed(flag), ")?"));
      }
    }
  }
  return absl::OkStatus();
}

GetEnvFn RealEnvironment() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args, const GetEnvFn& getenv) {
  const auto flags = OwnFlags();
  for (const auto& [name, flag] : flags) SetFlag(flag, flag->DefaultValue(), name).IgnoreError();

  // 1. Split the command line into (name, value) pairs; nothing is applied yet.
  CommandLine result;
  std::vector<std::pair<std::string, std::string>> cli;
  std::vector<std::string> cli_models;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h" || arg == "--helpfull") {
      result.help = true;
      return result;
    }
    if (!absl::StartsWith(arg, "--") || arg.size() == 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument \"", absl::CHexEscape(arg), "\" (see --help)"));
    }
    std::string name = arg.substr(2), value;
    const size_t eq = name.find('=');
    const auto bool_flag = [&flags](const std::string& n) {
      auto it = flags.find(Canonical(n));
      return it != flags.end() && it->second->IsOfType<bool>();
    };
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (bool_flag(name)) {
      value = "true";  // a bare switch (--log-prompts); --log-prompts=false turns it off
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
    }
    name = Canonical(name);
    if (flags.find(name) == flags.end()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", Dashed(name), " (see --help)"));
    }
    if (name == "model") {
      cli_models.push_back(value);
    } else {
      cli.emplace_back(name, value);
    }
  }

  // 2. The file, 3. the environment, 4. the command line: later ones overwrite.
  std::string config_path;
  if (auto env = getenv(EnvName("config"))) config_path = *env;
  for (const auto& [name, value] : cli) {
    if (name == "config") config_path = value;
  }
  std::vector<std::string> file_models, env_models;
  if (!config_path.empty()) {
    if (absl::Status s = ApplyConfigFile(config_path, flags, &file_models); !s.ok()) return s;
  }
  for (const auto& [name, flag] : flags) {
    auto env = getenv(EnvName(name));
    if (!env) continue;
    if (IsFaultInjectionFlag(name)) {
      return absl::InvalidArgumentError(absl::StrCat(EnvName(name), ": ", kFaultInjectionOnlyOnCommandLine));
    }
    if (name == "model") {
      env_models = absl::StrSplit(*env, ',', absl::SkipEmpty());
    } else if (absl::Status s = SetFlag(flag, *env, EnvName(name)); !s.ok()) {
      return s;
    }
  }
  for (const auto& [name, value] : cli) {
    if (absl::Status s = SetFlag(flags.at(name), value, absl::StrCat("--", Dashed(name))); !s.ok()) return s;
  }
  if (!absl::GetFlag(FLAGS_enable_fault_injection)) {
    for (const auto& [name, value] : cli) {
      if (IsFaultInjectionFlag(name)) {
        return absl::InvalidArgumentError(absl::StrCat("--", Dashed(name),
                                                       " is a testing aid: add --enable-fault-injection to use it"));
      }
    }
  }
  const std::vector<std::string>& models =
      !cli_models.empty() ? cli_models : (!env_models.empty() ? env_models : file_models);
  const std::string models_where =
      !cli_models.empty() ? "--model" : (!env_models.empty() ? EnvName("model") : "model");
  ServerOptions& o = result.options;
  if (absl::Status s = AddModels(models, models_where, &o.models); !s.ok()) return s;
  if (o.models.empty()) return absl::InvalidArgumentError("--model DIR is required (see --help)");

  o.listen = absl::GetFlag(FLAGS_listen);
  o.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  o.http_listen = absl::GetFlag(FLAGS_http_listen);
  o.devices = absl::GetFlag(FLAGS_devices);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.variant = absl::GetFlag(FLAGS_variant);
  o.batching = absl::GetFlag(FLAGS_batching);
  o.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  o.max_running_batches = absl::GetFlag(FLAGS_max_running_batches);
  o.max_batch_cost = absl::GetFlag(FLAGS_max_batch_cost);
  o.default_latency_target_seconds = absl::GetFlag(FLAGS_default_latency_target_seconds);
  o.adaptive_tome_max_ratio = absl::GetFlag(FLAGS_adaptive_tome_max_ratio);
  o.max_queue_delay_ms = absl::GetFlag(FLAGS_max_queue_delay_ms);
  o.max_queue_size = absl::GetFlag(FLAGS_max_queue_size);
  o.default_tome_ratio = absl::GetFlag(FLAGS_default_tome_ratio);
  const double drain = absl::GetFlag(FLAGS_drain_timeout);
  const double grace = absl::GetFlag(FLAGS_shutdown_grace);
  const double connection_age = absl::GetFlag(FLAGS_max_connection_age);
  const double connection_age_grace = absl::GetFlag(FLAGS_max_connection_age_grace);
  const double keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  const double keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  const double min_ping = absl::GetFlag(FLAGS_min_client_ping_interval);
  o.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  o.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  o.log_prompts = absl::GetFlag(FLAGS_log_prompts);
  o.max_prompt_bytes = absl::GetFlag(FLAGS_max_prompt_bytes);
  o.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  o.max_side = absl::GetFlag(FLAGS_max_side);
  o.max_pixels = absl::GetFlag(FLAGS_max_pixels);
  o.max_steps = absl::GetFlag(FLAGS_max_steps);
  o.max_images = absl::GetFlag(FLAGS_max_images);
  o.log_format = absl::GetFlag(FLAGS_log_format);
  o.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key = absl::GetFlag(FLAGS_tls_key);
  o.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  o.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  o.step_timeout_seconds = absl::GetFlag(FLAGS_step_timeout_seconds);
  if (const std::string fault = absl::GetFlag(FLAGS_inject_worker_fault); !fault.empty()) {
    const bool every = absl::StrContains(fault, '%');
    std::pair<std::string, std::string> parts = absl::StrSplit(fault, absl::MaxSplits(every ? '%' : '@', 1));
    const bool kind_ok = parts.first == "request" ||
                         (!every && (parts.first == "fatal" || parts.first == "stuck" || parts.first == "oom" ||
                                     parts.first == "start" || parts.first == "text-oom"));
    if (!kind_ok || !absl::SimpleAtoi(parts.second, &o.inject_fault_at_step) || o.inject_fault_at_step < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--inject-worker-fault is \"", absl::CHexEscape(fault),
                       "\"; allowed: request@N, fatal@N, stuck@N, oom@N, start@N, text-oom@N or request%N, N >= 1"));
    }
    o.inject_fault = parts.first;
    o.inject_fault_every = every;
  }
  o.inject_oom_above_batch = absl::GetFlag(FLAGS_inject_oom_above_batch);
  o.port_file = absl::GetFlag(FLAGS_port_file);
  o.http_port_file = absl::GetFlag(FLAGS_http_port_file);
  o.warmup_steps = absl::GetFlag(FLAGS_warmup_steps);
  o.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  o.encode_threads = absl::GetFlag(FLAGS_encode_threads);

  for (const absl::Status& s : {
           Check(IsListenAddress(o.listen), "listen",
                 absl::StrCat("HOST:PORT with a port in 0..65535 (0 picks a free one), or unix:PATH; got \"",
                              absl::CHexEscape(o.listen), "\"")),
           Check(o.http_listen.empty() || (IsListenAddress(o.http_listen) && !absl::StartsWith(o.http_listen, "unix:")),
                 "http_listen",
                 absl::StrCat("HOST:PORT with a port in 0..65535 (0 picks a free one), or empty (off); got \"",
                              absl::CHexEscape(o.http_listen), "\"")),
           Check(o.http_port_file.empty() || !o.http_listen.empty(), "http_port_file", "only with --http-listen"),
           Check(o.batching == "step" || o.batching == "request", "batching", "step or request"),
           Check(o.variant.empty() || (o.variant.find_first_of("/\\. ") == std::string::npos && o.variant.size() <= 32),
                 "variant", "a name such as fp16 (no '/', '.' or spaces)"),
           Check(o.max_batch_size >= 1, "max_batch_size", ">= 1"),
           Check(o.max_running_batches >= 1 && o.max_running_batches <= 16, "max_running_batches", "1..16"),
           Check(o.max_batch_cost >= 0, "max_batch_cost", ">= 0 (0 = derived)"),
           Check(o.default_latency_target_seconds >= 0 && o.default_latency_target_seconds <= 3600,
                 "default_latency_target_seconds", "[0, 3600] seconds (0 = none)"),
           Check(o.adaptive_tome_max_ratio >= 0 && o.adaptive_tome_max_ratio <= tome::MaxRatio(2, 2),
                 "adaptive_tome_max_ratio", absl::StrCat("[0, ", tome::MaxRatio(2, 2), "] (0 = off)")),
           Check(o.max_queue_delay_ms >= 0, "max_queue_delay_ms", ">= 0"),
           Check(o.max_queue_size >= 1, "max_queue_size", ">= 1"),
           // Requests that leave tome.ratio unset get it with tomesd's default strides (sx = sy = 2).
           Check(o.default_tome_ratio >= 0 && o.default_tome_ratio <= tome::MaxRatio(2, 2),
                 "default_tome_ratio",
                 absl::StrCat("[0, ", tome::MaxRatio(2, 2), "] (the most tomesd merges with sx = sy = 2)")),
           Check(drain >= 0, "drain_timeout", ">= 0 seconds"),
           Check(grace >= 0 && grace <= 3600, "shutdown_grace", "[0, 3600] seconds"),
           Check(connection_age >= 0 && connection_age <= 1e6, "max_connection_age",
                 "[0, 1000000] seconds (0 = never)"),
           Check(connection_age_grace >= 0 && connection_age_grace <= 1e6, "max_connection_age_grace",
                 "[0, 1000000] seconds"),
           // Two prompts of --max-prompt-bytes and the other fields must fit.
           Check(o.max_request_bytes >= 2 * o.max_prompt_bytes + 1024 && o.max_request_bytes <= 64 << 20,
                 "max_request_bytes",
                 absl::StrCat("[2 * max_prompt_bytes + 1024 = ", 2 * int64_t{o.max_prompt_bytes} + 1024,
                              ", 67108864]")),
           Check(o.max_concurrent_streams >= 1 && o.max_concurrent_streams <= 65536, "max_concurrent_streams",
                 "[1, 65536]"),
           Check(keepalive_time >= 0 && keepalive_time <= 86400, "keepalive_time", "[0, 86400] seconds (0 = never)"),
           Check(keepalive_timeout >= 1 && keepalive_timeout <= 3600, "keepalive_timeout", "[1, 3600] seconds"),
           Check(min_ping >= 0 && min_ping <= 3600, "min_client_ping_interval", "[0, 3600] seconds"),
           Check(o.max_prompt_bytes >= 1, "max_prompt_bytes", ">= 1"),
           Check(o.max_prompt_tokens >= 3 && o.max_prompt_tokens <= 77, "max_prompt_tokens", "[3, 77]"),
           Check(o.max_side >= 64 && o.max_side <= 16384, "max_side", "[64, 16384]"),
           Check(o.max_pixels >= 64 * 64, "max_pixels", ">= 4096"),
           Check(o.max_steps >= 1 && o.max_steps <= 1000, "max_steps", "[1, 1000]"),
           Check(o.max_images >= 1, "max_images", ">= 1"),
           Check(o.log_format == "text" || o.log_format == "json", "log_format", "text or json"),
           Check(o.dtype == "auto" || o.dtype == "fp32" || o.dtype == "fp16" || o.dtype == "bf16" ||
                     o.dtype == "float32" || o.dtype == "float16" || o.dtype == "bfloat16",
                 "dtype", "auto, fp32, fp16 or bf16"),
           Check(o.tls_cert.empty() == o.tls_key.empty(), "tls_cert", "set together with --tls-key"),
           Check(o.tls_client_ca.empty() || !o.tls_cert.empty(), "tls_client_ca", "only with --tls-cert"),
           Check(o.inject_oom_above_batch >= -1, "inject_oom_above_batch", ">= 0, or -1 (off)"),
           Check(o.warmup_steps >= 1, "warmup_steps", ">= 1"),
           Check(o.encode_threads >= -1 && o.encode_threads <= 16, "encode_threads", "-1 (auto) to 16"),
           Check(o.step_timeout_seconds >= 0, "step_timeout_seconds", ">= 0 seconds (0 = automatic)"),
       }) {
    if (!s.ok()) return s;
  }
  o.drain_timeout = absl::Seconds(drain);
  o.shutdown_grace = absl::Seconds(grace);
  o.max_connection_age = absl::Seconds(connection_age);
  o.max_connection_age_grace = absl::Seconds(connection_age_grace);
  o.keepalive_time = absl::Seconds(keepalive_time);
  o.keepalive_timeout = absl::Seconds(keepalive_timeout);
  o.min_client_ping_interval = absl::Seconds(min_ping);
  return result;
}

std::string HelpText() {
  std::string out =
      "Usage: tomeserve --model DIR [--model NAME=DIR ...] [flags]\n\n"
      "Serves tomeserve.v1.ImageGenerator (Stable Diffusion 1.x with per-request Token Merging) over gRPC, "
      "with\n"
      "grpc.health.v1.Health and server reflection. Every flag can also be set as the environment variable\n"
      "TOMESERVE_<FLAG> (e.g. TOMESERVE_MAX_BATCH_SIZE=4) or as a key of the --config YAML/JSON file;\n"
      "precedence: command line > environment > file > defaults. SIGTERM/SIGINT drain and exit "
      "0.\n\nFlags:\n";
  for (const auto& [name, flag] : OwnFlags()) {
    std::string def = flag->DefaultValue();
    absl::StrAppend(&out, "  --", Dashed(name), def.empty() ? "" : absl::StrCat(" (default ", def, ")"),
                    "\n      ", flag->Help(), "\n");
  }
  return out;
}

}  // namespace tomeserve::server
