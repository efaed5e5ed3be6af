#!/usr/bin/env python3
"""Writes diffusers' UNet2DConditionModel outputs for fixed seeded inputs, the ground truth for the C++ UNet tests.

    reference_unet.py --model DIR --out FILE.safetensors [--sizes BxHxW ...] [--device cpu]

DIR is a diffusers-format SD 1.x or SDXL folder (unet/ inside; e.g. one written by make_tiny_model.py). The UNet runs in
fp32, eval mode, under torch.no_grad, on one intra-op thread (so the summation order is the reproducible one),
with diffusers' default attention processor (scaled_dot_product_attention).

Each case NAME (e.g. "b2_8x8") stores, all F32 (the C++ safetensors reader takes F32/F16/BF16 only):
    NAME.sample                 [B, in_channels, H, W]   torch.randn, generator seeded per case
    NAME.timesteps              [B]                      exactly representable in F32 (some fractional)
    NAME.encoder_hidden_states  [B, 77, cross_attention_dim]
    NAME.out                    [B, out_channels, H, W]  unet(sample, timesteps, encoder_hidden_states).sample
    NAME.text_embeds, NAME.time_ids  [B, pooled], [B, 6]  SDXL ("text_time") UNets only: added_cond_kwargs
Metadata (strings): cases (JSON list of names, in order), model, torch_version, diffusers_version.

The default sizes cover the native 8x8 and sizes that are not multiples of 8 (5x7, 9x13, 41x61: diffusers then
hands each upsampler the skip connection's size), plus 1x1 and a wide 16x24. Pass --sizes for big models.
"""

import argparse
import json
import re
import sys
from pathlib import Path

TEXT_LENGTH = 77
DEFAULT_SIZES = ["2x8x8", "1x5x7", "2x9x13", "1x41x61", "1x16x24", "1x1x1"]
# Timesteps per case, cycled: the ends of SD's 1000-step range, the middle, and fractional values.
TIMESTEP_POOL = [999.0, 1.0, 500.0, 0.0, 777.5, 10.25, 250.0, 981.0]


def parse_size(text):
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m or min(int(g) for g in m.groups()) < 1:
        raise argparse.ArgumentTypeError(f"expected BxHxW with positive integers, got {text!r}")
    return tuple(int(g) for g in m.groups())


def make_cases(sizes, in_channels, cross_attention_dim, pooled_dim=0):
    """{name: (sample, timesteps, hidden, added)}; `added` (SDXL's text_time models, pooled_dim > 0) holds
    text_embeds [B, pooled_dim] and time_ids [B, 6], drawn after the other inputs, else None."""
    import torch

    cases = {}
    pool_at = 0
    for index, (b, h, w) in enumerate(sizes):
        name = f"b{b}_{h}x{w}"
        if name in cases:
            name = f"{name}_{index}"
        g = torch.Generator().manual_seed(1000 + index)
        sample = torch.randn(b, in_channels, h, w, generator=g, dtype=torch.float32)
        hidden = torch.randn(b, TEXT_LENGTH, cross_attention_dim, generator=g, dtype=torch.float32)
        timesteps = torch.tensor([TIMESTEP_POOL[(pool_at + i) % len(TIMESTEP_POOL)] for i in range(b)],
                                 dtype=torch.float32)
        pool_at += b
        added = None
        if pooled_dim:
            # Original size, crop top-left, target size in pixels, as SDXL's pipeline passes them (varied per row).
            ids = [[8 * h + 8 * i, 8 * w, 16 * i, 0, 8 * h, 8 * w] for i in range(b)]
            added = {"text_embeds": torch.randn(b, pooled_dim, generator=g, dtype=torch.float32),
                     "time_ids": torch.tensor(ids, dtype=torch.float32)}
        cases[name] = (sample, timesteps, hidden, added)
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write diffusers' UNet2DConditionModel outputs as a reference.")
    parser.add_argument("--model", type=Path, required=True, help="diffusers SD 1.x folder (unet/ inside)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--sizes", type=parse_size, nargs="+", help=f"BxHxW latent shapes (default: {DEFAULT_SIZES})")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = parser.parse_args(argv)
    if not (args.model / "unet").is_dir():
        parser.error(f"{args.model} has no unet/ folder")
    sizes = args.sizes or [parse_size(s) for s in DEFAULT_SIZES]

    import diffusers
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(str(args.model / "unet"), torch_dtype=torch.float32)
    unet = unet.to(args.device).eval()
    cross_dim = unet.config.cross_attention_dim
    if not isinstance(cross_dim, int):
        sys.exit(f"per-level cross_attention_dim {cross_dim} is not supported by this script")

    tensors = {}
    pooled_dim = 0
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    elif unet.config.addition_embed_type is not None:
        sys.exit(f"addition_embed_type {unet.config.addition_embed_type!r} is not supported by this script")
    cases = make_cases(sizes, unet.config.in_channels, cross_dim, pooled_dim)
    with torch.no_grad():
        for name, (sample, timesteps, hidden, added) in cases.items():
            kwargs = {}
            if added is not None:
                kwargs["added_cond_kwargs"] = {k: v.to(args.device) for k, v in added.items()}
                for k, v in added.items():
                    tensors[f"{name}.{k}"] = v.contiguous()
            out = unet(sample.to(args.device), timesteps.to(args.device), hidden.to(args.device), **kwargs).sample
            tensors[f"{name}.sample"] = sample.contiguous()
            tensors[f"{name}.timesteps"] = timesteps.contiguous()
            tensors[f"{name}.encoder_hidden_states"] = hidden.contiguous()
            tensors[f"{name}.out"] = out.float().cpu().contiguous()
            print(f"{name}: sample {list(sample.shape)} -> out {list(out.shape)}, timesteps {timesteps.tolist()}")
    metadata = {
        "cases": json.dumps(list(cases)),
        "model": str(args.model.resolve()),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {args.out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
