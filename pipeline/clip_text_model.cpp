#include "pipeline/clip_text_model.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "pipeline/load_weights.h"
#include "pipeline/torch_status.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {

at::Tensor PaddedTokenIds(const ClipTokenizer& tokenizer, const std::vector<std::string>& texts,
                          const c10::Device& device) {
  std::vector<int64_t> ids;
  ids.reserve(texts.size() * ClipTokenizer::kMaxLength);
  for (const std::string& text : texts) {
    for (int32_t id : tokenizer.EncodePadded(text)) ids.push_back(id);
  }
  return at::tensor(ids, at::kLong).view({static_cast<int64_t>(texts.size()), ClipTokenizer::kMaxLength}).to(device);
}

ClipAttentionImpl::ClipAttentionImpl(const ClipTextConfig& c, const at::TensorOptions& o)
    : heads_(c.num_attention_heads) {
  const int64_t d = c.hidden_size;
  q_proj_ = register_module("q_proj", Linear(d, d, true, o));
  k_proj_ = register_module("k_proj", Linear(d, d, true, o));
  v_proj_ = register_module("v_proj", Linear(d, d, true, o));
  out_proj_ = register_module("out_proj", Linear(d, d, true, o));
}

at::Tensor ClipAttentionImpl::forward(const at::Tensor& x) const {
  const int64_t b = x.size(0), l = x.size(1), c = x.size(2);
  auto heads = [&](const at::Tensor& t) { return t.view({b, l, heads_, c / heads_}).transpose(1, 2); };
  at::Tensor out = at::scaled_dot_product_attention(heads(q_proj_->forward(x)), heads(k_proj_->forward(x)),
                                                    heads(v_proj_->forward(x)), /*attn_mask=*/{},
                                                    /*dropout_p=*/0.0, /*is_causal=*/true);
  return out_proj_->forward(out.transpose(1, 2).reshape({b, l, c}));
}

ClipMlpImpl::ClipMlpImpl(const ClipTextConfig& c, const at::TensorOptions& o) : act_(c.hidden_act) {
  fc1_ = register_module("fc1", Linear(c.hidden_size, c.intermediate_size, true, o));
  fc2_ = register_module("fc2", Linear(c.intermediate_size, c.hidden_size, true, o));
}

at::Tensor ClipMlpImpl::forward(const at::Tensor& x) const {
  at::Tensor h = fc1_->forward(x);
  h = act_ == Activation::kQuickGelu ? h * at::sigmoid(1.702 * h) : at::gelu(h);
  return fc2_->forward(h);
}

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const ClipTextConfig& c, const at::TensorOptions& o) {
  self_attn_ = register_module("self_attn", ClipAttention(c, o));
  layer_norm1_ = register_module("layer_norm1", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
  mlp_ = register_module("mlp", ClipMlp(c, o));
  layer_norm2_ = register_module("layer_norm2", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
}

at::Tensor ClipEncoderLayerImpl::forward(const at::Tensor& x) const {
  at::Tensor h = x + self_attn_->forward(layer_norm1_->forward(x));
  return h + mlp_->forward(layer_norm2_->forward(h));
}

ClipTextTransformerImpl::ClipTextTransformerImpl(const ClipTextConfig& c, const at::TensorOptions& o) {
  // "embeddings" is a plain container in the checkpoint: text_model.embeddings.{token,position}_embedding.
  auto embeddings = register_module("embeddings", std::make_shared<torch::nn::Module>());
  token_embedding_ = embeddings->register_module("token_embedding", Embedding(c.vocab_size, c.hidden_size, o));
  position_embedding_ =
      embeddings->register_module("position_embedding", Embedding(c.max_position_embeddings, c.hidden_size, o));
  auto encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
  layers_ = encoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers_->push_back(ClipEncoderLayer(c, o));
  final_layer_norm_ = register_module("final_layer_norm", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
}

at::Tensor ClipTextTransformerImpl::forward(const at::Tensor& input_ids) const { return forward(input_ids, nullptr); }

at::Tensor ClipTextTransformerImpl::forward(const at::Tensor& input_ids, at::Tensor* penultimate) const {
  const int64_t l = input_ids.size(1);
  at::Tensor positions = at::arange(l, input_ids.options().dtype(at::kLong));
  at::Tensor x = token_embedding_->forward(input_ids) + position_embedding_->forward(positions).unsqueeze(0);
  const size_t n = layers_->size();
  size_t i = 0;
  for (const auto& layer : *layers_) {
    // hidden_states[-2]: the input of the last layer (the embeddings for a one-layer model).
    if (penultimate != nullptr && ++i == n) *penultimate = x;
    x = layer->as<ClipEncoderLayer>()->forward(x);
  }
  return final_layer_norm_->forward(x);
}

ClipTextModelImpl::ClipTextModelImpl(const ClipTextConfig& c, const at::TensorOptions& o) : config_(c) {
  text_model_ = register_module("text_model", ClipTextTransformer(c, o));
  if (c.projection_dim > 0) {
    text_projection_ = register_module("text_projection", Linear(c.hidden_size, c.projection_dim, false, o));
  }
}

ClipTextOutput ClipTextModelImpl::Encode(const at::Tensor& input_ids) const {
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) <= config_.max_position_embeddings,
              "input_ids must be [B, L] with L <= ", config_.max_position_embeddings);
  ClipTextOutput out;
  out.last_hidden_state = text_model_->forward(input_ids, &out.penultimate);
  // transformers' pooling: the legacy eos id 2 pools at argmax(input_ids) (the first <|endoftext|>), any other
  // at the first eos_token_id.
  const at::Tensor eos = config_.eos_token_id == 2 ? input_ids.argmax(-1)
                                                   : input_ids.eq(config_.eos_token_id).to(at::kInt).argmax(-1);
  const int64_t b = input_ids.size(0), l = input_ids.size(1);
  out.pooled = out.last_hidden_state.reshape({b * l, -1}).index_select(0, at::arange(b, eos.options()) * l + eos);
  if (text_projection_) out.pooled = text_projection_->forward(out.pooled);
  return out;
}

at::Tensor ClipTextModelImpl::forward(const at::Tensor& input_ids) const {
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) <= config_.max_position_embeddings,
              "input_ids must be [B, L] with L <= ", config_.max_position_embeddings);
  return text_model_->forward(input_ids);
}

absl::StatusOr<std::shared_ptr<ClipTextModelImpl>> ClipTextModelImpl::Load(const std::filesystem::path& dir,
                                                                           const ComputeTarget& target,
                                                                           absl::string_view variant) {
  absl::StatusOr<ClipTextConfig> config = ClipTextConfig::Load(dir / "config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<WeightStore> weights = WeightStore::OpenComponent(dir, "model", variant);
  if (!weights.ok()) return weights.status();
  return GuardTorch(absl::StrCat("building the text encoder from ", dir.string()),
                    [&]() -> absl::StatusOr<std::shared_ptr<ClipTextModelImpl>> {
                      auto model = std::make_shared<ClipTextModelImpl>(
                          *config, at::TensorOptions().dtype(target.dtype).device(target.device));
                      LoadOptions options{
                          // Older transformers saved an int64 position_ids buffer; it is arange(L), recomputed here.
                          .ignore_unexpected = {"text_model.embeddings.position_ids", "embeddings.position_ids"},
                          // SD 1.x checkpoints spell keys "text_model.encoder...", transformers >= 5 writes
                          // "encoder..." and loads both; so do we.
                          .rename = [](absl::string_view key) {
                            return absl::StartsWith(key, "text_model.") || absl::StartsWith(key, "text_projection.")
                                       ? std::string(key)
                                       : absl::StrCat("text_model.", key);
                          }};
                      if (absl::Status s = LoadWeights(*model, *weights, options); !s.ok()) return s;
                      model->eval();
                      return model;
                    });
}

}  // namespace tomeserve::pipeline
