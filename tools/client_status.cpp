#include "tools/client_status.h"

#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"

namespace tomeserve::tools {

const char kExitCodeHelp[] =
    "exit codes:\n"
    "   0  success (health: SERVING)\n"
    "   1  local failure (unreadable TLS file, output not writable, malformed response)\n"
    "   2  usage error (bad command line)\n"
    "   3  the server rejected the request: INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION\n"
    "   4  NOT_FOUND (unknown model; health: unknown service)\n"
    "   5  UNAVAILABLE (server unreachable, starting or draining; health: not SERVING)\n"
    "   6  DEADLINE_EXCEEDED (--timeout passed)\n"
    "   7  RESOURCE_EXHAUSTED (queue full or out of memory; retry later; a request over the server's\n"
    "      --max-request-bytes exits 3 instead: retrying cannot help)\n"
    "   8  CANCELLED or ABORTED\n"
    "   9  UNAUTHENTICATED or PERMISSION_DENIED\n"
    "  10  any other server error (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ...)\n"
    "gRPC failures print one line on stderr: \"tomeserve-cli: <CODE>: <message>\".\n";

int ExitCodeFor(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return kExitOk;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::FAILED_PRECONDITION:
      return kExitRejected;
    case grpc::StatusCode::NOT_FOUND:
      return kExitNotFound;
    case grpc::StatusCode::UNAVAILABLE:
      return kExitUnavailable;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return kExitDeadline;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return kExitExhausted;
    case grpc::StatusCode::CANCELLED:
    case grpc::StatusCode::ABORTED:
      return kExitCancelled;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      return kExitAuth;
    default:
      return kExitServerError;
  }
}

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

std::string OneLine(const std::string& text) {
  std::string out = absl::StrReplaceAll(text, {{"\r\n", " "}, {"\n", " "}, {"\r", " "}, {"\t", " "}});
  return std::string(absl::StripAsciiWhitespace(out));
}

int RpcError(const grpc::Status& status) {
  const std::string message = OneLine(status.error_message());
  // gRPC's own size check ("Received message larger than max (80010 vs. 65536)") answers RESOURCE_EXHAUSTED,
  // whose exit code means "retry later"; retrying the same request cannot help: it is a bad request.
  if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
      absl::StrContains(message, "larger than max")) {
    std::fprintf(stderr,
                 "tomeserve-cli: RESOURCE_EXHAUSTED: the request is larger than the server accepts (shorten the "
                 "prompt; the server's --max-request-bytes bounds it): %s\n",
                 message.c_str());
    return kExitRejected;
  }
  std::string hint;
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE && absl::StrContains(message, "Socket closed")) {
    hint = " (if the server uses TLS, pass --tls-ca FILE)";
  }
  std::fprintf(stderr, "tomeserve-cli: %s: %s%s\n", StatusCodeName(status.error_code()), message.c_str(),
               hint.c_str());
  return ExitCodeFor(status.error_code());
}

int UsageError(const absl::Status& status) {
  std::fprintf(stderr, "tomeserve-cli: %s (see --help)\n", OneLine(std::string(status.message())).c_str());
  return kExitUsage;
}

int LocalError(const absl::Status& status) {
  std::fprintf(stderr, "tomeserve-cli: %s\n", OneLine(std::string(status.message())).c_str());
  return kExitLocal;
}

}  // namespace tomeserve::tools
