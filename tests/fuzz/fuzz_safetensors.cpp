// libFuzzer target: the safetensors header parser and its checks (pipeline/safetensors.cpp). The input is a
// whole file (8-byte header length, JSON header, data); it is written to a file because SafetensorsFile maps
// its input. Every input must give a file or an error, never a crash, a sanitizer report or a read outside the
// mapping; for a file that opens, every tensor's bytes are read.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "pipeline/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/tomeserve_fuzz_safetensors_" + std::to_string(::getpid());
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  if (size > 0) std::fwrite(data, 1, size, f);
  std::fclose(f);
  auto file = tomeserve::pipeline::SafetensorsFile::Open(path);
  if (file.ok()) {
    unsigned sum = 0;
    for (const auto& t : (*file)->tensors()) {
      for (std::byte b : t.data) sum += static_cast<unsigned>(b);
      (void)(*file)->Find(t.name);
    }
    (void)sum;
  }
  return 0;
}
