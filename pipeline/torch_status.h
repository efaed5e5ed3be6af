// The one boundary where libtorch exceptions become absl::Status. Every public pipeline entry point that runs
// torch code wraps its body in GuardTorch(); nothing above the pipeline sees a c10::Error.
#pragma once

#include <exception>
#include "absl/strings/string_view.h"
#include <type_traits>

#include <c10/util/Exception.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace tomeserve::pipeline {

// The first line of a c10 message: libtorch appends multi-line backtraces that do not belong in a status.
absl::string_view FirstLine(absl::string_view message);

// Out of memory is RESOURCE_EXHAUSTED carrying the payload kOutOfMemoryPayload, so callers can tell it from
// other RESOURCE_EXHAUSTED errors (a full queue, a limit). OutOfMemoryError builds one (GuardTorch, and the
// server's injected OOM for tests); IsOutOfMemory recognises it. A status rebuilt from the message alone (new
// code or StrCat) loses the mark.
inline constexpr absl::string_view kOutOfMemoryPayload = "tomeserve/oom";
absl::Status OutOfMemoryError(absl::string_view message);
bool IsOutOfMemory(const absl::Status& status);

// A device that can no longer be trusted is INTERNAL carrying kDeviceFatalPayload: CUDA runtime failures
// (illegal memory access, device-side assert, launch failure, ECC or driver errors) are sticky, so every later
// call on that device would fail too. The server takes the device's worker out of service.
inline constexpr absl::string_view kDeviceFatalPayload = "tomeserve/device-fatal";
absl::Status DeviceFatalError(absl::string_view message);
bool IsDeviceFatal(const absl::Status& status);
// Whether a torch error message reports a CUDA runtime failure ("CUDA error: ...", "device-side assert", ...).
bool LooksDeviceFatal(absl::string_view message);

// Runs `fn` (returning absl::Status or absl::StatusOr<T>) and maps exceptions:
//   c10::OutOfMemoryError -> OutOfMemoryError() (RESOURCE_EXHAUSTED marked as OOM; the server evicts and
//     retries, and counts it),
//   a c10::Error that LooksDeviceFatal -> DeviceFatalError(),
//   other c10::Error / std::exception -> INTERNAL, prefixed with `what` (a request-level failure).
template <typename Fn>
auto GuardTorch(absl::string_view what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::OutOfMemoryError& e) {
    return OutOfMemoryError(absl::StrCat(what, ": out of memory: ", FirstLine(e.what_without_backtrace())));
  } catch (const c10::Error& e) {
    const absl::string_view message = FirstLine(e.what_without_backtrace());
    if (LooksDeviceFatal(message)) return DeviceFatalError(absl::StrCat(what, ": ", message));
    return absl::InternalError(absl::StrCat(what, ": ", message));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", FirstLine(e.what())));
  }
}

}  // namespace tomeserve::pipeline
