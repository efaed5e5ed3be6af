// The connection settings every tomeserve-cli subcommand shares (--target, TLS, --token-file, --timeout) and
// the channel built from them. Plaintext unless a TLS flag is given.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "tools/cli_args.h"

namespace tomeserve::tools {

struct ConnectionOptions {
  std::string target;                     // HOST:PORT (any gRPC target URI works)
  std::string tls_ca, tls_cert, tls_key;  // PEM file paths; empty = unset
  std::string tls_server_name;            // overrides the name checked against the server certificate
  std::optional<double> timeout_s;        // unset: the subcommand's default deadline
  std::string token;                      // bearer token from --token-file; empty = none

  bool UsesTls() const { return !tls_ca.empty() || !tls_cert.empty() || !tls_key.empty(); }
};

// The global flags, validated (usage errors as InvalidArgument). --target falls back to $TOMESERVE_TARGET.
absl::StatusOr<ConnectionOptions> ParseConnectionOptions(const CliArgs& args);

// A channel to options.target. Reads the PEM files (NotFound/Internal naming the file when unreadable). The
// channel accepts responses up to 256 MiB (several large images in one GenerateResponse).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ConnectionOptions& options);

// Sets the call's deadline (options.timeout_s when given, else `fallback`: every call gets one, so the CLI
// never waits forever on a stuck server) and its "authorization: Bearer" metadata when a token is set.
void PrepareContext(grpc::ClientContext& context, const ConnectionOptions& options,
                    std::chrono::seconds fallback);

}  // namespace tomeserve::tools
