#!/usr/bin/env python3
"""Writes a complete diffusers-format Stable Diffusion 1.x model folder with RANDOM weights.

    make_tiny_model.py OUT_DIR [--preset tiny|sd15|tiny-xl|sdxl] [--seed N] [--dtype fp32|fp16]
                       [--legacy-text-encoder-keys]

Everything goes through diffusers' and transformers' own save_pretrained (safetensors), so the folder has the exact
layout and config keys of a real SD 1.x checkpoint:

    model_index.json
    scheduler/scheduler_config.json          PNDMScheduler with SD 1.5's settings
    text_encoder/{config.json, model.safetensors}   CLIPTextModel
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, tokenizer.json}
    unet/{config.json, diffusion_pytorch_model.safetensors}    UNet2DConditionModel
    vae/{config.json, diffusion_pytorch_model.safetensors}     AutoencoderKL

The tokenizer is the real CLIP BPE tokenizer (49408 ids), built by scripts/clip_vocab.py from
build/cache/bpe_simple_vocab_16e6.txt.gz. transformers >= 5 only writes tokenizer.json + tokenizer_config.json,
so vocab.json, merges.txt and special_tokens_map.json (as the SD 1.5 repository has them) are added afterwards.

Presets:
  tiny  small channels, every SD 1.x structure (4 UNet levels, cross-attention, VAE mid attention); 64x64 px
        default size; loads and runs in seconds on CPU.
  sd15  the exact SD 1.5 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text tower 123M parameters).
  tiny-xl  small channels, every SDXL structure (StableDiffusionXLPipeline: text_encoder + text_encoder_2 with
        projection, tokenizer + tokenizer_2, a 3-level UNet without attention at full resolution and with the
        "text_time" added conditions, transformer depth per level, VAE with scaling_factor 0.13025 and force_upcast).
  sdxl  the exact SDXL base architecture (UNet 2.6B, text towers 123M + 695M parameters).

transformers 5 saves CLIPTextModel's keys as "embeddings.*", "encoder.*", "final_layer_norm.*"; real SD 1.x
files have them under "text_model." plus an int64 "text_model.embeddings.position_ids". --legacy-text-encoder-keys
rewrites text_encoder/model.safetensors in that real layout (transformers loads both to the same model).

Deterministic for a given --seed: the RNG is re-seeded before each component is built.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

CLIP_MAX_LENGTH = 77

# SD 1.5's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)

SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# Keys common to both presets, as in SD 1.5's configs. The CLIP special-token ids are the (historically wrong)
# values of SD 1.5's text_encoder/config.json: bos 0, eos 2, pad 1. With eos_token_id == 2 transformers pools at
# argmax(input_ids) (the first 49407), which is what SD 1.x checkpoints do; last_hidden_state does not depend on it.
TEXT_COMMON = dict(
    vocab_size=49408,
    max_position_embeddings=CLIP_MAX_LENGTH,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
UNET_COMMON = dict(
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=SD_DOWN_BLOCKS,
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=SD_UP_BLOCKS,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_eps=1e-5,
)
VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu",
    latent_channels=4,
    scaling_factor=0.18215,
    mid_block_add_attention=True,
)

PRESETS = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, projection_dim=32),
        # attention_head_dim is diffusers' legacy name for the NUMBER of heads (SD 1.5: 8); 4 heads here, of
        # 8 channels at levels 0-1 and 16 channels at levels 2-3. Different from SD's 8 heads / 32 groups on
        # purpose, so a consumer that hard-codes SD 1.5's values fails on this model.
        unet=dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            attention_head_dim=4,
            cross_attention_dim=32,
            norm_num_groups=8,
            sample_size=8,
        ),
        vae=dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=64),
    ),
    "sd15": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768),
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            norm_num_groups=32,
            sample_size=64,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
    ),
}

# SDXL (stabilityai/stable-diffusion-xl-base-1.0): two text towers — CLIP ViT-L (as SD 1.5's, its penultimate
# layer used) and OpenCLIP ViT-bigG with a projection (CLIPTextModelWithProjection, gelu) — and a UNet whose
# first level has no attention, with the pooled text embedding and six size/crop numbers as added conditions
# (addition_embed_type "text_time"). Special-token ids as in the real configs (legacy 0 / 2 / 1).
SDXL_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SDXL_UNET_COMMON = dict(
    UNET_COMMON,
    down_block_types=SDXL_DOWN_BLOCKS,
    up_block_types=SDXL_UP_BLOCKS,
    use_linear_projection=True,
    addition_embed_type="text_time",
)
# SDXL base's scheduler/scheduler_config.json (EulerDiscreteScheduler): SD 1.5's betas and offsets plus Euler's keys.
SDXL_SCHEDULER = dict(
    SD15_SCHEDULER,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    sample_max_value=1.0,
)
# The first text tower is SD 1.x's (CLIP ViT-L at full size) and the VAE has SD's architecture; what is SDXL's
# own: the second tower, the UNet, the VAE's native size.
XL_PRESETS = {
    "tiny-xl": dict(
        text=PRESETS["tiny"]["text"],
        text_2=dict(PRESETS["tiny"]["text"], hidden_act="gelu"),
        unet=dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=64,  # 32 + 32: both towers' hidden states side by side
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            norm_num_groups=8,
            sample_size=16,
        ),
        vae=dict(PRESETS["tiny"]["vae"], sample_size=128),
    ),
    "sdxl": dict(
        text=PRESETS["sd15"]["text"],
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu"),
        unet=dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
            sample_size=128,
        ),
        vae=dict(PRESETS["sd15"]["vae"], sample_size=1024),
    ),
}
# SDXL's VAE: its own scaling factor; force_upcast (the fp16 VAE overflows: diffusers decodes in fp32).
SDXL_VAE_COMMON = dict(VAE_COMMON, scaling_factor=0.13025, force_upcast=True)

# SD 1.5's tokenizer/special_tokens_map.json.
def _special_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


SPECIAL_TOKENS_MAP = {
    "bos_token": _special_token("<|startoftext|>"),
    "eos_token": _special_token("<|endoftext|>"),
    "pad_token": "<|endoftext|>",
    "unk_token": _special_token("<|endoftext|>"),
}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def build_tokenizer(vocab_dir):
    from clip_vocab import write_clip_vocab
    from transformers import CLIPTokenizer

    write_clip_vocab(vocab_dir)
    for name in ("vocab.json", "merges.txt"):
        if not (Path(vocab_dir) / name).is_file():
            raise FileNotFoundError(f"clip_vocab.write_clip_vocab did not write {name} into {vocab_dir}")
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab_dir), model_max_length=CLIP_MAX_LENGTH)
    if len(tokenizer) != 49408 or tokenizer.bos_token_id != 49406 or tokenizer.eos_token_id != 49407:
        raise RuntimeError(
            f"unexpected CLIP tokenizer: {len(tokenizer)} ids, bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}"
        )
    return tokenizer


def build_pipeline(preset, seed, tokenizer):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = PRESETS[preset]
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_COMMON, **p["text"])).eval()
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET_COMMON, **p["unet"]).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE_COMMON, **p["vae"]).eval()
    # from_config, not the constructor: PNDMScheduler takes no clip_sample, but SD 1.5's config carries it (a DDIM
    # leftover) and from_config keeps such keys in the saved config, exactly as loading the real file does.
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_xl_pipeline(preset, seed, tokenizer, tokenizer_2):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = XL_PRESETS[preset]
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_COMMON, **p["text"])).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(TEXT_COMMON, **p["text_2"]))).eval()
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**SDXL_UNET_COMMON, **p["unet"]).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**SDXL_VAE_COMMON, **p["vae"]).eval()
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def write_legacy_text_encoder_keys(text_encoder_dir):
    """Rewrites text_encoder/model.safetensors in the key layout of the real SD 1.5 file (transformers < 5):
    every key under "text_model." plus the int64 buffer text_model.embeddings.position_ids [1, 77]. transformers
    5 saves the keys without the prefix and without position_ids, and loads either layout."""
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(text_encoder_dir) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (sharded text encoder?)")
    state = load_file(str(path))
    if any(k.startswith("text_model.") for k in state):
        return
    legacy = {"text_model." + k: v for k, v in state.items()}
    n = legacy["text_model.embeddings.position_embedding.weight"].shape[0]
    legacy["text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    save_file(legacy, str(path), metadata={"format": "pt"})


def make_model(out_dir, preset="tiny", seed=0, dtype="fp32", legacy_text_encoder_keys=False):
    """Builds and saves the model; returns {component: parameter count}."""
    import torch

    out_dir = Path(out_dir)
    xl = preset in XL_PRESETS
    with tempfile.TemporaryDirectory(prefix="clip_vocab_") as vocab_dir:
        tokenizer = build_tokenizer(vocab_dir)
        if xl:
            # SDXL's tokenizer_2 (OpenCLIP's) pads with "!" (id 0) rather than <|endoftext|>.
            tokenizer_2 = build_tokenizer(vocab_dir)
            tokenizer_2.pad_token = "!"
            pipe = build_xl_pipeline(preset, seed, tokenizer, tokenizer_2)
        else:
            pipe = build_pipeline(preset, seed, tokenizer)
        towers = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
        if dtype == "fp16":
            for module in towers + [pipe.unet, pipe.vae]:
                module.to(torch.float16)
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
        # transformers >= 5 saves only tokenizer.json + tokenizer_config.json; add the files a real SD 1.x
        # tokenizer/ folder has (byte-identical vocab.json/merges.txt to the ones the tokenizer was built from).
        tok_dirs = [out_dir / "tokenizer"] + ([out_dir / "tokenizer_2"] if xl else [])
        for tok_dir in tok_dirs:
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(Path(vocab_dir) / name, tok_dir / name)
    for tok_dir in tok_dirs:
        special = dict(SPECIAL_TOKENS_MAP, pad_token="!") if tok_dir.name == "tokenizer_2" else SPECIAL_TOKENS_MAP
        with open(tok_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2)
            f.write("\n")
    if legacy_text_encoder_keys:
        write_legacy_text_encoder_keys(out_dir / "text_encoder")
    counts = {"text_encoder": _count(pipe.text_encoder)}
    if xl:
        counts["text_encoder_2"] = _count(pipe.text_encoder_2)
    counts.update(unet=_count(pipe.unet), vae=_count(pipe.vae))
    return counts


def _dir_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write a diffusers-format Stable Diffusion 1.x folder with random weights.",
    )
    parser.add_argument("out_dir", type=Path, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--preset", choices=sorted(PRESETS) + sorted(XL_PRESETS), default="tiny",
                        help="architecture (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default: 0)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="saved weight dtype (default: fp32)")
    parser.add_argument(
        "--legacy-text-encoder-keys",
        action="store_true",
        help='store the text encoder as the real SD 1.5 file does: keys under "text_model." plus the int64 '
        "text_model.embeddings.position_ids (transformers 5 writes neither)",
    )
    args = parser.parse_args(argv)  # argparse exits with status 2 and a usage message on bad arguments
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"{args.out_dir} exists and is not a directory")

    t0 = time.monotonic()
    counts = make_model(args.out_dir, args.preset, args.seed, args.dtype, args.legacy_text_encoder_keys)
    elapsed = time.monotonic() - t0
    print(f"wrote {args.out_dir.resolve()} (preset {args.preset}, seed {args.seed}, {args.dtype})")
    for name, n in counts.items():
        print(f"  {name}: {n:,} parameters")
    print(f"  total: {sum(counts.values()):,} parameters, {_dir_size(args.out_dir) / 2**20:.1f} MiB on disk, "
          f"{elapsed:.1f} s")


if __name__ == "__main__":
    main()
