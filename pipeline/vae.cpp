#include "pipeline/vae.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "pipeline/load_weights.h"
#include "pipeline/torch_status.h"
#include "pipeline/weight_store.h"

namespace tomeserve::pipeline {
namespace {

// diffusers' VAE blocks use eps=1e-6 for every GroupNorm (resnets, attention, conv_norm_out).
constexpr double kEps = 1e-6;

ResnetBlock2D VaeResnet(int64_t in, int64_t out, int64_t groups, const at::TensorOptions& o) {
  return ResnetBlock2D(
      ResnetSpec{.in_channels = in, .out_channels = out, .temb_channels = 0, .groups = groups, .eps = kEps},
      o);
}

// Checkpoints written before diffusers 0.14 name the VAE attention's projections query/key/value/proj_attn.
// diffusers (ModelMixin._fix_state_dict_keys_on_load) renames exactly these and keeps their shapes (linear
// weights, [C, C]). Conv-shaped [C, C, 1, 1] weights (original LDM checkpoints) are another dialect that only
// diffusers' single-file loader converts; from_pretrained rejects them (size mismatch), as LoadWeights does.
std::string LegacyAttentionKey(absl::string_view key) {
  std::vector<std::string> parts = absl::StrSplit(key, '.');
  for (size_t i = 0; i + 3 < parts.size(); ++i) {
    if (parts[i] != "attentions" || parts[i + 1].empty() ||
        !std::all_of(parts[i + 1].begin(), parts[i + 1].end(), absl::ascii_isdigit)) {
      continue;
    }
    std::string& name = parts[i + 2];
    if (name == "query") {
      name = "to_q";
    } else if (name == "key") {
      name = "to_k";
    } else if (name == "value") {
      name = "to_v";
    } else if (name == "proj_attn") {
      name = "to_out.0";
    } else {
      continue;
    }
    return absl::StrJoin(parts, ".");
  }
  return std::string(key);
}

}  // namespace

VaeAttentionImpl::VaeAttentionImpl(int64_t channels, int64_t groups, const at::TensorOptions& o) {
  group_norm_ = register_module("group_norm", GroupNorm(groups, channels, kEps, o));
  to_q_ = register_module("to_q", Linear(channels, channels, true, o));
  to_k_ = register_module("to_k", Linear(channels, channels, true, o));
  to_v_ = register_module("to_v", Linear(channels, channels, true, o));
  auto to_out = register_module("to_out", torch::nn::ModuleList());
  to_out_ = Linear(channels, channels, true, o);
  to_out->push_back(to_out_);  // to_out.0; diffusers' to_out.1 is a parameterless Dropout
}

at::Tensor VaeAttentionImpl::forward(const at::Tensor& x) const {
  // The same sequence of views and ops as diffusers' AttnProcessor2_0, so kernels see the same memory
  // layouts.
  const int64_t b = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3);
  at::Tensor h = x.view({b, c, height * width}).transpose(1, 2);
  h = group_norm_->forward(h.transpose(1, 2)).transpose(1, 2);
  auto one_head = [&](const at::Tensor& t) { return t.view({b, -1, 1, c}).transpose(1, 2); };
  at::Tensor out = at::scaled_dot_product_attention(one_head(to_q_->forward(h)), one_head(to_k_->forward(h)),
                                                    one_head(to_v_->forward(h)));
  out = to_out_->forward(out.transpose(1, 2).reshape({b, -1, c}));
  return out.transpose(-1, -2).reshape({b, c, height, width}) + x;
}

VaeMidBlockImpl::VaeMidBlockImpl(int64_t channels, int64_t groups, bool add_attention,
                                 const at::TensorOptions& o) {
  resnets_ = register_module("resnets", torch::nn::ModuleList());
  attentions_ = register_module("attentions", torch::nn::ModuleList());
  resnets_->push_back(VaeResnet(channels, channels, groups, o));
  if (add_attention) attentions_->push_back(VaeAttention(channels, groups, o));
  resnets_->push_back(VaeResnet(channels, channels, groups, o));
}

at::Tensor VaeMidBlockImpl::forward(const at::Tensor& x) const {
  at::Tensor h = (*resnets_)[0]->as<ResnetBlock2D>()->forward(x);
  if (!attentions_->is_empty()) h = (*attentions_)[0]->as<VaeAttention>()->forward(h);
  return (*resnets_)[1]->as<ResnetBlock2D>()->forward(h);
}

UpDecoderBlockImpl::UpDecoderBlockImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool upsample,
                                       const at::TensorOptions& o) {
  resnets_ = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < layers; ++i) resnets_->push_back(VaeResnet(i == 0 ? in : out, out, groups, o));
  if (upsample) {
    // upsamplers.0 is diffusers' Upsample2D(use_conv=True), whose only parameters are its "conv".
    auto upsamplers = register_module("upsamplers", torch::nn::ModuleList());
    auto upsampler = std::make_shared<torch::nn::Module>();
    upsample_conv_ = upsampler->register_module("conv", Conv2d(Conv2dSpec{out, out, 3, 1, 1}, o));
    upsamplers->push_back(upsampler);
  }
}

at::Tensor UpDecoderBlockImpl::forward(const at::Tensor& x) const {
  at::Tensor h = x;
  for (const auto& resnet : *resnets_) h = resnet->as<ResnetBlock2D>()->forward(h);
  if (upsample_conv_) {
    // F.interpolate(scale_factor=2.0, mode="nearest") passes the scale factors, not an output size.
    h = at::upsample_nearest2d(h, /*output_size=*/std::nullopt, std::vector<double>{2.0, 2.0});
    h = upsample_conv_->forward(h);
  }
  return h;
}

VaeDecoderImpl::VaeDecoderImpl(const VaeConfig& c, const at::TensorOptions& o) : config_(c) {
  const auto& channels = c.block_out_channels;
  const int64_t groups = c.norm_num_groups;
  if (c.use_post_quant_conv) {
    post_quant_conv_ = register_module("post_quant_conv",
                                       Conv2d(Conv2dSpec{c.latent_channels, c.latent_channels, 1, 1, 0}, o));
  }
  auto decoder = register_module("decoder", std::make_shared<torch::nn::Module>());
  conv_in_ =
      decoder->register_module("conv_in", Conv2d(Conv2dSpec{c.latent_channels, channels.back(), 3, 1, 1}, o));
  mid_block_ = decoder->register_module("mid_block",
                                        VaeMidBlock(channels.back(), groups, c.mid_block_add_attention, o));
  up_blocks_ = decoder->register_module("up_blocks", torch::nn::ModuleList());
  // Up blocks walk block_out_channels in reverse; each has one resnet more than the encoder's down blocks.
  int64_t prev = channels.back();
  for (size_t i = 0; i < channels.size(); ++i) {
    const int64_t out = channels[channels.size() - 1 - i];
    up_blocks_->push_back(
        UpDecoderBlock(prev, out, c.layers_per_block + 1, groups, i + 1 < channels.size(), o));
    prev = out;
  }
  conv_norm_out_ = decoder->register_module("conv_norm_out", GroupNorm(groups, channels.front(), kEps, o));
  conv_out_ =
      decoder->register_module("conv_out", Conv2d(Conv2dSpec{channels.front(), c.out_channels, 3, 1, 1}, o));
}

at::Tensor VaeDecoderImpl::Unscale(const at::Tensor& latents) const {
  TORCH_CHECK(latents.dim() == 4 && latents.size(1) == config_.latent_channels && latents.size(2) > 0 &&
                  latents.size(3) > 0,
              "VAE latents must be [B, ", config_.latent_channels, ", h, w], got ", latents.sizes());
  TORCH_CHECK(at::isFloatingType(latents.scalar_type()), "VAE latents must be floating point, got ",
              latents.scalar_type());
  const at::Tensor& weight = conv_in_->weight;
  return at::div(latents.to(weight.device()), config_.scaling_factor).to(weight.scalar_type());
}

at::Tensor VaeDecoderImpl::Forward(const at::Tensor& z) const {
  at::Tensor x = post_quant_conv_ ? post_quant_conv_->forward(z) : z;
  at::Tensor h = mid_block_->forward(conv_in_->forward(x));
  for (const auto& block : *up_blocks_) h = block->as<UpDecoderBlock>()->forward(h);
  return conv_out_->forward(at::silu(conv_norm_out_->forward(h)));
}

at::Tensor VaeDecoderImpl::Decode(const at::Tensor& latents) const {
  at::NoGradGuard no_grad;
  return Forward(Unscale(latents));
}

namespace {

// diffusers' blend_v / blend_h along `dim` (2: rows, 3: columns): the first `extent` lines of `b` become
// a[-extent + y] * (1 - y / extent) + b[y] * (y / extent), in place. The weights are the float32 values of
// diffusers' Python scalars, applied in one broadcast instead of one line at a time (the same float32 products
// and sums for float32 tiles).
void Blend(const at::Tensor& a, const at::Tensor& b, int64_t dim, int64_t extent) {
  extent = std::min({a.size(dim), b.size(dim), extent});
  if (extent <= 0) return;
  std::vector<float> wa(static_cast<size_t>(extent)), wb(static_cast<size_t>(extent));
  for (int64_t y = 0; y < extent; ++y) {
    const double t = static_cast<double>(y) / static_cast<double>(extent);
    wa[static_cast<size_t>(y)] = static_cast<float>(1.0 - t);
    wb[static_cast<size_t>(y)] = static_cast<float>(t);
  }
  std::vector<int64_t> shape(4, 1);
  shape[static_cast<size_t>(dim)] = extent;
  const auto weights = [&](const std::vector<float>& w) {
    return ToDeviceAsync(at::tensor(w, at::kFloat).view(shape), b.device());
  };
  at::Tensor tail = a.narrow(dim, a.size(dim) - extent, extent);
  at::Tensor head = b.narrow(dim, 0, extent);
  head.copy_(tail.to(at::kFloat) * weights(wa) + head.to(at::kFloat) * weights(wb));
}

}  // namespace

at::Tensor VaeDecoderImpl::DecodeTiled(const at::Tensor& latents) const {
  at::NoGradGuard no_grad;
  const at::Tensor z = Unscale(latents);
  const int64_t tile = tile_latent_size();
  if (tile <= 0 || (z.size(2) <= tile && z.size(3) <= tile)) return Forward(z);
  // diffusers' AutoencoderKL.tiled_decode with tile_overlap_factor 0.25.
  const int64_t tile_sample = config_.sample_size;
  const auto overlap = static_cast<int64_t>(static_cast<double>(tile) * (1 - 0.25));
  const auto blend_extent = static_cast<int64_t>(static_cast<double>(tile_sample) * 0.25);
  const int64_t row_limit = tile_sample - blend_extent;
  std::vector<std::vector<at::Tensor>> rows;
  for (int64_t i = 0; i < z.size(2); i += overlap) {
    std::vector<at::Tensor>& row = rows.emplace_back();
    for (int64_t j = 0; j < z.size(3); j += overlap) {
      const at::Tensor piece = z.slice(2, i, i + tile).slice(3, j, j + tile);
      row.push_back(Forward(piece));
    }
  }
  // Blended in place in diffusers' order: a tile's top edge with the (already blended) tile above, then its left
  // edge with its (already blended) left neighbour.
  std::vector<at::Tensor> result_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<at::Tensor> result_row;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      at::Tensor& t = rows[i][j];
      if (i > 0) Blend(rows[i - 1][j], t, 2, blend_extent);
      if (j > 0) Blend(rows[i][j - 1], t, 3, blend_extent);
      result_row.push_back(t.slice(2, 0, row_limit).slice(3, 0, row_limit));
    }
    result_rows.push_back(at::cat(result_row, 3));
  }
  return at::cat(result_rows, 2);
}

absl::StatusOr<std::shared_ptr<VaeDecoderImpl>> VaeDecoderImpl::Load(const std::filesystem::path& vae_dir,
                                                                     const ComputeTarget& target,
                                                                     absl::string_view variant) {
  absl::StatusOr<VaeConfig> config = VaeConfig::Load(vae_dir / "config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<WeightStore> weights = WeightStore::OpenComponent(vae_dir, "diffusion_pytorch_model", variant);
  if (!weights.ok()) return weights.status();
  return GuardTorch(absl::StrCat("building the VAE decoder from ", vae_dir.string()),
                    [&]() -> absl::StatusOr<std::shared_ptr<VaeDecoderImpl>> {
                      auto model = std::make_shared<VaeDecoderImpl>(
                          *config, at::TensorOptions().dtype(target.dtype).device(target.device));
                      LoadOptions options{.ignore_unexpected_prefixes = {"encoder.", "quant_conv."},
                                          .rename = LegacyAttentionKey,
                                          .channels_last_4d = target.use_channels_last()};
                      if (absl::Status s = LoadWeights(*model, *weights, options); !s.ok()) return s;
                      model->eval();
                      return model;
                    });
}

at::Tensor ToRgb8(const at::Tensor& image) {
  TORCH_CHECK(image.dim() == 4 && image.size(1) == 3, "image must be [B, 3, H, W], got ", image.sizes());
  at::NoGradGuard no_grad;
  // diffusers' arithmetic, all on the image's device so that one uint8 copy (a quarter of the float bytes) goes
  // to the host: denormalize in the image's dtype, then float as pt_to_numpy, then numpy_to_pil's rounding.
  at::Tensor x = image.mul(0.5).add(0.5).clamp(0, 1);  // VaeImageProcessor.denormalize
  x = at::nan_to_num(x.to(at::kFloat).mul(255).round(), 0.0);  // (images * 255).round()
  x = x.to(at::kByte);                                 // .astype("uint8")
  return x.permute({0, 2, 3, 1}).contiguous().cpu();   // NHWC rows for PNG encoding
}

}  // namespace tomeserve::pipeline
