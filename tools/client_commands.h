// tomeserve-cli's subcommands. Each takes the connection options and the flags after the subcommand (parsed
// by the caller against the sets each declares) and returns the process exit code (see client_status.h).
#pragma once

#include "tools/cli_args.h"
#include "tools/client_channel.h"

namespace tomeserve::tools {

// GenerateStream with a progress line; writes the images and prints a summary on stdout.
int GenerateCommand(const ConnectionOptions& connection, const CliArgs& args);
// ListModels: one line per model.
int ListModelsCommand(const ConnectionOptions& connection, const CliArgs& args);
// grpc.health.v1.Health/Check for --service (default "": the whole server); prints the serving status.
int HealthCommand(const ConnectionOptions& connection, const CliArgs& args);

}  // namespace tomeserve::tools
