// tomeserve-cli generate's command line -> tomeserve.v1.GenerateRequest. Only the shape of each value is
// checked here (a number, a known scheduler name); the server owns the ranges (multiples of 8, step limits,
// the ratio cap) and answers INVALID_ARGUMENT naming the field, which the CLI reports as exit code 3.
#pragma once

#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "tomeserve/v1/image_generator.pb.h"
#include "tools/cli_args.h"

namespace tomeserve::tools {

// The flags `generate` accepts besides the connection flags (values, then switches).
const std::set<std::string>& GenerateValueFlags();
const std::set<std::string>& GenerateSwitches();

// Unset flags stay unset in the request, so the server's defaults apply.
absl::StatusOr<v1::GenerateRequest> BuildGenerateRequest(const CliArgs& args);

// "pndm" -> SCHEDULER_PNDM, ..., "euler_a" -> SCHEDULER_EULER_ANCESTRAL; InvalidArgument listing the names.
absl::StatusOr<v1::Scheduler> ParseScheduler(const std::string& name);

// "out.png" with count > 1 -> "out-0.png", "out-1.png", ...
std::string OutputPath(const std::string& base, int index, int count);

}  // namespace tomeserve::tools
