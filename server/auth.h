// Bearer-token authentication for the ImageGenerator service (--auth-token-file), and who a call belongs to.
// The file holds one token per line, optionally followed by its tenant and that tenant's limits:
//   TOKEN [tenant=NAME] [weight=W] [max_concurrent=N] [calls_per_second=R]
// Blank lines and lines starting with '#' are ignored. A token without tenant= belongs to "default". A tenant
// may have several tokens; a limit may be given on any of its lines, and two lines giving it different values
// are an error naming both. A call must carry `authorization: Bearer <token>` metadata naming one of the tokens,
// else UNAUTHENTICATED. Health and reflection are other services and stay open. Tokens are compared in constant
// time (per stored token, whatever the offered value) and never logged.
//
// The file is read again on Reload() (main calls it on SIGHUP) and when its modification time changes (a
// watcher thread owned by this object looks once a second; calls never touch the file). A reload that fails
// (unreadable, no token, a bad line) keeps the previous tokens and logs why. Thread-safe: Check runs on gRPC
// threads, Reload on the signal thread. Torch- and gRPC-free.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/tenants.h"

namespace tomeserve::server {

class TokenAuth {
 public:
  // Errors (unreadable file, no token in it, a bad line) name the flag, the file and the line.
  static absl::StatusOr<std::unique_ptr<TokenAuth>> Create(const std::filesystem::path& file);
  ~TokenAuth();  // stops the watcher

  // `authorization` is the call's authorization metadata value, if any: the token's tenant, or UNAUTHENTICATED.
  absl::StatusOr<TenantSpec> Check(std::optional<absl::string_view> authorization) const;
  // Reads the file again; on error keeps the current tokens. Returns how many tokens are now in force.
  absl::StatusOr<int> Reload();
  // Distinct tenants in force (1 when every token is "default"'s).
  int tenants() const;
  // Successful loads so far (the first one included).
  int64_t loads() const;

  struct Entry {
    std::string token;
    std::string tenant;  // index into tenants_ by name
  };

 private:
  explicit TokenAuth(std::filesystem::path file) : file_(std::move(file)) {}
  void ReloadIfChanged();
  void Watch();

  const std::filesystem::path file_;
  mutable absl::Mutex mu_;
  std::vector<Entry> tokens_ ABSL_GUARDED_BY(mu_);
  std::vector<TenantSpec> tenants_ ABSL_GUARDED_BY(mu_);
  std::filesystem::file_time_type mtime_ ABSL_GUARDED_BY(mu_);
  int64_t loads_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Notification stop_;
  std::thread watcher_;
};

// Equal strings, in time that depends only on `secret`'s length.
bool ConstantTimeEquals(absl::string_view offered, absl::string_view secret);

}  // namespace tomeserve::server
