#!/usr/bin/env python3
"""Writes diffusers' VAE decode of seeded latents, the ground truth for the C++ VAE tests.

    reference_vae.py --model DIR --out FILE.safetensors [--sizes 8x8,5x7] [--tiled-sizes 13x17] [--batch 2]
                     [--seed 0]

DIR is a diffusers-format SD 1.x folder (vae/ inside). AutoencoderKL.from_pretrained(DIR/vae) runs in fp32, eval
mode, under torch.no_grad, on one CPU thread. For each latent size HxW (in latent pixels) the latents are
torch.randn([batch, latent_channels, H, W]) from a CPU generator seeded with seed + index, scaled like the
denoiser's output (N(0,1) latents are what SD 1.x produces after multiplying by scaling_factor), and decoded the
way StableDiffusionPipeline decodes: vae.decode(latents / scaling_factor).sample, then
VaeImageProcessor.postprocess(output_type="np") and (x * 255).round(), the bytes numpy_to_pil hands to PIL.

--tiled-sizes: latent sizes decoded again with vae.enable_tiling() (diffusers' tiled_decode: tiles of
sample_size / 8 latent pixels overlapping by a quarter, seams blended); default 13x17 for small VAEs (3 x 3 tiles
of the tiny preset's 8), none for big ones (their 64-pixel tiles would take minutes on a CPU).

Output tensors, all F32 (the C++ reader takes F32/F16/BF16 only; RGB8 values 0..255 are exact in F32), per size
index i:
    latents_{i}  [B, C, H, W]      the denoiser-space latents (input of the C++ Decode)
    image_{i}    [B, 3, 8H, 8W]    vae.decode(latents / scaling_factor).sample, in [-1, 1] (unclamped)
    rgb8_{i}     [B, 8H, 8W, 3]    postprocess -> *255 -> round
    tiled_latents_{i}, tiled_image_{i}   the same for each tiled size
Metadata (strings): sizes, batch, seed, model, scaling_factor, torch_version, diffusers_version.
"""

import argparse
import re
import sys
from pathlib import Path


def parse_sizes(text):
    sizes = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise ValueError(f"bad size {item!r}: expected HxW with positive integers")
        sizes.append((int(m.group(1)), int(m.group(2))))
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write diffusers' VAE decode as a reference.")
    parser.add_argument("--model", type=Path, required=True, help="diffusers SD 1.x folder (vae/ inside)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--sizes", default=None,
                        help="latent sizes HxW, comma separated (default: 8x8,5x7; 4x4,5x3 for big VAEs)")
    parser.add_argument("--tiled-sizes", default=None,
                        help="latent sizes HxW decoded with tiling (default: 13x17; none for big VAEs)")
    parser.add_argument("--batch", type=int, default=2, help="images per size (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.model / "vae").is_dir():
        parser.error(f"{args.model} has no vae/ folder")
    if args.batch < 1:
        parser.error("--batch must be >= 1")

    import diffusers
    import torch
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(str(args.model / "vae"), torch_dtype=torch.float32).eval()
    big = max(vae.config.block_out_channels) >= 256
    try:
        sizes = parse_sizes(args.sizes or ("4x4,5x3" if big else "8x8,5x7"))
        tiled_text = args.tiled_sizes if args.tiled_sizes is not None else ("" if big else "13x17")
        tiled_sizes = parse_sizes(tiled_text) if tiled_text else []
    except ValueError as e:
        parser.error(str(e))
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = VaeImageProcessor(vae_scale_factor=scale)
    factor = vae.config.scaling_factor

    tensors = {}
    with torch.no_grad():
        for i, (h, w) in enumerate(sizes):
            generator = torch.Generator("cpu").manual_seed(args.seed + i)
            latents = torch.randn([args.batch, vae.config.latent_channels, h, w], generator=generator)
            image = vae.decode(latents / factor, return_dict=False)[0]
            rgb = processor.postprocess(image, output_type="np", do_denormalize=[True] * args.batch)
            rgb8 = torch.from_numpy((rgb * 255).round())
            tensors[f"latents_{i}"] = latents.contiguous()
            tensors[f"image_{i}"] = image.float().contiguous()
            tensors[f"rgb8_{i}"] = rgb8.float().contiguous()
            print(f"size {h}x{w}: image {list(image.shape)}, range [{image.min():.3f}, {image.max():.3f}]")
        vae.enable_tiling()
        for i, (h, w) in enumerate(tiled_sizes):
            generator = torch.Generator("cpu").manual_seed(args.seed + 100 + i)
            latents = torch.randn([args.batch, vae.config.latent_channels, h, w], generator=generator)
            image = vae.decode(latents / factor, return_dict=False)[0]
            tensors[f"tiled_latents_{i}"] = latents.contiguous()
            tensors[f"tiled_image_{i}"] = image.float().contiguous()
            print(f"tiled size {h}x{w}: image {list(image.shape)} (tiles of {vae.tile_latent_min_size})")
    metadata = {
        "sizes": ",".join(f"{h}x{w}" for h, w in sizes),
        "tiled_sizes": ",".join(f"{h}x{w}" for h, w in tiled_sizes),
        "batch": str(args.batch),
        "seed": str(args.seed),
        "model": str(args.model.resolve()),
        "scaling_factor": repr(factor),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {args.out}: {len(sizes)} sizes, batch {args.batch}")


if __name__ == "__main__":
    sys.exit(main())
