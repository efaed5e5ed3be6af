#include "server/metrics_http.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tomeserve::server {
namespace {

constexpr int kPollMs = 200;
constexpr int kReadTimeoutMs = 2000;
// Each blocking send/recv gives up after this; the whole connection after kConnectionLimit. The server has
// one thread, so a scraper that stops reading (or trickles its request) must not hold /metrics or the exit.
constexpr int kIoTimeoutMs = 2000;
constexpr absl::Duration kConnectionLimit = absl::Seconds(10);
constexpr size_t kMaxRequest = 8192;

void WriteAll(int fd, const std::string& data, absl::Time deadline) {
  size_t done = 0;
  while (done < data.size() && absl::Now() < deadline) {
    // SO_SNDTIMEO bounds each call: -1 with EAGAIN once the peer has not read for kIoTimeoutMs.
    const ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

void SetIoTimeouts(int fd) {
  const timeval tv{.tv_sec = kIoTimeoutMs / 1000, .tv_usec = (kIoTimeoutMs % 1000) * 1000};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& listen, std::function<std::string()> body) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-listen ", listen, ": expected HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  if (absl::StartsWith(host, "[") && absl::EndsWith(host, "]")) host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string port_text = std::to_string(port);
  if (int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port_text.c_str(), &hints, &found);
      rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-listen ", listen, ": ", gai_strerror(rc)));
  }
  int fd = -1;
  std::string error = "no address";
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 16) != 0) {
      error = std::strerror(errno);
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  if (fd < 0)
    return absl::UnavailableError(absl::StrCat("--metrics-listen ", listen, ": cannot listen: ", error));
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const int bound_port = bound.ss_family == AF_INET6
                             ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                             : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer(fd, bound_port, std::move(body)));
}

MetricsHttpServer::MetricsHttpServer(int fd, int port, std::function<std::string()> body)
    : fd_(fd), port_(port), body_(std::move(body)) {
  thread_ = std::thread([this] { Run(); });
}

MetricsHttpServer::~MetricsHttpServer() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  ::close(fd_);
}

void MetricsHttpServer::Run() {
  while (!stop_.load()) {
    pollfd p{.fd = fd_, .events = POLLIN, .revents = 0};
    if (::poll(&p, 1, kPollMs) <= 0) continue;
    const int connection = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) continue;
    SetIoTimeouts(connection);
    Serve(connection);
    ::close(connection);
  }
}

void MetricsHttpServer::Serve(int connection) {
  const absl::Time deadline = absl::Now() + kConnectionLimit;
  std::string request;
  char buf[1024];
  while (request.find("\r\n\r\n") == std::string::npos && request.find("\n\n") == std::string::npos) {
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) return;
    pollfd p{.fd = connection, .events = POLLIN, .revents = 0};
    if (::poll(&p, 1, static_cast<int>(std::min<int64_t>(kReadTimeoutMs, left_ms))) <= 0) return;
    const ssize_t n = ::recv(connection, buf, sizeof(buf), 0);
    if (n <= 0) return;
    request.append(buf, static_cast<size_t>(n));
    if (request.size() > kMaxRequest) {
      WriteAll(
          connection,
          "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
          deadline);
      return;
    }
  }
  const bool head = absl::StartsWith(request, "HEAD ");
  const bool metrics =
      (absl::StartsWith(request, "GET /metrics") || absl::StartsWith(request, "HEAD /metrics")) &&
      (request.size() > 12 && (request[head ? 13 : 12] == ' ' || request[head ? 13 : 12] == '?'));
  if (!metrics) {
    const std::string text = "not found: try /metrics\n";
    WriteAll(connection,
             absl::StrCat("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: ",
                          text.size(), "\r\nConnection: close\r\n\r\n", text),
             deadline);
    return;
  }
  const std::string body = body_();
  WriteAll(connection,
           absl::StrCat("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                        "Content-Length: ",
                        body.size(), "\r\nConnection: close\r\n\r\n", head ? "" : body),
           deadline);
}

}  // namespace tomeserve::server
