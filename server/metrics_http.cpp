#include "server/metrics_http.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tomeserve::server {
namespace {

constexpr int kPollMs = 100;
constexpr absl::Duration kRequestLimit = absl::Seconds(5);     // the whole request must arrive by then
constexpr absl::Duration kConnectionLimit = absl::Seconds(10);  // and the answer be gone by then
constexpr size_t kMaxRequest = 8192;
constexpr size_t kMaxConnections = 64;
constexpr absl::Duration kMinBackoff = absl::Milliseconds(50), kMaxBackoff = absl::Seconds(1);

// One accepted connection: reading its request, then writing the answer.
struct Connection {
  int fd;
  absl::Time accepted;
  std::string in, out;
  size_t sent = 0;
  bool writing = false;
};

std::string Response(absl::string_view status, absl::string_view content_type, absl::string_view body,
                     bool head) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type, "\r\nContent-Length: ",
                      body.size(), "\r\nConnection: close\r\n\r\n", head ? "" : body);
}

// The answer to a complete request head.
std::string Answer(absl::string_view request, const std::function<std::string()>& body) {
  const size_t line_end = request.find_first_of("\r\n");
  const std::vector<absl::string_view> parts =
      absl::StrSplit(request.substr(0, line_end), absl::ByChar(' '), absl::SkipEmpty());
  const absl::string_view method = parts.empty() ? "" : parts[0];
  const absl::string_view target = parts.size() > 1 ? parts[1] : "";
  const bool head = method == "HEAD";
  if (method != "GET" && !head) return Response("405 Method Not Allowed", "text/plain", "GET or HEAD only\n", false);
  const absl::string_view path = target.substr(0, target.find('?'));
  if (path != "/metrics") return Response("404 Not Found", "text/plain", "not found: try /metrics\n", head);
  return Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", body(), head);
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
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 128) != 0) {
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
  std::vector<Connection> connections;
  absl::Time accept_resume = absl::InfinitePast();
  absl::Duration backoff = kMinBackoff;
  while (!stop_.load()) {
    const absl::Time now = absl::Now();
    // Drop connections past their limits.
    std::erase_if(connections, [&](const Connection& c) {
      const bool late = now > c.accepted + kConnectionLimit || (!c.writing && now > c.accepted + kRequestLimit);
      if (late) ::close(c.fd);
      return late;
    });
    std::vector<pollfd> fds;
    const bool accepting = now >= accept_resume;
    fds.push_back({.fd = fd_, .events = static_cast<short>(accepting ? POLLIN : 0), .revents = 0});
    for (const Connection& c : connections) {
      fds.push_back({.fd = c.fd, .events = static_cast<short>(c.writing ? POLLOUT : POLLIN), .revents = 0});
    }
    if (::poll(fds.data(), fds.size(), kPollMs) <= 0) continue;

    for (size_t i = 1; i < fds.size(); ++i) {
      Connection& c = connections[i - 1];
      if (fds[i].revents == 0) continue;
      if (!c.writing) {
        char buf[2048];
        const ssize_t n = ::recv(c.fd, buf, sizeof(buf), 0);
        if (n <= 0) {
          if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
          c.out.clear();
          c.writing = true;  // closed below: nothing to send
          c.sent = 0;
          continue;
        }
        c.in.append(buf, static_cast<size_t>(n));
        if (c.in.size() > kMaxRequest) {
          c.out = Response("431 Request Header Fields Too Large", "text/plain", "request too large\n", false);
          c.writing = true;
        } else if (c.in.find("\r\n\r\n") != std::string::npos || c.in.find("\n\n") != std::string::npos) {
          c.out = Answer(c.in, body_);
          c.writing = true;
        }
      }
      if (c.writing && c.sent < c.out.size() && (fds[i].revents & (POLLOUT | POLLIN))) {
        const ssize_t n = ::send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
        if (n > 0) c.sent += static_cast<size_t>(n);
        if (n < 0 && errno != EAGAIN && errno != EINTR) c.sent = c.out.size();  // peer gone: give up
      }
    }
    std::erase_if(connections, [](const Connection& c) {
      const bool done = c.writing && c.sent >= c.out.size();
      if (done) ::close(c.fd);
      return done;
    });

    if (accepting && (fds[0].revents & POLLIN)) {
      const int fd = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (errno != EAGAIN && errno != EINTR) {
          // EMFILE, ENFILE, ENOBUFS, ...: wait before trying again instead of spinning on a listener that stays
          // readable.
          accept_resume = absl::Now() + backoff;
          backoff = std::min(backoff * 2, kMaxBackoff);
        }
        continue;
      }
      backoff = kMinBackoff;
      if (connections.size() >= kMaxConnections) {
        // At the cap, the oldest connection still waiting for its request makes room: idle or trickling
        // clients cannot lock a scraper out. (All answering: the new one waits for a retry.)
        auto oldest = std::find_if(connections.begin(), connections.end(),
                                   [](const Connection& c) { return !c.writing; });
        if (oldest == connections.end()) {
          ::close(fd);
          continue;
        }
        ::close(oldest->fd);
        connections.erase(oldest);
      }
      connections.push_back({.fd = fd, .accepted = absl::Now()});
    }
  }
  for (const Connection& c : connections) ::close(c.fd);
}

}  // namespace tomeserve::server
