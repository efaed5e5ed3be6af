#include "tools/cli_args.h"

#include <charconv>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace tomeserve::tools {

absl::StatusOr<CliArgs> CliArgs::Parse(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
                                       const std::set<std::string>& switches) {
  CliArgs out;
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (!absl::StartsWith(arg, "--")) return absl::InvalidArgumentError(absl::StrCat("unexpected argument \"", arg, "\""));
    std::string name(arg.substr(2));
    std::optional<std::string> inline_value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      inline_value = name.substr(eq + 1);
      name.resize(eq);
    }
    if (switches.contains(name)) {
      if (inline_value) return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      out.values_[name] = "";
    } else if (value_flags.contains(name)) {
      if (!inline_value) {
        if (i + 1 >= args.size()) return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
        inline_value = args[++i];
      }
      out.values_[name] = *inline_value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
  }
  return out;
}

std::optional<std::string> CliArgs::Get(absl::string_view name) const {
  auto it = values_.find(std::string(name));
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::string> CliArgs::Required(absl::string_view name) const {
  std::optional<std::string> v = Get(name);
  if (!v || v->empty()) return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  return *v;
}

absl::StatusOr<int64_t> CliArgs::GetInt(absl::string_view name, int64_t fallback, int64_t lo, int64_t hi) const {
  std::optional<std::string> v = Get(name);
  if (!v) return fallback;
  int64_t x = 0;
  if (!absl::SimpleAtoi(*v, &x) || x < lo || x > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be an integer in [", lo, ", ", hi, "], got \"", *v, "\""));
  }
  return x;
}

absl::StatusOr<double> CliArgs::GetDouble(absl::string_view name, double fallback, double lo, double hi) const {
  std::optional<std::string> v = Get(name);
  if (!v) return fallback;
  double x = 0;
  if (!absl::SimpleAtod(*v, &x) || !std::isfinite(x) || x < lo || x > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be a number in [", lo, ", ", hi, "], got \"", *v, "\""));
  }
  return x;
}

}  // namespace tomeserve::tools
