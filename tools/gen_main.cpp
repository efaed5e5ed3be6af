// tomeserve-gen: the offline tool. Subcommands:
//   tokenize --model DIR [--pad] [--max-length N] [--tokenizer tokenizer|tokenizer_2]   prompts on stdin (one per line) -> one JSON id array per line
//   generate --model DIR --prompt TEXT ... -o OUT.png  text-to-image (see kUsage)
// Usage errors print one line on stderr and exit 2; runtime errors exit 1.
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_join.h"
#include "pipeline/clip_tokenizer.h"
#include "pipeline/device.h"
#include "pipeline/huge_pages.h"
#include "tools/cli_args.h"
#include "tools/gen_commands.h"

namespace tomeserve::tools {
namespace {

constexpr char kUsage[] =
    "usage: tomeserve-gen tokenize --model DIR [--pad] [--max-length N] [--tokenizer tokenizer|tokenizer_2]\n"
    "       tomeserve-gen generate --model DIR --prompt TEXT [--negative-prompt TEXT] [--width W --height H]\n"
    "                              [--steps N] [--guidance G] [--seed S|-1]\n"
    "                              [--scheduler pndm|ddim|euler|euler_a|dpmpp_2m|dpmpp_2m_karras]\n"
    "                              [--num-images N] [--device cpu|cuda:N] [--dtype fp32|fp16|bf16] [--variant V]\n"
    "                              [--init-latents FILE.safetensors] [--save-latents FILE.safetensors]\n"
    "                              [--tome-ratio R | --ratio R] [--tome-max-downsample 1|2|4|8] [--tome-sx N]\n"
    "                              [--tome-sy N]\n"
    "                              [--tome-no-rand] [--tome-merge-crossattn] [--tome-merge-mlp] [--tome-seed S]\n"
    "                              -o OUT.png|-\n"
    "  tokenize   read prompts from stdin, one per line; print each one's CLIP token ids as a JSON array\n"
    "             (bos ... eos, truncated to --max-length, default 77; --pad pads with the pad id)\n"
    "  generate   text-to-image; defaults follow diffusers: the model's native size, 50 steps, guidance 7.5,\n"
    "             the model's scheduler, a random seed (printed; --seed -1 asks for one too, as in A1111). Several\n"
    "             images: OUT-0.png, OUT-1.png, ... with seeds S, S+1, ...; -o - writes one PNG to stdout (the\n"
    "             seed line then goes to stderr). --init-latents reads tensor \"latents\" [N,4,H/8,W/8];\n"
    "             --save-latents writes the final latents (before decoding) under the same name. --variant fp16\n"
    "             loads <name>.fp16.safetensors weights (diffusers' variant=); without it, the plain weights or the\n"
    "             only variant the folder has.\n"
    "             Token Merging (tomesd) is off by default; --tome-ratio R (or --ratio R, tomeserve-cli's name) in\n"
    "             [0, 1 - 1/(sx*sy)] turns it on with\n"
    "             tomesd's defaults (max downsample 1, stride 2x2, random dst per cell from --tome-seed, merging\n"
    "             before self-attention only).\n";

}  // namespace

int UsageError(const absl::Status& status) {
  std::fprintf(stderr, "tomeserve-gen: %s (see --help)\n", std::string(status.message()).c_str());
  return 2;
}

int RuntimeError(const absl::Status& status) {
  std::fprintf(stderr, "tomeserve-gen: %s\n", std::string(status.message()).c_str());
  return 1;
}

int Tokenize(const std::vector<std::string>& rest) {
  absl::StatusOr<CliArgs> args = CliArgs::Parse(rest, {"model", "max-length", "tokenizer"}, {"pad"});
  if (!args.ok()) return UsageError(args.status());
  absl::StatusOr<std::string> model = args->Required("model");
  if (!model.ok()) return UsageError(model.status());
  absl::StatusOr<int64_t> max_length =
      args->GetInt("max-length", pipeline::ClipTokenizer::kMaxLength, 2, pipeline::ClipTokenizer::kMaxLength);
  if (!max_length.ok()) return UsageError(max_length.status());

  // SDXL folders have a second tokenizer (tokenizer_2, its own pad token).
  const std::string subfolder = args->Get("tokenizer").value_or("tokenizer");
  if (subfolder != "tokenizer" && subfolder != "tokenizer_2") {
    return UsageError(absl::InvalidArgumentError(
        absl::StrCat("--tokenizer is \"", subfolder, "\"; allowed: tokenizer or tokenizer_2")));
  }
  auto tokenizer = pipeline::ClipTokenizer::Load(std::filesystem::path(*model) / subfolder);
  if (!tokenizer.ok()) return RuntimeError(tokenizer.status());
  const bool pad = args->Has("pad");
  std::string line;
  while (std::getline(std::cin, line)) {
    std::vector<int32_t> ids = pad ? (*tokenizer)->EncodePadded(line, static_cast<int>(*max_length))
                                   : (*tokenizer)->Encode(line, static_cast<int>(*max_length));
    std::cout << '[' << absl::StrJoin(ids, ", ") << "]\n";
  }
  std::cout.flush();
  return std::cout.good() ? 0 : 1;
}

}  // namespace tomeserve::tools

int main(int argc, char** argv) {
  using namespace tomeserve::tools;
  tomeserve::pipeline::EnableHugePageAllocations();  // before any tensor exists
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return UsageError(absl::InvalidArgumentError("missing subcommand"));
  if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  if (command == "tokenize") return Tokenize(args);
  if (command == "generate") return Generate(args);
  return UsageError(absl::InvalidArgumentError("unknown subcommand \"" + command + "\""));
}
