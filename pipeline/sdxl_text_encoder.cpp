#include "pipeline/sdxl_text_encoder.h"

#include <c10/core/InferenceMode.h>

#include "absl/strings/str_cat.h"

namespace tomeserve::pipeline {

absl::StatusOr<std::unique_ptr<SdxlTextEncoder>> SdxlTextEncoder::Load(const std::filesystem::path& dir,
                                                                       const ComputeTarget& target,
                                                                       absl::string_view variant) {
  std::unique_ptr<SdxlTextEncoder> out(new SdxlTextEncoder());
  out->target_ = target;
  for (auto [name, slot] : {std::pair{"tokenizer", &out->tokenizer_}, std::pair{"tokenizer_2", &out->tokenizer_2_}}) {
    absl::StatusOr<std::unique_ptr<ClipTokenizer>> tokenizer = ClipTokenizer::Load(dir / name);
    if (!tokenizer.ok()) return tokenizer.status();
    *slot = *std::move(tokenizer);
  }
  for (auto [name, slot] :
       {std::pair{"text_encoder", &out->encoder_}, std::pair{"text_encoder_2", &out->encoder_2_}}) {
    absl::StatusOr<std::shared_ptr<ClipTextModelImpl>> encoder = ClipTextModelImpl::Load(dir / name, target, variant);
    if (!encoder.ok()) return encoder.status();
    *slot = *std::move(encoder);
  }
  if (out->encoder_2_->config().projection_dim == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        (dir / "text_encoder_2" / "config.json").string(),
        ": SDXL's second text encoder must be a CLIPTextModelWithProjection (\"architectures\"): its pooled, "
        "projected output is the UNet's text_embeds"));
  }
  return out;
}

SdxlTextEncoder::Encoded SdxlTextEncoder::Encode(const std::vector<std::string>& texts) const {
  c10::InferenceMode inference;
  const ClipTextOutput first = encoder_->Encode(PaddedTokenIds(*tokenizer_, texts, target_.device));
  const ClipTextOutput second = encoder_2_->Encode(PaddedTokenIds(*tokenizer_2_, texts, target_.device));
  return {.embeds = at::cat({first.penultimate, second.penultimate}, -1), .pooled = second.pooled};
}

SdxlTextEncoder::Encoded SdxlTextEncoder::Zeros(int64_t rows) const {
  const auto options = at::TensorOptions().dtype(target_.dtype).device(target_.device);
  return {.embeds = at::zeros({rows, ClipTokenizer::kMaxLength, embed_dim()}, options),
          .pooled = at::zeros({rows, pooled_dim()}, options)};
}

int64_t SdxlTextEncoder::embed_dim() const {
  return encoder_->config().hidden_size + encoder_2_->config().hidden_size;
}

}  // namespace tomeserve::pipeline
