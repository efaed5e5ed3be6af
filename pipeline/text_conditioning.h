// What the text encoders give the UNet for one or more texts: the cross-attention conditioning and, on SDXL,
// the pooled embedding that enters the UNet's added conditions. Plain tensors on the model's device, shared
// read-only (TextEmbeddingCache hands the same tensors to every call of a text).
#pragma once

#include <ATen/ATen.h>

namespace tomeserve::pipeline {

struct TextConditioning {
  at::Tensor embeds;  // [N, 77, D]: encoder_hidden_states
  at::Tensor pooled;  // [N, P]: SDXL's text_embeds (text_encoder_2's pooled, projected output); undefined on SD 1.x

  bool defined() const { return embeds.defined(); }
};

}  // namespace tomeserve::pipeline
