// A minimal HTTP/1.x endpoint for Prometheus scrapes: GET /metrics answers with `body()`, anything else 404.
// prometheus-cpp's own Exposer (civetweb) cannot start its threads in this process: libtorch's static TLS is
// larger than civetweb's fixed thread stack, so pthread_create fails with EINVAL. One thread, one connection
// at a time (scrapes are rare and small): 2 s send/receive timeouts and 10 s per connection, so a stuck
// scraper cannot hold the endpoint or the exit; requests over 8 KiB are refused.
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
  void Serve(int connection);

  const int fd_;
  const int port_;
  const std::function<std::string()> body_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace tomeserve::server
