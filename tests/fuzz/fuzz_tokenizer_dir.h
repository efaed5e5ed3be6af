// The real CLIP tokenizer the fuzz targets load once: TOMESERVE_FUZZ_TOKENIZER_DIR (a diffusers tokenizer/
// folder; scripts/fuzz.sh points it at the tiny test model's), else build/testdata/tiny/tokenizer.
#pragma once

#include <cstdlib>

#include "pipeline/clip_tokenizer.h"

namespace tomeserve::fuzz {

inline const pipeline::ClipTokenizer& Tokenizer() {
  static const pipeline::ClipTokenizer* tokenizer = [] {
    const char* dir = std::getenv("TOMESERVE_FUZZ_TOKENIZER_DIR");
    auto loaded = pipeline::ClipTokenizer::Load(dir != nullptr ? dir : "build/testdata/tiny/tokenizer");
    if (!loaded.ok()) std::abort();  // a setup error, not a finding: scripts/fuzz.sh checks the folder first
    return loaded->release();
  }();
  return *tokenizer;
}

}  // namespace tomeserve::fuzz
