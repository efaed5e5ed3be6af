#!/usr/bin/env python3
"""diffusers' StableDiffusionPipeline (or StableDiffusionXLPipeline) images for the C++ end-to-end tests.

    reference_pipeline.py --model DIR --out FILE.safetensors

The pipeline class comes from the folder's model_index.json. For every scheduler tomeserve offers, runs it (fp32, CPU, one thread) from fixed initial latents and
stores the RGB8 image diffusers would save (PIL conversion: round(x * 255)). Cases cover the native size and a
size that is not a multiple of 64 (odd latent sizes), guidance on and off. Tensors (F32 only, as the C++ reader
loads float weights): "<case>/latents" [1,4,h,w] and "<case>/image" [H,W,3]; seeded cases (no latents: noise
from one CPU generator per sample) store "<case>/image/<k>" per sample. Metadata "cases" is a JSON list of
{name, scheduler, prompt, negative_prompt, seed | prompts, negative_prompts, seeds, width, height, steps, guidance}.

SDXL (tiny-xl): the same schedulers at the native size and at sizes whose latents halve unevenly, an empty
negative prompt (force_zeros_for_empty_prompt: zeros, not the encoding of ""; diffusers' negative_prompt=None,
as tomeserve reads an empty one), guidance off, a seeded batch (non-empty negatives: a batched diffusers call
zeroes all of its negatives or none).
No invisible watermark (add_watermarker=False): tomeserve does not watermark, and the watermark is not part of
the model.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def cases():
    out = []
    for name in SCHEDULERS:
        out.append(dict(name=f"{name}_native", scheduler=name, prompt="a photo of a cat on a red sofa",
                        negative_prompt="blurry, low quality", width=64, height=64, steps=5, guidance=7.5, seed=42))
    out.append(dict(name="pndm_odd", scheduler="pndm", prompt="an astronaut riding a horse", negative_prompt="",
                    width=72, height=40, steps=4, guidance=7.5, seed=7))
    out.append(dict(name="euler_a_noguidance", scheduler="euler_a", prompt="a lighthouse at dusk", negative_prompt="",
                    width=64, height=64, steps=4, guidance=1.0, seed=3))
    # Seeded cases: no latents given; diffusers draws each sample's noise from its own CPU generator (a list of
    # generators), in the model dtype, then keeps drawing from it for ancestral noise.
    out.append(dict(name="pndm_seeded", scheduler="pndm", prompts=["a bowl of fruit"], negative_prompts=["dark"],
                    seeds=[1234], width=64, height=64, steps=4, guidance=7.5))
    out.append(dict(name="euler_a_seeded_batch2", scheduler="euler_a", prompts=["a red car", "a green tree"],
                    negative_prompts=["blurry", ""], seeds=[42, 2**40 + 7], width=64, height=48, steps=4,
                    guidance=6.0))
    return out


def xl_cases():
    out = []
    for name, (w, h) in zip(SCHEDULERS, [(128, 128), (96, 64), (128, 128), (72, 40), (64, 128), (128, 96)]):
        out.append(dict(name=f"xl_{name}_{w}x{h}", scheduler=name, prompt="a photo of a cat on a red sofa",
                        negative_prompt="blurry, low quality", width=w, height=h, steps=4, guidance=7.5, seed=42))
    out.append(dict(name="xl_euler_empty_negative", scheduler="euler", prompt="an astronaut riding a horse",
                    negative_prompt="", width=128, height=128, steps=4, guidance=5.0, seed=7))
    out.append(dict(name="xl_euler_a_noguidance", scheduler="euler_a", prompt="a lighthouse at dusk",
                    negative_prompt="", width=128, height=128, steps=4, guidance=1.0, seed=3))
    out.append(dict(name="xl_euler_a_seeded_batch2", scheduler="euler_a", prompts=["a red car", "a green tree"],
                    negative_prompts=["blurry", "dark"], seeds=[42, 2**40 + 7], width=128, height=96, steps=3,
                    guidance=6.0))
    return out


def load_pipeline(model):
    """The model's pipeline (fp32, no safety checker or watermark) and whether it is SDXL."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    xl = json.loads((Path(model) / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, xl


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    import diffusers

    pipe, xl = load_pipeline(a.model)
    base_config = pipe.scheduler.config
    tensors, meta = {}, []
    for c in (xl_cases() if xl else cases()):
        cls_name, extra = SCHEDULERS[c["scheduler"]]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(base_config, **extra)
        if "seeds" in c:
            images = pipe(prompt=c["prompts"], negative_prompt=c["negative_prompts"], height=c["height"],
                          width=c["width"], num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                          generator=[torch.Generator("cpu").manual_seed(s) for s in c["seeds"]],
                          output_type="np").images
            for k, image in enumerate(images):
                rgb8 = (image * 255).round().astype(np.uint8)
                tensors[f"{c['name']}/image/{k}"] = torch.from_numpy(rgb8.astype(np.float32)).contiguous()
            meta.append(c)
            continue
        h, w = c["height"] // 8, c["width"] // 8
        latents = torch.randn((1, 4, h, w), generator=torch.Generator("cpu").manual_seed(1000 + c["seed"]))
        image = pipe(prompt=c["prompt"], negative_prompt=c["negative_prompt"] or None, height=c["height"],
                     width=c["width"], num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                     latents=latents.clone(), generator=torch.Generator("cpu").manual_seed(c["seed"]),
                     output_type="np").images[0]
        rgb8 = (image * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
        tensors[f"{c['name']}/latents"] = latents.contiguous()
        tensors[f"{c['name']}/image"] = torch.from_numpy(rgb8.astype(np.float32)).contiguous()
        meta.append(c)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, a.out, metadata={"cases": json.dumps(meta), "diffusers_version": diffusers.__version__})
    print(f"wrote {len(meta)} cases to {a.out}")


if __name__ == "__main__":
    sys.exit(main())
