// libFuzzer target: the CLIP tokenizer (pipeline/clip_tokenizer.cpp) on arbitrary bytes as a prompt: invalid
// UTF-8, control characters, long runs. Encode must return BOS ... EOS within the length limit, never crash.
// The vocabulary is a real one: TOMESERVE_FUZZ_TOKENIZER_DIR (a diffusers tokenizer/ folder; scripts/fuzz.sh
// points it at the tiny test model's).
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "tests/fuzz/fuzz_tokenizer_dir.h"

using tomeserve::pipeline::ClipTokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const ClipTokenizer* tokenizer = &tomeserve::fuzz::Tokenizer();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (int max_length : {ClipTokenizer::kMaxLength, 8}) {
    const auto ids = tokenizer->Encode(text, max_length);
    if (ids.size() < 2 || static_cast<int>(ids.size()) > max_length) std::abort();
    if (ids.front() != tokenizer->bos_id() || ids.back() != tokenizer->eos_id()) std::abort();
    if (static_cast<int>(tokenizer->EncodePadded(text, max_length).size()) != max_length) std::abort();
  }
  return 0;
}
