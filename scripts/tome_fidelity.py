#!/usr/bin/env python3
"""Where tomeserve's Token Merging images differ from diffusers + tomesd by more than one level, is it a near-tie in
the matching? For one configuration and several step counts this runs, from the same initial latents:

  tomesd     diffusers' StableDiffusionPipeline + tomesd.apply_patch, fp32 (the reference)
  tomesd64   the same in float64: what tomesd itself gives when only rounding changes
  tomeserve  tomeserve-gen generate with the same settings and --init-latents

and prints per step count the pixel differences of tomeserve and of tomesd64 against tomesd, with the smallest
matching margins tomesd met in the fp32 run: the score gap between the r-th merged and the first unmerged src token
(which tokens merge) and between the best and second-best dst of a merged token (where it goes). A margin at the
level of float rounding (~1e-7) means that any change in summation order can flip a merge.

  scripts/tome_fidelity.py --model build/testdata/tiny [--bin build/bin] [--steps 1,2,4,8] [--json FILE]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
CASE = dict(prompt="a photo of a cat on a red sofa", negative_prompt="", width=192, height=192, guidance=4.0, seed=11,
            ratio=0.6, max_downsample=4, sx=2, sy=3, merge_mlp=True)


class MarginRecorder:
    """Wraps tomesd's matcher and records, per call and batch row, the two decision margins (same arithmetic as
    tomesd's own scores: cosine similarity of src against dst tokens)."""

    def __init__(self):
        import tomesd.merge
        self.module, self.original = tomesd.merge, tomesd.merge.bipartite_soft_matching_random2d
        self.select, self.route = [], []

    def __enter__(self):
        def wrapped(metric, w, h, sx, sy, r, *args, **kwargs):
            merge, unmerge = self.original(metric, w, h, sx, sy, r, *args, **kwargs)
            if r > 0:
                self.record(metric, w, h, sx, sy, r)
            return merge, unmerge
        self.module.bipartite_soft_matching_random2d = wrapped
        return self

    def __exit__(self, *exc):
        self.module.bipartite_soft_matching_random2d = self.original

    def record(self, metric, w, h, sx, sy, r):
        # use_rand off: the top-left token of every sy x sx cell is dst, the rest src (tomesd's partition).
        hsy, wsx = h // sy, w // sx
        is_dst = torch.zeros(h, w, dtype=torch.bool)
        is_dst[:hsy * sy:sy, :wsx * sx:sx] = True
        is_dst = is_dst.flatten()
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, ~is_dst] @ m[:, is_dst].transpose(-1, -2)
        r = min(r, scores.shape[1])
        top2 = scores.topk(2, dim=-1).values
        node_max = top2[..., 0]
        ranked = node_max.sort(dim=-1, descending=True).values
        merged = node_max.argsort(dim=-1, descending=True)[..., :r]
        for row in range(scores.shape[0]):
            if r < ranked.shape[1]:
                self.select.append(float(ranked[row, r - 1] - ranked[row, r]))
            gaps = (top2[row, :, 0] - top2[row, :, 1])[merged[row]]
            self.route.append(float(gaps.min()))


def tomesd_image(pipe, latents, steps, dtype, recorder=None):
    import tomesd
    pipe.to(dtype=dtype)
    tomesd.apply_patch(pipe, ratio=CASE["ratio"], max_downsample=CASE["max_downsample"], sx=CASE["sx"],
                       sy=CASE["sy"], use_rand=False, merge_attn=True, merge_crossattn=False,
                       merge_mlp=CASE["merge_mlp"])
    try:
        ctx = recorder if recorder is not None else _Null()
        with ctx, torch.no_grad():
            image = pipe(prompt=CASE["prompt"], negative_prompt=CASE["negative_prompt"] or None, height=CASE["height"], width=CASE["width"],
                         num_inference_steps=steps, guidance_scale=CASE["guidance"],
                         latents=latents.to(dtype).clone(), output_type="np").images[0]
    finally:
        tomesd.remove_patch(pipe)
    return (np.asarray(image, dtype=np.float64) * 255).round().astype(np.uint8)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def tomeserve_image(gen, model, latents, steps, tmp):
    lat = Path(tmp) / "latents.safetensors"
    save_file({"latents": latents.contiguous()}, str(lat))
    out = Path(tmp) / f"tomeserve-{steps}.png"
    cmd = [str(gen), "generate", "--model", str(model), "--prompt", CASE["prompt"], "--width", str(CASE["width"]),
           "--height", str(CASE["height"]), "--steps", str(steps), "--guidance", str(CASE["guidance"]),
           "--scheduler", "pndm", "--init-latents", str(lat), "--tome-ratio", str(CASE["ratio"]),
           "--tome-max-downsample", str(CASE["max_downsample"]), "--tome-sx", str(CASE["sx"]),
           "--tome-sy", str(CASE["sy"]), "--tome-no-rand", "--device", "cpu", "--dtype", "fp32", "-o", str(out)]
    if CASE["merge_mlp"]:
        cmd.append("--tome-merge-mlp")
    if CASE["negative_prompt"]:
        cmd += ["--negative-prompt", CASE["negative_prompt"]]
    r = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        raise RuntimeError(f"tomeserve-gen failed: {r.stderr}")
    return np.asarray(Image.open(out).convert("RGB"))


def diff(a, b):
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "mean": round(float(d.mean()), 4), "differ": round(float((d > 0).mean()), 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--bin", type=Path, default=REPO / "build" / "bin")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--seeds", default=str(CASE["seed"]), help="initial-latent seeds, comma-separated")
    p.add_argument("--prompt", default=CASE["prompt"])
    p.add_argument("--negative-prompt", default=CASE["negative_prompt"])
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    CASE.update(prompt=a.prompt, negative_prompt=a.negative_prompt)
    torch.set_num_threads(1)
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(a.model), safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    h, w = CASE["height"] // 8, CASE["width"] // 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, steps in [(int(x), int(s)) for x in a.seeds.split(",") for s in a.steps.split(",")]:
            latents = torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(seed))
            rec = MarginRecorder()
            ref = tomesd_image(pipe, latents, steps, torch.float32, rec)
            ref64 = tomesd_image(pipe, latents, steps, torch.float64)
            ours = tomeserve_image(a.bin / "tomeserve-gen", a.model, latents, steps, tmp)
            row = {"seed": seed, "steps": steps, "tomeserve_vs_tomesd": diff(ours, ref), "tomesd64_vs_tomesd": diff(ref64, ref),
                   "min_select_margin": min(rec.select), "min_route_margin": min(rec.route),
                   "matcher_calls": len(rec.route)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    pipe.to(dtype=torch.float32)
    if a.json:
        a.json.write_text(json.dumps({"case": CASE, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
