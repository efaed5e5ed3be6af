// A small parser for "tool SUBCOMMAND --flag value --switch" command lines. Each subcommand declares the flags it
// accepts; anything else is a usage error that the tool prints as one line and exits with code 2.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace tomeserve::tools {

class CliArgs {
 public:
  // `value_flags` take one argument (--name V or --name=V); `switches` take none.
  static absl::StatusOr<CliArgs> Parse(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
                                       const std::set<std::string>& switches);

  bool Has(absl::string_view name) const { return values_.contains(std::string(name)); }
  std::optional<std::string> Get(absl::string_view name) const;
  absl::StatusOr<std::string> Required(absl::string_view name) const;
  // Typed accessors: absent -> `fallback`; present but malformed or outside [lo, hi] -> error naming the flag.
  absl::StatusOr<int64_t> GetInt(absl::string_view name, int64_t fallback, int64_t lo, int64_t hi) const;
  absl::StatusOr<double> GetDouble(absl::string_view name, double fallback, double lo, double hi) const;

 private:
  std::map<std::string, std::string> values_;  // switches map to ""
};

}  // namespace tomeserve::tools
