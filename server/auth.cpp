#include "server/auth.h"

#include <spdlog/spdlog.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

namespace tomeserve::server {
namespace {

absl::StatusOr<std::vector<std::string>> ReadTokens(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--auth-token-file ", file.string(), ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(ss.str(), '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth-token-file ", file.string(), ": no token (one per line; '#' starts a comment)"));
  }
  return tokens;
}

}  // namespace

bool ConstantTimeEquals(absl::string_view offered, absl::string_view secret) {
  unsigned char diff = offered.size() == secret.size() ? 0 : 1;
  for (size_t i = 0; i < secret.size(); ++i) {
    const unsigned char o = i < offered.size() ? static_cast<unsigned char>(offered[i]) : 0;
    diff |= static_cast<unsigned char>(o ^ static_cast<unsigned char>(secret[i]));
  }
  return diff == 0;
}

absl::StatusOr<std::unique_ptr<TokenAuth>> TokenAuth::Create(const std::filesystem::path& file) {
  auto auth = std::unique_ptr<TokenAuth>(new TokenAuth(file));
  absl::StatusOr<int> loaded = auth->Reload();
  if (!loaded.ok()) return loaded.status();
  return auth;
}

absl::StatusOr<int> TokenAuth::Reload() {
  std::error_code ec;
  const std::filesystem::file_time_type mtime = std::filesystem::last_write_time(file_, ec);
  absl::StatusOr<std::vector<std::string>> tokens = ReadTokens(file_);
  absl::MutexLock lock(&mu_);
  if (!ec) mtime_ = mtime;  // a broken file is not retried until it changes again
  if (!tokens.ok()) return tokens.status();
  tokens_ = *std::move(tokens);
  return static_cast<int>(tokens_.size());
}

void TokenAuth::ReloadIfChanged() {
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    if (now < next_check_) return;
    next_check_ = now + absl::Seconds(1);
    std::error_code ec;
    const std::filesystem::file_time_type mtime = std::filesystem::last_write_time(file_, ec);
    if (ec || mtime == mtime_) return;
  }
  absl::StatusOr<int> loaded = Reload();
  if (loaded.ok()) {
    spdlog::info("--auth-token-file {} changed: {} token(s) in force", file_.string(), *loaded);
  } else {
    spdlog::error("--auth-token-file changed but was not reloaded, the previous tokens stay: {}",
                  std::string(loaded.status().message()));
  }
}

absl::Status TokenAuth::Check(std::optional<absl::string_view> authorization) {
  ReloadIfChanged();
  constexpr absl::string_view kScheme = "Bearer ";
  if (!authorization.has_value() || !absl::StartsWithIgnoreCase(*authorization, kScheme)) {
    return absl::UnauthenticatedError(
        "this server requires a token: send metadata \"authorization: Bearer <token>\" (tomeserve-cli "
        "--token-file FILE)");
  }
  const absl::string_view offered = absl::StripAsciiWhitespace(authorization->substr(kScheme.size()));
  bool ok = false;
  absl::MutexLock lock(&mu_);
  for (const std::string& token : tokens_) ok |= ConstantTimeEquals(offered, token);  // no early exit
  if (!ok) return absl::UnauthenticatedError("the bearer token is not valid for this server");
  return absl::OkStatus();
}

}  // namespace tomeserve::server
