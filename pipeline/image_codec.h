// PNG encoding (libpng) with text chunks, and the AUTOMATIC1111 "parameters" text that image tools read back
// (A1111's PNG Info tab, civitai, ComfyUI's A1111 loader). Torch-free: the worker hands over uint8 RGB rows.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tomeserve::pipeline {

// (keyword, UTF-8 text) pairs, in file order.
using PngTextChunks = std::vector<std::pair<std::string, std::string>>;

// Largest width or height EncodePng accepts and DecodePng reads (PNG allows 2^31 - 1; no SD image comes
// close).
inline constexpr int kMaxPngDimension = 16384;

// zlib levels for EncodePng: zlib's default (what Pillow writes: files for people to keep) and the fastest, which
// the server uses: the image is lossless either way; on a photo-like 512x512 image zlib level 1 took 35 ms
// against 44 ms for 9% larger files (2-core CPU, 2026-11-30), time the worker thread does not spend before its
// next step.
inline constexpr int kPngDefaultCompression = 6;
inline constexpr int kPngFastCompression = 1;

// Encodes `rgb` (height rows of width * 3 bytes, no padding) as an 8-bit RGB, non-interlaced PNG at zlib level
// `compression_level` (0-9). Text chunks go before the image data, as Pillow writes them: tEXt when the text is
// Latin-1 representable (A1111/Pillow's choice), else uncompressed iTXt (UTF-8). Keywords must be 1-79
// printable ASCII characters without leading or trailing spaces; texts must be valid UTF-8 without NUL.
// Errors: INVALID_ARGUMENT for bad dimensions, a null `rgb`, a bad keyword/text or a level outside 0-9;
// INTERNAL if libpng fails.
absl::StatusOr<std::string> EncodePng(const uint8_t* rgb, int width, int height,
                                      const PngTextChunks& text_chunks,
                                      int compression_level = kPngDefaultCompression);

struct DecodedPng {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;   // height * width * 3, row-major
  PngTextChunks text_chunks;  // tEXt/zTXt (converted from Latin-1) and iTXt, in file order
};

// Decodes any PNG to 8-bit RGB (16-bit is stripped, palette/gray expanded, alpha dropped). Corrupt, truncated
// or oversized (> kMaxPngDimension) input gives INVALID_ARGUMENT, never a crash.
absl::StatusOr<DecodedPng> DecodePng(absl::string_view bytes);

// What one image's A1111 infotext records. A plain value type: the server fills it per image.
struct GenerationParameters {
  std::string prompt;
  std::string negative_prompt;  // empty: the "Negative prompt:" line is omitted, as A1111 does
  int steps = 0;
  // A1111's display name: "Euler a", "Euler", "DDIM", "PLMS" (diffusers' PNDM), "DPM++ 2M", "DPM++ 2M Karras"
  // (A1111 >= 1.8 writes the latter as "DPM++ 2M" plus "Schedule type: Karras"). Empty: omitted.
  std::string sampler;
  double cfg_scale = 0;
  uint64_t seed = 0;
  int width = 0, height = 0;
  std::string model;  // empty: omitted
  // Written after the fields above, in order (e.g. the ToMe settings). Values are written as given (quoted
  // when needed): format numbers with FormatA1111Number.
  std::vector<std::pair<std::string, std::string>> extra;
};

// A1111's create_infotext:
//   "<prompt>\nNegative prompt: <negative>\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size:
//   512x512,
//    Model: name, <extra key>: <value>, ..." with the whole text stripped of surrounding whitespace.
// A value containing ',', ':' or a newline is written as a JSON string (json.dumps(v, ensure_ascii=False));
// an extra whose value equals its key is written as the bare key. Prompts are written verbatim, as A1111
// does.
std::string FormatA1111Parameters(const GenerationParameters& params);

// A number as Python's str(float) writes it: "7.5", "7.0", "1e-05", "inf". A double that is exactly a float
// (e.g. a proto float field widened) is written with the float's shortest digits: 7.3f -> "7.3".
std::string FormatA1111Number(double value);

// A1111's parse_generation_parameters: prompt lines up to "Negative prompt:", negative prompt lines after it,
// "key: value" pairs on the last line (when it holds at least 3), JSON-quoted values unquoted. Steps,
// Sampler, CFG scale, Seed, Size and Model fill their fields; other keys go to `extra` in order. Round-trips
// FormatA1111Parameters except for what A1111 itself loses (whitespace around prompt lines, a prompt line
// starting with "Negative prompt:"). Errors (INVALID_ARGUMENT): no parameter line, or a malformed Steps, CFG
// scale, Seed or Size value.
absl::StatusOr<GenerationParameters> ParseA1111Parameters(absl::string_view text);

}  // namespace tomeserve::pipeline
