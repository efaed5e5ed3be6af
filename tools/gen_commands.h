// tomeserve-gen's subcommands. Each takes the arguments after the subcommand name and returns the exit code:
// 0 success, 1 runtime failure, 2 usage error (one line on stderr).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace tomeserve::tools {

int Tokenize(const std::vector<std::string>& args);
int Generate(const std::vector<std::string>& args);

// Prints "tomeserve-gen: <message> (see --help)" and returns 2.
int UsageError(const absl::Status& status);
// Prints "tomeserve-gen: <message>" and returns 1.
int RuntimeError(const absl::Status& status);

}  // namespace tomeserve::tools
