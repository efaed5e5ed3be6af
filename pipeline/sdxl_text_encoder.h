// SDXL's prompt encoding, as diffusers' StableDiffusionXLPipeline.encode_prompt does it with one prompt for both
// towers: each tower (tokenizer + text_encoder: CLIP ViT-L; tokenizer_2 + text_encoder_2: OpenCLIP ViT-bigG with
// projection) encodes the prompt padded to 77 tokens; the UNet's conditioning is both towers' penultimate
// hidden states side by side ([B, 77, hidden_1 + hidden_2]), and its added "text_embeds" condition is the second
// tower's pooled, projected output. model_index.json's force_zeros_for_empty_prompt makes an absent negative
// prompt all zeros (Zeros()) rather than the encoding of "".
//
// Immutable after Load(); Encode() runs on the worker thread that owns the model (its device stream).
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "pipeline/clip_text_model.h"
#include "pipeline/clip_tokenizer.h"
#include "pipeline/device.h"
#include "pipeline/text_conditioning.h"

namespace tomeserve::pipeline {

class SdxlTextEncoder {
 public:
  // embeds [B, 77, hidden_1 + hidden_2], pooled [B, projection_dim].
  using Encoded = TextConditioning;

  // Loads tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/ of an SDXL folder onto `target`; errors
  // name the file (a text_encoder_2 without text_projection, say).
  static absl::StatusOr<std::unique_ptr<SdxlTextEncoder>> Load(const std::filesystem::path& model_dir,
                                                               const ComputeTarget& target,
                                                               absl::string_view variant = "");

  // One row per text. Throws c10::Error (run it under GuardTorch).
  Encoded Encode(const std::vector<std::string>& texts) const;
  // force_zeros_for_empty_prompt's negative conditioning: zeros of Encode()'s shapes, `rows` rows.
  Encoded Zeros(int64_t rows) const;
  int64_t embed_dim() const;
  int64_t pooled_dim() const { return encoder_2_->config().projection_dim; }
  // The first tower's tokenizer (both count a prompt's tokens alike; only their pad tokens differ).
  const ClipTokenizer& tokenizer() const { return *tokenizer_; }
  // Tower 1 or 2's encoder config and tokenizer (StableDiffusion::CheckComponentsFit).
  const ClipTextConfig& config(int tower) const { return (tower == 1 ? encoder_ : encoder_2_)->config(); }
  const ClipTokenizer& tokenizer(int tower) const { return tower == 1 ? *tokenizer_ : *tokenizer_2_; }

 private:
  SdxlTextEncoder() = default;

  ComputeTarget target_;
  std::unique_ptr<ClipTokenizer> tokenizer_, tokenizer_2_;
  std::shared_ptr<ClipTextModelImpl> encoder_, encoder_2_;
};

}  // namespace tomeserve::pipeline
