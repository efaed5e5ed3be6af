// The HTTP front door (--http-listen): the OpenAI Images API, the AUTOMATIC1111 API and the playground page on
// the same GenerateFront, scheduler and workers as gRPC. Built on cpp-httplib (docs/dependencies.md): its thread
// pool runs the handlers; a generate handler blocks its pool thread until the job finishes (the job runs on a
// worker; no torch work on HTTP threads: only JSON and base64).
//
// Routes (the README's "HTTP API" section has the field mappings):
//   GET  /healthz                 liveness (200 unless a worker left service), no token
//   GET  /readyz                  readiness (200 once the models are warm, 503 while loading or draining), no token
//   GET  /                        the playground page (static; its calls need a token when the server has one)
//   POST /v1/images/generations   GET /v1/models
//   POST /sdapi/v1/txt2img        GET /sdapi/v1/{sd-models,samplers,schedulers,scripts,progress}
//   GET|POST /sdapi/v1/options    POST /sdapi/v1/interrupt
// Every route but the first three needs "Authorization: Bearer <token>" when --auth-token-file is set (HTTP
// Basic with the token as password is accepted too: A1111 clients send that). Bodies are limited to
// --max-request-bytes (413); a request may set a deadline with the header "X-Request-Timeout: <seconds>" (504
// when it passes). Every answered request is counted (tomeserve_http_requests_total{route,code}).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/generate_front.h"
#include "server/metrics.h"

namespace tomeserve::server {

struct HttpServerOptions {
  std::string listen;                          // HOST:PORT; port 0 picks a free one
  std::string tls_cert, tls_key, tls_client_ca;  // PEM files; empty cert: plaintext
  size_t max_body_bytes = 64 * 1024;
  int threads = 8;  // concurrent requests (each generate call holds one until it is answered)
};

class HttpServer {
 public:
  // Binds and starts serving (readiness 503 until SetReady(true)). `front` and `metrics` must outlive it.
  // Errors (a taken port, unreadable TLS files) are UNAVAILABLE or INVALID_ARGUMENT naming the flag.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const HttpServerOptions& options, GenerateFront* front,
                                                           Metrics* metrics);
  ~HttpServer();  // Stop() and Join()

  int port() const;
  void SetReady(bool ready);
  void SetLive(bool live);
  // Closes the listener; requests in flight go on, idle keep-alive connections close.
  void Stop();
  // Waits until no generate call is in flight or `deadline` passes.
  void AwaitCalls(absl::Time deadline);
  // Waits for the server thread (after Stop; every in-flight call must be able to finish).
  void Join();

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tomeserve::server
