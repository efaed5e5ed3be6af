// A minimal HTTP/1.x endpoint for Prometheus scrapes: GET or HEAD /metrics answers with `body()`, another path
// 404, another method 405, a request over 8 KiB 431. prometheus-cpp's own Exposer (civetweb) cannot start its
// threads in this process: libtorch's static TLS is larger than civetweb's fixed thread stack, so
// pthread_create fails with EINVAL.
//
// One thread runs one poll() loop over the listener and every connection (non-blocking sockets), so a slow,
// partial or idle client never blocks a scrape: each connection must deliver its request within 5 s and is
// closed 10 s after it was accepted whatever it does; at most 64 are open (at the cap a new connection
// replaces the oldest one still waiting for its request); accept errors (EMFILE, ...) back off from 50 ms to
// 1 s instead of spinning.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace tomeserve::server {

class MetricsHttpServer {
 public:
  // Listens on "host:port" (port 0 picks one). `body` runs on the server's thread.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& listen,
                                                                  std::function<std::string()> body);
  ~MetricsHttpServer();  // stops and joins
  int port() const { return port_; }

 private:
  MetricsHttpServer(int fd, int port, std::function<std::string()> body);
  void Run();

  const int fd_;
  const int port_;
  const std::function<std::string()> body_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace tomeserve::server
