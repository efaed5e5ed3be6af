#include "server/auth.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tomeserve::server {
namespace {

struct Parsed {
  std::vector<TokenAuth::Entry> tokens;
  std::vector<TenantSpec> tenants;
};

bool ValidTenantName(absl::string_view name) {
  return !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

absl::StatusOr<Parsed> ReadTokens(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--auth-token-file ", file.string(), ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  Parsed out;
  // Per tenant, per limit key: the value and the line that set it.
  std::map<std::string, std::map<std::string, std::pair<std::string, int>>> limits;
  std::vector<std::string> order;
  int number = 0;
  for (absl::string_view line : absl::StrSplit(ss.str(), '\n')) {
    ++number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    const std::string where = absl::StrCat("--auth-token-file ", file.string(), " line ", number);
    std::vector<absl::string_view> fields = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    TokenAuth::Entry entry{.token = std::string(fields[0]), .tenant = "default"};
    std::map<std::string, std::string> given;
    for (size_t i = 1; i < fields.size(); ++i) {
      std::pair<std::string, std::string> kv = absl::StrSplit(fields[i], absl::MaxSplits('=', 1));
      if (kv.first != "tenant" && kv.first != "weight" && kv.first != "max_concurrent" &&
          kv.first != "calls_per_second") {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": unknown field \"", absl::CHexEscape(kv.first),
            "\" after the token (allowed: tenant=NAME weight=W max_concurrent=N calls_per_second=R)"));
      }
      given[kv.first] = kv.second;
    }
    if (given.contains("tenant")) {
      entry.tenant = given["tenant"];
      if (!ValidTenantName(entry.tenant)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": tenant \"", absl::CHexEscape(entry.tenant), "\": 1-64 of [A-Za-z0-9._-]"));
      }
      given.erase("tenant");
    }
    if (!limits.contains(entry.tenant)) {
      limits[entry.tenant];
      order.push_back(entry.tenant);
    }
    for (const auto& [key, value] : given) {
      double v = 0;
      const bool ok = absl::SimpleAtod(value, &v) &&
                      (key == "weight"             ? v > 0 && v <= 1000
                       : key == "max_concurrent"   ? v >= 1 && v <= 100000 && v == static_cast<int>(v)
                                                   : v > 0 && v <= 100000);
      if (!ok) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": ", key, "=", absl::CHexEscape(value), ": allowed ",
            key == "weight" ? "(0, 1000]" : key == "max_concurrent" ? "an integer in [1, 100000]" : "(0, 100000]"));
      }
      auto [it, inserted] = limits[entry.tenant].try_emplace(key, value, number);
      if (!inserted && it->second.first != value) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": tenant \"", entry.tenant, "\" has ", key, "=",
                                                       it->second.first, " on line ", it->second.second));
      }
    }
    out.tokens.push_back(std::move(entry));
  }
  if (out.tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--auth-token-file ", file.string(),
        ": no token (one per line, optionally followed by tenant=NAME weight=W max_concurrent=N "
        "calls_per_second=R; '#' starts a comment)"));
  }
  for (const std::string& name : order) {
    TenantSpec t{.name = name};
    for (const auto& [key, value] : limits[name]) {
      double v = 0;
      (void)absl::SimpleAtod(value.first, &v);
      if (key == "weight") t.weight = v;
      if (key == "max_concurrent") t.max_concurrent = static_cast<int>(v);
      if (key == "calls_per_second") t.calls_per_second = v;
    }
    out.tenants.push_back(std::move(t));
  }
  return out;
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
  auth->watcher_ = std::thread([raw = auth.get()] { raw->Watch(); });
  return auth;
}

TokenAuth::~TokenAuth() {
  stop_.Notify();
  if (watcher_.joinable()) watcher_.join();
}

void TokenAuth::Watch() {
  while (!stop_.WaitForNotificationWithTimeout(absl::Seconds(1))) ReloadIfChanged();
}

absl::StatusOr<int> TokenAuth::Reload() {
  std::error_code ec;
  const std::filesystem::file_time_type mtime = std::filesystem::last_write_time(file_, ec);
  absl::StatusOr<Parsed> parsed = ReadTokens(file_);
  absl::MutexLock lock(&mu_);
  if (!ec) mtime_ = mtime;  // a broken file is not retried until it changes again
  if (!parsed.ok()) return parsed.status();
  tokens_ = std::move(parsed->tokens);
  tenants_ = std::move(parsed->tenants);
  ++loads_;
  return static_cast<int>(tokens_.size());
}

void TokenAuth::ReloadIfChanged() {
  {
    absl::MutexLock lock(&mu_);
    std::error_code ec;
    const std::filesystem::file_time_type mtime = std::filesystem::last_write_time(file_, ec);
    if (ec || mtime == mtime_) return;
  }
  absl::StatusOr<int> loaded = Reload();
  if (loaded.ok()) {
    spdlog::info("--auth-token-file {} changed: {} token(s) of {} tenant(s) in force", file_.string(), *loaded,
                 tenants());
  } else {
    spdlog::error("--auth-token-file changed but was not reloaded, the previous tokens stay: {}",
                  std::string(loaded.status().message()));
  }
}

absl::StatusOr<TenantSpec> TokenAuth::Check(std::optional<absl::string_view> authorization) const {
  constexpr absl::string_view kScheme = "Bearer ";
  if (!authorization.has_value() || !absl::StartsWithIgnoreCase(*authorization, kScheme)) {
    return absl::UnauthenticatedError(
        "this server requires a token: send metadata \"authorization: Bearer <token>\" (tomeserve-cli "
        "--token-file FILE)");
  }
  const absl::string_view offered = absl::StripAsciiWhitespace(authorization->substr(kScheme.size()));
  const Entry* match = nullptr;
  absl::MutexLock lock(&mu_);
  for (const Entry& e : tokens_) {
    if (ConstantTimeEquals(offered, e.token) && match == nullptr) match = &e;  // every token compared
  }
  if (match == nullptr) return absl::UnauthenticatedError("the bearer token is not valid for this server");
  for (const TenantSpec& t : tenants_) {
    if (t.name == match->tenant) return t;
  }
  return TenantSpec{.name = match->tenant};
}

int TokenAuth::tenants() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(tenants_.size());
}

int64_t TokenAuth::loads() const {
  absl::MutexLock lock(&mu_);
  return loads_;
}

}  // namespace tomeserve::server
