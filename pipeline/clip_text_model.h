// transformers' CLIPTextModel (the SD 1.x text encoder, SDXL's text_encoder) and CLIPTextModelWithProjection
// (SDXL's text_encoder_2): pre-LayerNorm transformer with a causal mask. The module tree spells the checkpoint
// keys: text_model.embeddings.token_embedding, text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj,
// layer_norm1, mlp.{fc1,fc2}, layer_norm2}, text_model.final_layer_norm, and with a projection text_projection.
// Immutable after load; forward() is safe to call from one thread at a time per
// device stream (the worker that owns it).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "pipeline/clip_tokenizer.h"
#include "pipeline/device.h"
#include "pipeline/layers.h"
#include "pipeline/model_config.h"

namespace tomeserve::pipeline {

class ClipAttentionImpl : public torch::nn::Module {
 public:
  ClipAttentionImpl(const ClipTextConfig& config, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;  // causal self-attention, [B, L, C]

 private:
  int64_t heads_;
  Linear q_proj_{nullptr}, k_proj_{nullptr}, v_proj_{nullptr}, out_proj_{nullptr};
};
TORCH_MODULE(ClipAttention);

class ClipMlpImpl : public torch::nn::Module {
 public:
  ClipMlpImpl(const ClipTextConfig& config, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  Activation act_;
  Linear fc1_{nullptr}, fc2_{nullptr};
};
TORCH_MODULE(ClipMlp);

class ClipEncoderLayerImpl : public torch::nn::Module {
 public:
  ClipEncoderLayerImpl(const ClipTextConfig& config, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  ClipAttention self_attn_{nullptr};
  LayerNorm layer_norm1_{nullptr}, layer_norm2_{nullptr};
  ClipMlp mlp_{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

// `texts` tokenized as diffusers' pipelines do (padded to max_length 77, truncated): input_ids [B, 77] int64 on
// `device`.
at::Tensor PaddedTokenIds(const ClipTokenizer& tokenizer, const std::vector<std::string>& texts,
                          const c10::Device& device);

// What one text-encoder call gives (transformers' output fields).
struct ClipTextOutput {
  at::Tensor last_hidden_state;  // [B, L, hidden], after final_layer_norm (SD 1.x's conditioning)
  at::Tensor penultimate;        // [B, L, hidden]: hidden_states[-2], the second-to-last layer's output (SDXL's)
  at::Tensor pooled;             // [B, hidden or projection_dim]: the eos token's last state, projected if the
                                 // model has text_projection (CLIPTextModelWithProjection's text_embeds)
};

// The "text_model" submodule: embeddings + encoder + final_layer_norm.
class ClipTextTransformerImpl : public torch::nn::Module {
 public:
  ClipTextTransformerImpl(const ClipTextConfig& config, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& input_ids) const;
  // last_hidden_state, with the second-to-last layer's output in *penultimate.
  at::Tensor forward(const at::Tensor& input_ids, at::Tensor* penultimate) const;

 private:
  Embedding token_embedding_{nullptr}, position_embedding_{nullptr};
  torch::nn::ModuleList layers_;
  LayerNorm final_layer_norm_{nullptr};
};
TORCH_MODULE(ClipTextTransformer);

class ClipTextModelImpl : public torch::nn::Module {
 public:
  ClipTextModelImpl(const ClipTextConfig& config, const at::TensorOptions& options);

  // Loads text_encoder/{config.json, model.safetensors} onto `target`; `variant` as WeightStore::OpenComponent's.
  static absl::StatusOr<std::shared_ptr<ClipTextModelImpl>> Load(const std::filesystem::path& dir,
                                                                 const ComputeTarget& target,
                                                                 absl::string_view variant = "");

  // input_ids [B, L] (int64, L <= max_position_embeddings) -> last_hidden_state [B, L, hidden].
  at::Tensor forward(const at::Tensor& input_ids) const;
  // Every output SDXL's text path reads (see ClipTextOutput).
  ClipTextOutput Encode(const at::Tensor& input_ids) const;
  const ClipTextConfig& config() const { return config_; }

 private:
  ClipTextConfig config_;
  ClipTextTransformer text_model_{nullptr};
  Linear text_projection_{nullptr};  // with projection_dim > 0
};
TORCH_MODULE(ClipTextModel);

}  // namespace tomeserve::pipeline
