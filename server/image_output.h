// One finished image as the client gets it: PNG with an AUTOMATIC1111 "parameters" chunk (prompt, steps,
// sampler, CFG, seed, size, model, the effective Token Merging ratio), or raw RGB8. Torch-free: the worker hands
// over the decoded uint8 rows. Runs on the worker thread.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "server/job.h"

namespace tomeserve::server {

// `rgb` holds height x width x 3 bytes; `image` is the 0-based image of the request (seed = request seed +
// image); `tome` the settings it ran with.
absl::StatusOr<EncodedImage> EncodeImage(const GenerationRequest& request, const tome::TokenMerging& tome,
                                         const uint8_t* rgb, int width, int height, int image);

}  // namespace tomeserve::server
