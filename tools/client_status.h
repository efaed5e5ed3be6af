// How tomeserve-cli reports failures: every gRPC status class gets its own exit code, so that scripts can
// tell "fix the request" from "retry later" from "the server is gone" without parsing messages. The table is
// printed by --help (kExitCodeHelp) and pinned by tests/python/test_client_cli.py.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace tomeserve::tools {

inline constexpr int kExitOk = 0;
inline constexpr int kExitLocal = 1;         // local failure: unreadable TLS file, unwritable output
inline constexpr int kExitUsage = 2;         // bad command line
inline constexpr int kExitRejected = 3;      // INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION
inline constexpr int kExitNotFound = 4;      // NOT_FOUND (unknown model or health service)
inline constexpr int kExitUnavailable = 5;   // UNAVAILABLE (unreachable, draining) or health not SERVING
inline constexpr int kExitDeadline = 6;      // DEADLINE_EXCEEDED (--timeout passed)
inline constexpr int kExitExhausted = 7;     // RESOURCE_EXHAUSTED (queue full, out of memory)
inline constexpr int kExitCancelled = 8;     // CANCELLED, ABORTED
inline constexpr int kExitAuth = 9;          // UNAUTHENTICATED, PERMISSION_DENIED
inline constexpr int kExitServerError = 10;  // INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, anything else

extern const char kExitCodeHelp[];

// The exit code for a failed call's status class (kExitOk for OK).
int ExitCodeFor(grpc::StatusCode code);
// "OK", "INVALID_ARGUMENT", ... as grpc spells them.
const char* StatusCodeName(grpc::StatusCode code);
// The message on one line: newlines and tabs become spaces, surrounding blanks go.
std::string OneLine(const std::string& text);

// Print "tomeserve-cli: <CODE>: <message>" on stderr and return ExitCodeFor(code).
int RpcError(const grpc::Status& status);
// Print "tomeserve-cli: <message> (see --help)" on stderr and return kExitUsage.
int UsageError(const absl::Status& status);
// Print "tomeserve-cli: <message>" on stderr and return kExitLocal.
int LocalError(const absl::Status& status);

}  // namespace tomeserve::tools
