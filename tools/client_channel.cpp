#include "tools/client_channel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace tomeserve::tools {
namespace {

constexpr int kMaxResponseBytes = 256 << 20;

absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path) {
  if (path.empty()) return std::string();
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, ": cannot read ", path));
  std::ostringstream text;
  text << in.rdbuf();
  if (text.str().empty())
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " is empty"));
  return text.str();
}

// HOST:PORT, or a gRPC target URI (dns:///, unix:, ipv4:, ipv6:) passed through. http(s):// is an HTTP URL, not a
// gRPC target (gRPC would look the whole string up in DNS); a bare host would dial port 0.
absl::Status CheckTarget(const std::string& target) {
  if (absl::StartsWith(target, "http://") || absl::StartsWith(target, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--target ", target, ": give HOST:PORT without http:// or https:// (for TLS add --tls-ca FILE)"));
  }
  for (const char* scheme : {"dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:"}) {
    if (absl::StartsWith(target, scheme)) return absl::OkStatus();
  }
  const size_t colon = target.rfind(':');
  const std::string port = colon == std::string::npos ? "" : target.substr(colon + 1);
  if (port.empty() || !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      (target.find(':') != colon && target[0] != '[')) {
    return absl::InvalidArgumentError(absl::StrCat("--target ", target, ": needs a port, HOST:PORT (e.g. 127.0.0.1:50051)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ConnectionOptions> ParseConnectionOptions(const CliArgs& args) {
  ConnectionOptions o;
  if (auto target = args.Get("target")) {
    o.target = *target;
  } else if (const char* env = std::getenv("TOMESERVE_TARGET"); env != nullptr) {
    o.target = env;
  }
  if (o.target.empty()) return absl::InvalidArgumentError("--target HOST:PORT is required");
  if (absl::Status s = CheckTarget(o.target); !s.ok()) return s;
  o.tls_ca = args.Get("tls-ca").value_or("");
  o.tls_cert = args.Get("tls-cert").value_or("");
  o.tls_key = args.Get("tls-key").value_or("");
  o.tls_server_name = args.Get("tls-server-name").value_or("");
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together (client certificate for mTLS)");
  }
  if (!o.tls_server_name.empty() && !o.UsesTls()) {
    return absl::InvalidArgumentError("--tls-server-name needs --tls-ca (or --tls-cert/--tls-key)");
  }
  if (args.Has("timeout")) {
    absl::StatusOr<double> t = args.GetDouble("timeout", 0, 0.001, 7 * 24 * 3600.0);
    if (!t.ok()) return t.status();
    o.timeout_s = *t;
  }
  if (auto path = args.Get("token-file")) {
    absl::StatusOr<std::string> text = ReadPem("token-file", *path);
    if (!text.ok()) return text.status();
    // The first non-blank line that is not a comment, as the server reads its token file.
    for (absl::string_view line : absl::StrSplit(*text, '\n')) {
      line = absl::StripAsciiWhitespace(line);
      if (!line.empty() && line.front() != '#') {
        o.token = std::string(line);
        break;
      }
    }
    if (o.token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--token-file: ", *path, " holds no token"));
    }
  }
  return o;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ConnectionOptions& options) {
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(kMaxResponseBytes);
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.UsesTls()) {
    grpc::SslCredentialsOptions ssl;
    absl::StatusOr<std::string> ca = ReadPem("tls-ca", options.tls_ca);
    absl::StatusOr<std::string> cert = ReadPem("tls-cert", options.tls_cert);
    absl::StatusOr<std::string> key = ReadPem("tls-key", options.tls_key);
    for (const absl::Status& s : {ca.status(), cert.status(), key.status()}) {
      if (!s.ok()) return s;
    }
    ssl.pem_root_certs = *ca;  // empty: the system's roots
    ssl.pem_cert_chain = *cert;
    ssl.pem_private_key = *key;
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) channel_args.SetSslTargetNameOverride(options.tls_server_name);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  return grpc::CreateCustomChannel(options.target, credentials, channel_args);
}

void PrepareContext(grpc::ClientContext& context, const ConnectionOptions& options,
                    std::chrono::seconds fallback) {
  if (!options.token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", options.token));
  const auto timeout = options.timeout_s ? std::chrono::duration_cast<std::chrono::milliseconds>(
                                               std::chrono::duration<double>(*options.timeout_s))
                                         : std::chrono::duration_cast<std::chrono::milliseconds>(fallback);
  context.set_deadline(std::chrono::system_clock::now() + timeout);
}

}  // namespace tomeserve::tools
