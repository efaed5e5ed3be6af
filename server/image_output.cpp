#include "server/image_output.h"

#include <string>

#include "pipeline/image_codec.h"

namespace tomeserve::server {

absl::StatusOr<EncodedImage> EncodeImage(const GenerationRequest& request, const tome::TokenMerging& tome,
                                         const uint8_t* rgb, int width, int height, int image) {
  EncodedImage out{.width = width, .height = height, .seed = request.seed + static_cast<uint64_t>(image)};
  if (request.output_format == OutputFormat::kRawRgb8) {
    out.data.assign(reinterpret_cast<const char*>(rgb), static_cast<size_t>(width) * height * 3);
    out.mime_type = "application/octet-stream";
    return out;
  }
  pipeline::GenerationParameters params{.prompt = request.prompt,
                                        .negative_prompt = request.negative_prompt,
                                        .steps = request.key.steps,
                                        .sampler = std::string(pipeline::A1111SamplerName(request.key.scheduler)),
                                        .cfg_scale = request.guidance_scale,
                                        .seed = out.seed,
                                        .width = width,
                                        .height = height,
                                        .model = request.key.model};
  if (tome::IsActive(tome)) params.extra.emplace_back("Token merging ratio", pipeline::FormatA1111Number(tome.ratio));
  absl::StatusOr<std::string> png =
      pipeline::EncodePng(rgb, width, height, {{"parameters", pipeline::FormatA1111Parameters(params)}},
                          pipeline::kPngFastCompression);
  if (!png.ok()) return png.status();
  out.data = *std::move(png);
  out.mime_type = "image/png";
  return out;
}

}  // namespace tomeserve::server
