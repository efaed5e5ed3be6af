// tomeserve-cli: a command-line client for the tomeserve.v1.ImageGenerator service.
//   tomeserve-cli --target HOST:PORT [TLS flags] [--timeout S] generate|list-models|health [flags]
// gRPC's own log lines are dropped (set TOMESERVE_CLI_GRPC_LOG=1 to keep them, with
// GRPC_VERBOSITY/GRPC_TRACE). Connection flags may stand before or after the subcommand. Usage errors print
// one line on stderr and exit 2; gRPC failures print "tomeserve-cli: <CODE>: <message>" and exit with the
// status class's code (kExitCodeHelp).
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "grpc/support/log.h"
#include "tools/cli_args.h"
#include "tools/client_channel.h"
#include "tools/client_commands.h"
#include "tools/client_request.h"
#include "tools/client_status.h"

namespace tomeserve::tools {
namespace {

constexpr char kUsage[] =
    "usage: tomeserve-cli --target HOST:PORT [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]\n"
    "                     [--tls-server-name NAME] [--token-file FILE] [--timeout S] COMMAND [flags]\n"
    "commands:\n"
    "  generate --prompt TEXT [--negative-prompt TEXT] [--width W] [--height H] [--steps N] [--guidance G]\n"
    "           [--seed S|-1] [--num-images N] [--scheduler pndm|ddim|euler|euler_a|dpmpp_2m|dpmpp_2m_karras]\n"
    "           [--ratio R] [--max-ratio R --latency-target S] [--tome-max-downsample 1|2|4|8] [--tome-sx N]\n"
    "           [--tome-sy N] [--tome-no-rand]\n"
    "           [--tome-merge-crossattn] [--tome-merge-mlp] [--tome-no-merge-attn] [--tome-seed S]\n"
    "           [--model NAME] [--request-id ID] [--raw] [--quiet] -o OUT.png\n"
    "      text-to-image through GenerateStream: a progress line on a terminal (queue position, step i/n),\n"
    "      the images written to OUT.png (several: OUT-0.png, OUT-1.png, ...; --raw: RGB8 bytes, H*W*3), "
    "then a\n"
    "      summary on stdout (seeds, timings, batch size, ToMe settings, merged tokens). Unset flags take "
    "the\n"
    "      server's defaults (model's native size, 50 steps, guidance 7.5, model's scheduler, server's ToMe\n"
    "      ratio, random seed; --seed -1 also asks for a random one). --max-ratio with --latency-target lets the server raise the ratio up to\n"
    "      --max-ratio to meet an end-to-end target of S seconds (its SLO controller; the summary says which\n"
    "      ratio it chose and whether the target was predicted to be met).\n"
    "  list-models\n"
    "      one line per loaded model: name, native size, default scheduler, dtype, devices, default ToMe\n"
    "      ratio and the request limits.\n"
    "  health [--service NAME]\n"
    "      grpc.health.v1 Check; prints SERVING / NOT_SERVING / ...; exits 0 only when SERVING.\n"
    "connection:\n"
    "  --target HOST:PORT   the server (default: $TOMESERVE_TARGET); plaintext unless a TLS flag is given\n"
    "  --tls-ca FILE        PEM roots that sign the server certificate (TLS; default: the system's roots)\n"
    "  --tls-cert/--tls-key client certificate and key (mTLS)\n"
    "  --tls-server-name    the name to check the server certificate against (when --target is an address)\n"
    "  --token-file FILE    send the bearer token in FILE (its first line) as \"authorization: Bearer\"\n"
    "                       metadata, for servers started with --auth-token-file\n"
    "  --timeout S          the call's deadline in seconds (default: generate 600, list-models/health 10)\n";

const std::set<std::string> kConnectionFlags = {"target",          "tls-ca",  "tls-cert",  "tls-key",
                                                "tls-server-name", "timeout", "token-file"};

std::set<std::string> Union(const std::set<std::string>& a, const std::set<std::string>& b) {
  std::set<std::string> out = a;
  out.insert(b.begin(), b.end());
  return out;
}

// gRPC's own log lines would break the one-line error contract; failures reach the user through statuses.
void QuietGrpcLog(gpr_log_func_args* /*args*/) {}

}  // namespace

int ClientMain(std::vector<std::string> args) {
  for (std::string& a : args) {
    if (a == "-o") a = "--output";
    if (a == "-h") a = "--help";
  }
  // The subcommand is the first argument that is neither a flag nor a connection flag's value.
  size_t command_at = args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--help" || (args[i] == "help" && i == 0)) {  // also "COMMAND --help"
      std::fputs(kUsage, stdout);
      std::fputs(kExitCodeHelp, stdout);
      return kExitOk;
    }
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].rfind("--", 0) != 0) {
      command_at = i;
      break;
    }
    const std::string name = args[i].substr(2);
    if (kConnectionFlags.contains(name)) ++i;  // skip its value (--name=value forms have none to skip)
  }
  if (command_at == args.size()) return UsageError(absl::InvalidArgumentError("missing command"));
  const std::string command = args[command_at];
  std::vector<std::string> flags(args.begin(), args.begin() + static_cast<std::ptrdiff_t>(command_at));
  flags.insert(flags.end(), args.begin() + static_cast<std::ptrdiff_t>(command_at) + 1, args.end());

  std::set<std::string> values, switches;
  if (command == "generate") {
    values = GenerateValueFlags();
    switches = GenerateSwitches();
  } else if (command == "health") {
    values = {"service"};
  } else if (command != "list-models") {
    return UsageError(absl::InvalidArgumentError(absl::StrCat("unknown command \"", command, "\"")));
  }
  absl::StatusOr<CliArgs> parsed = CliArgs::Parse(flags, Union(values, kConnectionFlags), switches);
  if (!parsed.ok()) return UsageError(parsed.status());
  absl::StatusOr<ConnectionOptions> connection = ParseConnectionOptions(*parsed);
  if (!connection.ok()) return UsageError(connection.status());

  if (command == "generate") return GenerateCommand(*connection, *parsed);
  if (command == "health") return HealthCommand(*connection, *parsed);
  return ListModelsCommand(*connection, *parsed);
}

}  // namespace tomeserve::tools

int main(int argc, char** argv) {
  if (std::getenv("TOMESERVE_CLI_GRPC_LOG") == nullptr) gpr_set_log_function(tomeserve::tools::QuietGrpcLog);
  return tomeserve::tools::ClientMain(std::vector<std::string>(argv + 1, argv + argc));
}
