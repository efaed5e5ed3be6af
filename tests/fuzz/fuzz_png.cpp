// libFuzzer target: the PNG reader (pipeline/image_codec.cpp, libpng with a 256 MiB allocation cap) and the
// A1111 "parameters" text parser it feeds. Corrupt, truncated or hostile input gives an error, never a crash.
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "pipeline/image_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto png = tomeserve::pipeline::DecodePng(bytes);
  if (png.ok()) {
    if (png->rgb.size() != static_cast<size_t>(png->width) * png->height * 3) __builtin_trap();
    for (const auto& [key, value] : png->text_chunks) {
      if (key == "parameters") (void)tomeserve::pipeline::ParseA1111Parameters(value);
    }
  }
  (void)tomeserve::pipeline::ParseA1111Parameters(bytes);
  return 0;
}
