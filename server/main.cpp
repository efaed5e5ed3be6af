// tomeserve: the gRPC server binary. Startup order (as llama.cpp's server does, so health answers early):
// parse the configuration -> start gRPC (health NOT_SERVING, reflection on) -> load and warm up every model
// on every device -> health SERVING. SIGTERM/SIGINT: health NOT_SERVING, wait --shutdown-grace, stop accepting,
// let in-flight calls finish within --drain-timeout (then cancel them), stop the scheduler and workers, exit 0.
// Exit codes: 0 after a drain, 1 on a startup failure (model folder, port, TLS files), 2 on a usage error, 3 when
// no worker is left in service (device-fatal errors or hung steps; health turns NOT_SERVING first).
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <pthread.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.pb.h"
#include "pipeline/device.h"
#include "pipeline/huge_pages.h"
#include "server/auth.h"
#include "server/device_probe.h"
#include "server/metrics.h"
#include "server/options.h"
#include "server/scheduler.h"
#include "server/step_time_model.h"
#include "server/http_server.h"
#include "server/service.h"
#include "server/worker.h"

namespace tomeserve::server {
namespace {

constexpr int kStartupFailure = 1;
constexpr int kUsageError = 2;
constexpr int kNoWorkerLeft = 3;
// grpc.health.v1 service name for liveness probes.
constexpr std::string_view kLivenessService = "liveness";

// %* in a pattern: the message as the inside of a JSON string.
class JsonMessageFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    for (char c : msg.payload) {
      switch (c) {
        case '"':
          dest.append(std::string_view("\\\""));
          break;
        case '\\':
          dest.append(std::string_view("\\\\"));
          break;
        case '\n':
          dest.append(std::string_view("\\n"));
          break;
        case '\t':
          dest.append(std::string_view("\\t"));
          break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\u%04x", c);
            dest.append(std::string_view(buf));
          } else {
            dest.push_back(c);
          }
      }
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

void SetUpLogging(const std::string& format) {
  auto logger =
      std::make_shared<spdlog::logger>("tomeserve", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  if (format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
    formatter->add_flag<JsonMessageFlag>('*').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","thread":%t,"msg":"%*"})");
    logger->set_formatter(std::move(formatter));
  } else {
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%eZ %L %t %v", spdlog::pattern_time_type::utc);
  }
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(std::move(logger));
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, " ", path, ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const ServerOptions& o) {
  if (o.tls_cert.empty()) return grpc::InsecureServerCredentials();
  absl::StatusOr<std::string> cert = ReadFile(o.tls_cert, "--tls-cert");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile(o.tls_key, "--tls-key");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions ssl(o.tls_client_ca.empty()
                                            ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                            : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!o.tls_client_ca.empty()) {
    absl::StatusOr<std::string> ca = ReadFile(o.tls_client_ca, "--tls-client-ca");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
  }
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  return grpc::SslServerCredentials(ssl);
}

absl::Status WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << port << "\n";
    if (!out.good()) return absl::PermissionDeniedError(absl::StrCat("--port-file ", path, ": cannot write"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("--port-file ", path, ": ", ec.message()));
  return absl::OkStatus();
}

// A duration as a gRPC channel argument in milliseconds (an int), capped at INT_MAX.
int ChannelArgMs(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), std::numeric_limits<int>::max()));
}

// What the signal thread uses. Heap-owned and never freed: the thread is detached and may still be in sigwait
// while Run() returns and main exits, so nothing it touches may live on Run()'s stack.
struct SignalState {
  sigset_t signals;
  absl::Notification stop;          // notified by the first SIGTERM/SIGINT
  std::shared_ptr<TokenAuth> auth;  // SIGHUP re-reads its file; set before the thread starts, then read-only
};

int Fail(const absl::Status& status) {
  spdlog::error("startup failed: {}", std::string(status.message()));
  return kStartupFailure;
}

int Run(int argc, char** argv, bool huge_pages) {
  // Signals are taken by one thread (sigwait); every other thread inherits the blocked mask.
  SignalState* const signal_state = new SignalState();  // leaked on purpose (see SignalState)
  sigemptyset(&signal_state->signals);
  sigaddset(&signal_state->signals, SIGTERM);
  sigaddset(&signal_state->signals, SIGINT);
  sigaddset(&signal_state->signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signal_state->signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<CommandLine> cli =
      ParseCommandLine(std::vector<std::string>(argv + 1, argv + argc), RealEnvironment());
  if (!cli.ok()) {
    std::fprintf(stderr, "tomeserve: %s\n", std::string(cli.status().message()).c_str());
    return kUsageError;
  }
  if (cli->help) {
    std::fputs(HelpText().c_str(), stdout);
    return 0;
  }
  if (absl::Status s = CheckEnvironmentNames(EnvironmentNames()); !s.ok()) {
    std::fprintf(stderr, "tomeserve: %s\n", std::string(s.message()).c_str());
    return kUsageError;
  }
  const ServerOptions& o = cli->options;
  SetUpLogging(o.log_format);

  absl::StatusOr<std::vector<std::string>> devices = ResolveDevices(o.devices);
  if (!devices.ok()) {
    std::fprintf(stderr, "tomeserve: %s\n", std::string(devices.status().message()).c_str());
    return kUsageError;
  }
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(o.metrics_listen);
  if (!metrics.ok()) return Fail(metrics.status());
  {
    const RuntimeVersions versions = GetRuntimeVersions();
    BuildInfo info{.version = TOMESERVE_VERSION, .git_commit = TOMESERVE_GIT_COMMIT, .torch = versions.torch,
                   .cuda = versions.cuda};
    for (const std::string& d : *devices) info.devices.push_back(DeviceProductName(d));
    (*metrics)->SetBuildInfo(info);
    (*metrics)->SetQueueCapacity(o.max_queue_size);
    (*metrics)->SetQueueDepth(0);
    (*metrics)->AddInflight(0);
  }
  if (!o.metrics_listen.empty())
    spdlog::info("metrics on http://{}/metrics (port {})", o.metrics_listen, (*metrics)->port());

  // One step-time model per worker (each learns its own device); queue estimates use the first worker's.
  std::vector<std::unique_ptr<StepTimeModel>> step_times;
  for (size_t i = 0; i < devices->size(); ++i) step_times.push_back(std::make_unique<StepTimeModel>());
  Scheduler scheduler(
      {.mode = o.batching == "request" ? BatchingMode::kRequest : BatchingMode::kStep,
       .max_batch_images = o.max_batch_size,
       .max_queue_delay = absl::Milliseconds(o.max_queue_delay_ms),
       .max_queue_size = o.max_queue_size},
      step_times.front().get(), [m = metrics->get()](int depth) { m->SetQueueDepth(depth); });
  RequestLimits limits{.max_prompt_bytes = o.max_prompt_bytes,
                       .max_prompt_tokens = o.max_prompt_tokens,
                       .max_side = o.max_side,
                       .max_pixels = o.max_pixels,
                       .max_steps = o.max_steps,
                       .max_images = o.max_images,
                       .default_tome_ratio = o.default_tome_ratio,
                       .default_latency_target_seconds = o.default_latency_target_seconds,
                       .adaptive_tome_max_ratio = o.adaptive_tome_max_ratio};
  if (!o.auth_token_file.empty()) {
    absl::StatusOr<std::unique_ptr<TokenAuth>> auth = TokenAuth::Create(o.auth_token_file);
    if (!auth.ok()) return Fail(auth.status());
    signal_state->auth = *std::move(auth);
  }
  // One path for every transport: gRPC and HTTP calls meet in the front, then the scheduler.
  GenerateFront front(limits, &scheduler, metrics->get(), signal_state->auth.get());
  front.set_log_prompts(o.log_prompts);
  ImageGeneratorService service(&front);

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = Credentials(o);
  if (!credentials.ok()) return Fail(credentials.status());
  grpc::EnableDefaultHealthCheckService(true);
  // Keeps grpc/health/v1/health.pb.o linked: its descriptors let reflection describe the health service.
  (void)grpc::health::v1::HealthCheckResponse::descriptor();
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(o.listen, *credentials, &port);
  // gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind too and split the traffic.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (o.max_connection_age > absl::ZeroDuration()) {
    // Clients behind a Kubernetes Service keep one connection to one pod; GOAWAY after this age makes them
    // reconnect (and spread over new replicas). Calls in flight on the old connection get the age grace.
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, ChannelArgMs(o.max_connection_age));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, ChannelArgMs(o.max_connection_age_grace));
  }
  // Transport limits: an oversized message is refused (RESOURCE_EXHAUSTED) before it is parsed; one connection
  // cannot open unbounded streams; dead peers are found by pings; clients that ping too often are sent away.
  builder.SetMaxReceiveMessageSize(o.max_request_bytes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, o.max_concurrent_streams);
  if (o.keepalive_time > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, ChannelArgMs(o.keepalive_time));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ChannelArgMs(o.keepalive_timeout));
  }
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             ChannelArgMs(o.min_client_ping_interval));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0)
    return Fail(absl::UnavailableError(
        absl::StrCat("cannot listen on ", o.listen, ": the address is in use (another server?) or not available")));
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  // The overall status ("") and the service's own name, both NOT_SERVING until the models are warm.
  health->SetServingStatus(v1::ImageGenerator::service_full_name(), false);
  health->SetServingStatus(false);
  // Liveness (a Kubernetes livenessProbe's gRPC service name) is SERVING from the start, through loading and
  // draining; only a worker leaving service (the process should be restarted) turns it NOT_SERVING.
  health->SetServingStatus(std::string(kLivenessService), true);
  spdlog::info("listening on {} (port {}), loading {} model(s) on {}", o.listen, port, o.models.size(),
               absl::StrJoin(*devices, ","));
  if (!o.port_file.empty()) {
    if (absl::Status s = WritePortFile(o.port_file, port); !s.ok()) return Fail(s);
  }
  std::unique_ptr<HttpServer> http;
  if (!o.http_listen.empty()) {
    // A generate call holds an HTTP thread until it is answered, and so does an idle keep-alive connection:
    // enough threads for a full queue and full running batches on every worker, plus 64 for idle connections,
    // listing routes and probes.
    absl::StatusOr<std::unique_ptr<HttpServer>> started = HttpServer::Start(
        {.listen = o.http_listen,
         .tls_cert = o.tls_cert,
         .tls_key = o.tls_key,
         .tls_client_ca = o.tls_client_ca,
         .max_body_bytes = static_cast<size_t>(o.max_request_bytes),
         .threads = o.max_queue_size + o.max_batch_size * static_cast<int>(devices->size()) + 64},
        &front, metrics->get());
    if (!started.ok()) {
      server->Shutdown();
      return Fail(started.status());
    }
    http = *std::move(started);
    spdlog::info("HTTP on {} (port {}): OpenAI /v1/images/generations, AUTOMATIC1111 /sdapi/v1, playground /",
                 o.http_listen, http->port());
    if (!o.http_port_file.empty()) {
      if (absl::Status s = WritePortFile(o.http_port_file, http->port()); !s.ok()) return Fail(s);
    }
  }

  // Signals: the first SIGTERM/SIGINT starts the drain; later ones are logged. SIGHUP re-reads the tokens.
  absl::Notification& stop = signal_state->stop;
  std::thread([signal_state] {
    while (true) {
      int sig = 0;
      if (sigwait(&signal_state->signals, &sig) != 0) continue;
      if (sig == SIGHUP) {
        if (signal_state->auth == nullptr) continue;
        absl::StatusOr<int> tokens = signal_state->auth->Reload();
        if (tokens.ok()) {
          spdlog::info("SIGHUP: --auth-token-file re-read, {} token(s) in force", *tokens);
        } else {
          spdlog::error("SIGHUP: --auth-token-file not re-read, the previous tokens stay: {}",
                        std::string(tokens.status().message()));
        }
        continue;
      }
      if (signal_state->stop.HasBeenNotified()) {
        spdlog::warn("signal {} while draining; still draining", sig);
        continue;
      }
      spdlog::info("signal {}: draining", sig);
      signal_state->stop.Notify();
    }
  }).detach();

  // Workers that left service (a device-fatal error or a stuck step). Liveness fails at the first: the process
  // should be restarted; with none left the server exits.
  std::atomic<int> out_of_service{0};
  absl::Notification none_left;
  const int num_workers = static_cast<int>(devices->size());
  auto on_out_of_service = [&, health](const std::string& device, const absl::Status& why) {
    health->SetServingStatus(std::string(kLivenessService), false);
    if (http != nullptr) http->SetLive(false);
    spdlog::error("{} left service: {}; liveness is NOT_SERVING", device, std::string(why.message()));
    if (out_of_service.fetch_add(1) + 1 == num_workers) none_left.Notify();
  };

  std::vector<std::unique_ptr<Worker>> workers;
  for (const std::string& device : *devices) {
    absl::StatusOr<std::unique_ptr<Worker>> worker =
        Worker::Create({.index = static_cast<int>(workers.size()),
                        .device = device,
                        .dtype = o.dtype,
                        .models = o.models,
                        .variant = o.variant,
                        .max_batch_images = o.max_batch_size,
                        .max_running_batches = o.max_running_batches,
                        .max_batch_cost = o.max_batch_cost,
                        .inject_oom_above_batch = o.inject_oom_above_batch,
                        .warmup_steps = o.warmup_steps,
                        .cuda_graphs = o.cuda_graphs,
                        .encode_threads = o.encode_threads,
                        .stop_warmup = [signal_state] { return signal_state->stop.HasBeenNotified(); },
                        .inject_fault = o.inject_fault,
                        .inject_fault_at_step = o.inject_fault_at_step,
                        .inject_fault_every = o.inject_fault_every,
                        .step_timeout_seconds = o.step_timeout_seconds,
                        .on_out_of_service = on_out_of_service},
                       metrics->get(), step_times[workers.size()].get());
    if (!worker.ok()) {
      server->Shutdown();
      return Fail(worker.status());
    }
    workers.push_back(*std::move(worker));
    if (stop.HasBeenNotified()) break;
  }
  absl::Notification watchdog_stop;
  std::thread watchdog;
  if (!stop.HasBeenNotified()) {
    ModelCatalog catalog{.default_model = o.models.front().name, .models = workers.front()->Describe()};
    for (size_t i = 1; i < workers.size(); ++i) {
      std::vector<ModelDescription> more = workers[i]->Describe();
      for (size_t m = 0; m < more.size(); ++m) catalog.models[m].devices.push_back(more[m].devices.front());
    }
    front.SetCatalog(std::move(catalog));
    for (auto& w : workers) w->Start(&scheduler);
    health->SetServingStatus(true);
    if (http != nullptr) http->SetReady(true);
    spdlog::info("serving on port {} with {} worker(s), {} batching; CPU tensors of 2 MiB and more in huge pages: {}",
                 port, workers.size(), o.batching, huge_pages ? "yes" : "no");
    // The watchdog: device work past its limit takes its worker out of service (on this thread). It runs
    // until the workers are joined, so a hang while draining fails its calls and lets the process exit.
    watchdog = std::thread([&] {
      while (!watchdog_stop.WaitForNotificationWithTimeout(absl::Milliseconds(250))) {
        for (auto& w : workers) {
          if (w->in_service()) w->CheckStuck(absl::Now());
        }
      }
    });
    while (!stop.WaitForNotificationWithTimeout(absl::Milliseconds(100)) && !none_left.HasBeenNotified()) {
    }
    if (none_left.HasBeenNotified()) {
      watchdog_stop.Notify();
      watchdog.join();
      // Nothing can serve: answer what is queued (UNAVAILABLE), let the answers go out, and exit non-zero so
      // the orchestrator restarts the process. Worker threads may be stuck in a kernel: no joins, no
      // destructors.
      health->SetServingStatus(false);
      if (http != nullptr) http->SetReady(false);
      spdlog::error("no worker is left in service: exiting with {}", kNoWorkerLeft);
      scheduler.Stop();
      server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
      spdlog::default_logger()->flush();
      std::fflush(nullptr);
      std::_Exit(kNoWorkerLeft);
    }
  }

  // Drain. Health turns NOT_SERVING first; during --shutdown-grace the server still accepts and runs calls so
  // that a load balancer polling health moves traffic away before the listener closes.
  health->SetServingStatus(false);
  if (http != nullptr) http->SetReady(false);
  // Draining is not a reason to restart: liveness stays as it was (SERVING unless a worker left service).
  health->SetServingStatus(std::string(kLivenessService), out_of_service.load() == 0);
  if (o.shutdown_grace > absl::ZeroDuration()) {
    spdlog::info("NOT_SERVING; closing the listener in {}", absl::FormatDuration(o.shutdown_grace));
    absl::SleepFor(o.shutdown_grace);
  }
  spdlog::info("draining: finishing in-flight calls within {}", absl::FormatDuration(o.drain_timeout));
  scheduler.Drain();
  const absl::Time drain_deadline = absl::Now() + o.drain_timeout;
  if (http != nullptr) http->Stop();  // no new HTTP connections; calls in flight go on
  server->Shutdown(absl::ToChronoTime(drain_deadline));
  if (http != nullptr) http->AwaitCalls(drain_deadline);
  scheduler.Stop();
  for (auto& w : workers) w->Join();
  if (http != nullptr) http->Join();
  watchdog_stop.Notify();
  if (watchdog.joinable()) watchdog.join();
  if (out_of_service.load() > 0) {
    // A worker that left service may still be stuck in a kernel on a detached thread: skip destructors.
    spdlog::error("stopped with {} worker(s) out of service", out_of_service.load());
    spdlog::default_logger()->flush();
    std::fflush(nullptr);
    std::_Exit(kNoWorkerLeft);
  }
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace tomeserve::server

int main(int argc, char** argv) {
  // Before anything allocates a tensor: the CPU allocator reads the setting once.
  const bool huge_pages = tomeserve::pipeline::EnableHugePageAllocations();
  return tomeserve::server::Run(argc, argv, huge_pages);
}
