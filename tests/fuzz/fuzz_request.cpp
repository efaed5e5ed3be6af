// libFuzzer target: what a remote client controls, end to end before the worker: proto bytes ->
// v1::GenerateRequest -> ConvertRequest (validation, defaults, token counting with the real CLIP tokenizer of
// TOMESERVE_FUZZ_TOKENIZER_DIR). Every input is a validated request or an error status, never a crash; an
// accepted request is within the limits it was validated against.
#include <cstdint>

#include "server/request_convert.h"
#include "tests/fuzz/fuzz_tokenizer_dir.h"
#include "google/protobuf/stubs/logging.h"
#include "tomeserve/v1/image_generator.pb.h"

namespace ts = tomeserve;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ts::server::ModelCatalog* catalog = [] {
    auto* c = new ts::server::ModelCatalog{.default_model = "tiny"};
    c->models.push_back(
        {.name = "tiny", .native_width = 64, .native_height = 64, .tokenizer = &ts::fuzz::Tokenizer()});
    c->models.push_back(
        {.name = "other", .native_width = 512, .native_height = 512, .tokenizer = &ts::fuzz::Tokenizer()});
    return c;
  }();
  static const ts::server::RequestLimits limits;
  static const ts::server::RandomSource random{.next = [] { return uint64_t{42}; }};

  // Invalid UTF-8 in a string field fails the parse (gRPC answers such a call INTERNAL before our code runs);
  // protobuf's log line about it would flood the run.
  static const bool quiet = [] {
    google::protobuf::SetLogHandler(nullptr);
    return true;
  }();
  (void)quiet;
  ts::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto converted = ts::server::ConvertRequest(request, *catalog, limits, random);
  if (converted.ok()) {
    const ts::server::GenerationRequest& r = *converted;
    const auto side_ok = [](int v) { return v >= 8 && v % 8 == 0 && v <= limits.max_side; };
    const bool within = side_ok(r.key.width) && side_ok(r.key.height) &&
                        int64_t{r.key.width} * r.key.height <= limits.max_pixels && r.key.steps >= 1 &&
                        r.key.steps <= limits.max_steps && r.num_images >= 1 && r.num_images <= limits.max_images &&
                        static_cast<int>(r.prompt.size()) <= limits.max_prompt_bytes &&
                        static_cast<int>(r.negative_prompt.size()) <= limits.max_prompt_bytes &&
                        catalog->Find(r.key.model) != nullptr && r.cost() > 0;
    if (!within) __builtin_trap();  // validation let through what it promises to refuse
  }
  return 0;
}
