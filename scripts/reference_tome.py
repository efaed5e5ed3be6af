#!/usr/bin/env python3
"""tomesd 0.1.3 (use_rand=False) outputs for the C++ Token Merging parity tests.

    reference_tome.py --model DIR --out FILE.safetensors [--preset-cases tiny|sd15|tiny-xl]

UNet cases: diffusers' UNet2DConditionModel patched by tomesd.apply_patch with one setting per case, fp32, CPU,
one intra-op thread, from seeded inputs. Tensors "unet/<case>/{sample,timesteps,encoder_hidden_states,out}"
(SDXL UNets, tiny-xl: also text_embeds and time_ids, the added conditions).
Pipeline cases (tiny: StableDiffusionPipeline; tiny-xl: StableDiffusionXLPipeline, no watermark) with tomesd
applied, from fixed initial latents; tensors "pipe/<case>/{latents,image}" (RGB8 as F32, diffusers'
round(x * 255)). SDXL cases use max_downsample >= 2: at tomesd's default 1 nothing is patched on SDXL (its
finest level has no attention), and one case pins exactly that.

Metadata "unet_cases" / "pipeline_cases": JSON lists of {name, ..., tome: {apply_patch kwargs}, blocks}. blocks
lists, in call order of the first UNet call, what tomesd's compute_merge handed to the matcher for every patched
block: [N, w, h, r] (N tokens, the w x h grid, r = int(N * ratio)). use_rand is always False: tomesd's random
partition comes from a fork of the process-global RNG and cannot be reproduced.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TEXT_LENGTH = 77


def tome(ratio, md=1, sx=2, sy=2, attn=True, cross=False, mlp=False):
    return dict(ratio=ratio, max_downsample=md, sx=sx, sy=sy, use_rand=False, merge_attn=attn,
                merge_crossattn=cross, merge_mlp=mlp)


def unet_cases(preset):
    """(name, batch, h, w, tome kwargs). Sizes not divisible by the stride leave right/bottom tokens as src."""
    if preset == "tiny-xl":
        # SDXL has no attention at full resolution: max_downsample 1 patches no block (tomesd's default, why
        # ToMe "does nothing" on SDXL); 2 merges in the 2x-down blocks, 4 in the 4x-down ones too.
        return [
            ("md1_b2_16x16_patches_nothing", 2, 16, 16, tome(0.5, md=1)),
            ("r05_b2_16x16_md2", 2, 16, 16, tome(0.5, md=2)),
            ("r03_b1_9x13_md2_s33_all", 1, 9, 13, tome(0.3, md=2, sx=3, sy=3, cross=True, mlp=True)),
            ("r05_b2_16x24_md4_s12", 2, 16, 24, tome(0.5, md=4, sx=1, sy=2)),
            ("r075_b1_16x16_md4", 1, 16, 16, tome(0.75, md=4)),
        ]
    if preset == "sd15":
        return [
            ("r05_b2_8x8", 2, 8, 8, tome(0.5)),
            ("r03_b1_9x7_md2_s33_all", 1, 9, 7, tome(0.3, md=2, sx=3, sy=3, cross=True, mlp=True)),
            ("r075_b3_12x10_md2", 3, 12, 10, tome(0.75, md=2)),
            ("r01_b2_8x8_md4_s12_mlp", 2, 8, 8, tome(0.1, md=4, sx=1, sy=2, attn=False, mlp=True)),
            ("r05_b1_16x16_md8_cross", 1, 16, 16, tome(0.5, md=8, cross=True)),
        ]
    cases = [(f"r{str(r).replace('.', '')}_b2_8x8", 2, 8, 8, tome(r)) for r in (0.1, 0.3, 0.5, 0.75)]
    # Odd sizes at max_downsample 4/8 only where tomesd's ceil(latent / downsample) grid is the block's real
    # grid: for 9x13 it computes 3x5 for a 3x4 block and crashes (tomeserve leaves such a block unmerged).
    cases += [(f"md{md}_b2_9x13", 2, 9, 13, tome(0.5, md=md)) for md in (1, 2)]
    # max_downsample 8 reaches the mid block (latent / 8): tomesd fails on a grid smaller than the stride.
    cases += [("md4_b2_7x11", 2, 7, 11, tome(0.5, md=4)), ("md8_b2_16x16", 2, 16, 16, tome(0.5, md=8))]
    cases += [
        ("s12_b2_9x13_md2", 2, 9, 13, tome(0.5, md=2, sx=1, sy=2)),
        ("s33_b2_9x13_md2", 2, 9, 13, tome(0.5, md=2, sx=3, sy=3)),
        ("s33_r075_b1_16x16_md2", 1, 16, 16, tome(0.75, md=2, sx=3, sy=3)),
        ("cross_b2_8x8_md4", 2, 8, 8, tome(0.5, md=4, attn=False, cross=True)),
        ("mlp_b2_8x8_md4", 2, 8, 8, tome(0.5, md=4, attn=False, mlp=True)),
        ("attn_cross_b2_7x11_md2", 2, 7, 11, tome(0.3, md=2, cross=True)),
        ("all_b3_7x11_md4", 3, 7, 11, tome(0.5, md=4, cross=True, mlp=True)),
        ("b1_5x7_md2", 1, 5, 7, tome(0.5, md=2)),
        ("b3_41x61_md2", 3, 41, 61, tome(0.5, md=2)),
        ("r05_b2_16x24_md8_s12_mlp", 2, 16, 24, tome(0.5, md=8, sx=1, sy=2, mlp=True)),
    ]
    return cases


def pipeline_cases():
    return [
        dict(name="pndm_r05", scheduler="PNDMScheduler", prompt="a photo of a cat on a red sofa",
             negative_prompt="blurry", width=64, height=64, steps=5, guidance=7.5, seed=42, tome=tome(0.5)),
        dict(name="ddim_odd_r03_md2", scheduler="DDIMScheduler", prompt="an astronaut riding a horse",
             negative_prompt="", width=72, height=40, steps=4, guidance=7.5, seed=7, tome=tome(0.3, md=2)),
        dict(name="euler_noguidance_r075_md4", scheduler="EulerDiscreteScheduler", prompt="a lighthouse at dusk",
             negative_prompt="", width=64, height=64, steps=4, guidance=1.0, seed=3,
             tome=tome(0.75, md=4, mlp=True)),
    ]


def xl_pipeline_cases():
    return [
        dict(name="xl_euler_r05_md2", scheduler="EulerDiscreteScheduler", prompt="a photo of a cat on a red sofa",
             negative_prompt="blurry", width=128, height=128, steps=4, guidance=7.5, seed=42, tome=tome(0.5, md=2)),
        dict(name="xl_ddim_odd_r03_md4_s12", scheduler="DDIMScheduler", prompt="an astronaut riding a horse",
             negative_prompt="", width=72, height=40, steps=3, guidance=5.0, seed=7, tome=tome(0.3, md=4, sx=1)),
        dict(name="xl_euler_noguidance_r075_md2_mlp", scheduler="EulerDiscreteScheduler",
             prompt="a lighthouse at dusk", negative_prompt="", width=128, height=96, steps=3, guidance=1.0,
             seed=3, tome=tome(0.75, md=2, mlp=True)),
        dict(name="xl_euler_r05_md1_patches_nothing", scheduler="EulerDiscreteScheduler",
             prompt="a bowl of fruit", negative_prompt="", width=128, height=128, steps=3, guidance=7.5, seed=5,
             tome=tome(0.5, md=1)),
    ]


class BlockRecorder:
    """Wraps tomesd's matcher to record [N, w, h, r] per patched block of the first UNet call."""

    def __init__(self):
        import tomesd.merge
        self.module = tomesd.merge
        self.original = tomesd.merge.bipartite_soft_matching_random2d
        self.blocks, self.active = [], False

    def __enter__(self):
        def wrapped(metric, w, h, sx, sy, r, *args, **kwargs):
            if self.active:
                self.blocks.append([int(metric.shape[1]), int(w), int(h), int(r)])
            return self.original(metric, w, h, sx, sy, r, *args, **kwargs)
        self.module.bipartite_soft_matching_random2d = wrapped
        return self

    def __exit__(self, *exc):
        self.module.bipartite_soft_matching_random2d = self.original


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset-cases", choices=["tiny", "sd15", "tiny-xl"], default="tiny")
    a = p.parse_args()
    torch.set_num_threads(1)
    import diffusers
    import tomesd
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    tensors, unet_meta, pipe_meta = {}, [], []
    unet = UNet2DConditionModel.from_pretrained(str(a.model / "unet"), torch_dtype=torch.float32).eval()
    cross_dim = unet.config.cross_attention_dim
    for index, (name, b, h, w, kwargs) in enumerate(unet_cases(a.preset_cases)):
        g = torch.Generator().manual_seed(2000 + index)
        sample = torch.randn(b, unet.config.in_channels, h, w, generator=g)
        hidden = torch.randn(b, TEXT_LENGTH, cross_dim, generator=g)
        timesteps = torch.tensor([999.0, 500.0, 1.0, 250.0][:b] if b <= 4 else [500.0] * b)
        inputs = dict(sample=sample, timesteps=timesteps, encoder_hidden_states=hidden)
        added = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop ids
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.randn(b, pooled, generator=g),
                     "time_ids": torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]] * b)}
        tomesd.apply_patch(unet, **kwargs)
        with BlockRecorder() as rec, torch.no_grad():
            rec.active = True
            out = unet(sample, timesteps, hidden, added_cond_kwargs=added or None).sample
        tomesd.remove_patch(unet)
        for key, t in dict(inputs, **added, out=out).items():
            tensors[f"unet/{name}/{key}"] = t.float().contiguous()
        unet_meta.append(dict(name=name, tome=kwargs, blocks=rec.blocks))
        print(f"unet {name}: {len(rec.blocks)} patched blocks", flush=True)
    del unet

    if a.preset_cases in ("tiny", "tiny-xl"):
        if a.preset_cases == "tiny":
            pipe = StableDiffusionPipeline.from_pretrained(str(a.model), safety_checker=None,
                                                           requires_safety_checker=False, torch_dtype=torch.float32)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(a.model), torch_dtype=torch.float32,
                                                             add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        base_config = pipe.scheduler.config
        for c in (pipeline_cases() if a.preset_cases == "tiny" else xl_pipeline_cases()):
            pipe.scheduler = getattr(diffusers, c["scheduler"]).from_config(base_config)
            h, w = c["height"] // 8, c["width"] // 8
            latents = torch.randn((1, 4, h, w), generator=torch.Generator("cpu").manual_seed(1000 + c["seed"]))
            tomesd.apply_patch(pipe, **c["tome"])
            image = pipe(prompt=c["prompt"], negative_prompt=c["negative_prompt"] or None, height=c["height"],
                         width=c["width"], num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                         latents=latents.clone(), output_type="np").images[0]
            tomesd.remove_patch(pipe)
            rgb8 = (image * 255).round().astype(np.uint8)
            tensors[f"pipe/{c['name']}/latents"] = latents.contiguous()
            tensors[f"pipe/{c['name']}/image"] = torch.from_numpy(rgb8.astype(np.float32)).contiguous()
            pipe_meta.append(c)
            print(f"pipeline {c['name']}", flush=True)

    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(a.out), metadata={
        "unet_cases": json.dumps(unet_meta), "pipeline_cases": json.dumps(pipe_meta),
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        "tomesd_version": getattr(tomesd, "__version__", "0.1.3")})
    print(f"wrote {a.out}: {len(unet_meta)} unet cases, {len(pipe_meta)} pipeline cases")


if __name__ == "__main__":
    sys.exit(main())
