// Bearer-token authentication for the ImageGenerator service (--auth-token-file). The file holds one token per
// line (blank lines and lines starting with '#' are ignored, surrounding white space trimmed). A call must carry
// `authorization: Bearer <token>` metadata naming one of them, else UNAUTHENTICATED. Health and reflection are
// other services and stay open. Tokens are compared in constant time (per stored token, whatever the offered
// value) and never logged.
//
// The file is read again on Reload() (main calls it on SIGHUP) and when its modification time changes (checked
// at most once a second by Check). A reload that fails (unreadable or no token) keeps the previous tokens and
// logs why. Thread-safe: Check runs on gRPC threads, Reload on the signal thread. Torch- and gRPC-free.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tomeserve::server {

class TokenAuth {
 public:
  // Errors (unreadable file, no token in it) name the flag and the file.
  static absl::StatusOr<std::unique_ptr<TokenAuth>> Create(const std::filesystem::path& file);

  // `authorization` is the call's authorization metadata value, if any. OK or UNAUTHENTICATED.
  absl::Status Check(std::optional<absl::string_view> authorization);
  // Reads the file again; on error keeps the current tokens. Returns how many tokens are now in force.
  absl::StatusOr<int> Reload();

 private:
  explicit TokenAuth(std::filesystem::path file) : file_(std::move(file)) {}
  void ReloadIfChanged();

  const std::filesystem::path file_;
  absl::Mutex mu_;
  std::vector<std::string> tokens_ ABSL_GUARDED_BY(mu_);
  std::filesystem::file_time_type mtime_ ABSL_GUARDED_BY(mu_);
  absl::Time next_check_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

// Equal strings, in time that depends only on `secret`'s length.
bool ConstantTimeEquals(absl::string_view offered, absl::string_view secret);

}  // namespace tomeserve::server
