// libFuzzer target: the server's configuration loader (server/options.cpp): a --config file (YAML or JSON, read
// by yaml-cpp) with arbitrary content, through the same validation as flags and the environment. Every input
// gives options or a one-line error naming the key, never a crash.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

#include "server/options.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/tomeserve_fuzz_config_" + std::to_string(::getpid()) + ".yaml";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  if (size > 0) std::fwrite(data, 1, size, f);
  std::fclose(f);
  const auto no_env = [](const std::string&) -> std::optional<std::string> { return std::nullopt; };
  auto parsed = tomeserve::server::ParseCommandLine({"--config", path}, no_env);
  if (!parsed.ok() && parsed.status().message().find('\n') != std::string::npos) {
    std::fprintf(stderr, "multi-line error: %s\n", std::string(parsed.status().message()).c_str());
    __builtin_trap();
  }
  return 0;
}
