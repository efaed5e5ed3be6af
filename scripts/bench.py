#!/usr/bin/env python3
"""Side-by-side benchmark: tomeserve (C++, tomeserve-bench) vs diffusers (Python), same machine, same inputs,
same thread count, one run. Writes a markdown table into docs/benchmarks.md between markers for --section.

    bench.py --model DIR --label tiny [--sizes 256,512] [--modes unet,generate,merge] [--batch 1] [--steps 4]
             [--tome-ratios 0,0.3,0.5,0.6] [--reps 3] [--warmup 1] [--threads N] [--device cpu|cuda]
             [--dtype fp32|fp16|bf16] [--section NAME] [--doc docs/benchmarks.md] [--bin build/bin]
             [--tome-max-downsample N] [--sequential]

unet: one UNet forward at batch 2*B (classifier-free guidance). generate: text encoding + --steps denoising steps
+ VAE decode for B prompts (diffusers with output_type="np"; tomeserve to RGB8 tensors; PNG encoding excluded
on both sides). merge: Token Merging's own work on the first transformer block's input [2B, H/8*W/8, C]:
partition + similarity + matching, then merge and unmerge (tomesd's bipartite_soft_matching_random2d and its
merge/unmerge closures vs tomeserve's MergePlan). With --tome-ratios, every mode runs at each ratio, the Python
side patched by tomesd.apply_patch(ratio=R, max_downsample=M) (tomesd's defaults otherwise, as tomeserve's),
M = --tome-max-downsample or else the model's finest level with attention (1 on SD 1.x, 2 on SDXL: tomeserve's
default), the same on both sides; `--tome-max-downsample 1` on SDXL is tomesd's own default, which merges nothing
there. SDXL folders (model_index.json) run StableDiffusionXLPipeline (no watermark) and the UNet with its added
conditions. Configurations alternate C++ and Python so that machine noise hits both; --sequential runs every C++
configuration first and ends its process before Python loads the model (for models that do not fit in memory
twice: the sdxl preset on a 24 GiB CPU machine). Reports medians; ratio = tomeserve / diffusers (below 1: tomeserve
is faster).
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def is_sdxl(model):
    return json.loads((Path(model) / "model_index.json").read_text()).get("_class_name") == "StableDiffusionXLPipeline"


def finest_attention_downsample(model):
    """The smallest tomesd max_downsample that patches a block: 2**(first level with transformer blocks)."""
    config = json.loads((Path(model) / "unet" / "config.json").read_text())
    down, up = config["down_block_types"], config["up_block_types"]
    levels = [i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    levels += [len(up) - 1 - i for i, t in enumerate(up) if t.startswith("CrossAttn")]
    return 2 ** min(levels + [len(down) - 1])


def max_downsample(args):
    return args.tome_max_downsample or finest_attention_downsample(args.model)


def time_python(args, mode, size, tome_ratio=0.0):
    import torch
    import tomesd
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    key = (args.model, args.device, args.dtype)
    xl = is_sdxl(args.model)
    if time_python.cache.get("key") != key:
        if xl:
            pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                           requires_safety_checker=False, torch_dtype=dtype)
        pipe = pipe.to(args.device)
        pipe.set_progress_bar_config(disable=True)
        time_python.cache = {"key": key, "pipe": pipe}
    pipe = time_python.cache["pipe"]
    times = []
    tomesd.remove_patch(pipe)
    if tome_ratio > 0:
        tomesd.apply_patch(pipe, ratio=tome_ratio, max_downsample=max_downsample(args))
    with torch.inference_mode():
        rows = 2 * args.batch
        g = torch.Generator("cpu").manual_seed(0)
        sample = torch.randn(rows, 4, size // 8, size // 8, generator=g).to(args.device, dtype)
        width = pipe.text_encoder.config.hidden_size + (pipe.text_encoder_2.config.hidden_size if xl else 0)
        ctx = torch.randn(rows, 77, width, generator=g).to(args.device, dtype)
        added = None
        if xl:  # SDXL's added conditions: a pooled embedding and the size ids
            added = {"text_embeds": torch.randn(rows, pipe.text_encoder_2.config.projection_dim,
                                                generator=g).to(args.device, dtype),
                     "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows).to(args.device, dtype)}
        tokens, channels = (size // 8) ** 2, pipe.unet.config.block_out_channels[0]
        block_input = torch.randn(rows, tokens, channels, generator=g).to(args.device, dtype)
        merge_gen = torch.Generator(args.device).manual_seed(0)
        for i in range(args.warmup + args.reps):
            sync(args.device)
            t0 = time.perf_counter()
            if mode == "merge":
                if tome_ratio > 0:
                    m, u = tomesd.merge.bipartite_soft_matching_random2d(
                        block_input, size // 8, size // 8, 2, 2, int(tokens * tome_ratio), no_rand=False,
                        generator=merge_gen)
                    u(m(block_input))
            elif mode == "unet":
                pipe.unet(sample, 500, encoder_hidden_states=ctx, added_cond_kwargs=added)
            else:
                pipe(["a photo of an astronaut riding a horse on mars"] * args.batch, height=size, width=size,
                     num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                     generator=[torch.Generator("cpu").manual_seed(b) for b in range(args.batch)])
            sync(args.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), times


time_python.cache = {}


class CppSession:
    """One tomeserve-bench --stdin process per (variant): the model is loaded once, configurations go one per line."""

    def __init__(self, args, variant):
        flags = [] if variant == "plain" else ["--" + v for v in variant.split("+")]
        cmd = [str(Path(args.bin) / "tomeserve-bench"), "--model", args.model, "--device", args.device, "--dtype",
               args.dtype, "--threads", str(args.threads), "--stdin", *flags]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run_config(self, mode, size, batch, steps, warmup, reps, tome_ratio, tome_max_downsample=0):
        """tomeserve-bench's JSON for one configuration: median_s, times_s, peak_device_bytes; or error (+ oom)."""
        line = (f"--mode {mode} --width {size} --height {size} --batch {batch} --steps {steps} "
                f"--warmup {warmup} --reps {reps} --tome-ratio {tome_ratio} "
                f"--tome-max-downsample {tome_max_downsample}\n")
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            sys.exit(f"tomeserve-bench exited with status {self.proc.wait()}")
        return json.loads(reply)

    def run(self, args, mode, size, tome_ratio):
        out = self.run_config(mode, size, args.batch, args.steps, args.warmup, args.reps, tome_ratio,
                              max_downsample(args))
        if "error" in out:
            print(f"tomeserve-bench: {mode} {size} ratio {tome_ratio}: {out['error']}", file=sys.stderr)
            return None, []
        return out["median_s"], out["times_s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def fmt(value, digits=4):
    """A table cell: the value, or "failed" where tomeserve-bench reported an error (out of memory, say)."""
    return "failed" if value is None else f"{value:.{digits}f}"


def write_section(doc, section, text):
    doc = Path(doc)
    body = doc.read_text() if doc.exists() else "# Benchmarks\n"
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body:
        body = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    doc.write_text(body)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--modes", default="unet,generate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tome-ratios", default=None, help="comma-separated ToMe ratios (default: no ToMe)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--section", default=None)
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--bin", default=str(REPO / "build" / "bin"))
    p.add_argument("--cpp-variants", default="plain",
                   help="comma-separated tomeserve-bench variants, each a column: plain, channels-last, "
                        "cudnn-benchmark, or several joined by '+' (default: plain)")
    p.add_argument("--tome-max-downsample", type=int, default=0, choices=[0, 1, 2, 4, 8],
                   help="tomesd max_downsample on both sides (default 0: the model's finest level with attention)")
    p.add_argument("--sequential", action="store_true",
                   help="every C++ configuration first, then Python (one model in memory at a time)")
    args = p.parse_args()

    import torch
    import diffusers

    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.tome_ratios.split(",")] if args.tome_ratios else [0.0]
    variants = args.cpp_variants.split(",")
    sessions = {v: CppSession(args, v) for v in variants}
    configs = [(mode, size, ratio) for mode in args.modes.split(",") for size in [int(s) for s in args.sizes.split(",")]
               for ratio in ratios if not (mode == "merge" and ratio <= 0)]  # merge at ratio 0: nothing to time
    cpp_first = {}
    if args.sequential:
        cpp_first = {c: {v: sessions[v].run(args, *c) for v in variants} for c in configs}
        for session in sessions.values():
            session.close()
    rows = []
    for mode, size, ratio in configs:
        cpps = cpp_first.get((mode, size, ratio)) or {v: sessions[v].run(args, mode, size, ratio)
                                                      for v in variants}
        py, py_all = time_python(args, mode, size, ratio)
        cpp = cpps[variants[0]][0]
        rows.append((mode, size, ratio, cpp, py, cpp / py if cpp else None,
                     [cpps[v][0] for v in variants[1:]]))
        extra = "".join(f" {v} {fmt(cpps[v][0])}s" for v in variants[1:])
        print(f"{args.label} {mode} {size} ratio {ratio}: tomeserve {fmt(cpp)}s diffusers {py:.4f}s "
              f"ratio {fmt(cpp / py if cpp else None, 2)}{extra} (tomeserve {cpps[variants[0]][1]}, "
              f"diffusers {['%.4f' % t for t in py_all]})", flush=True)
    if not args.sequential:
        for session in sessions.values():
            session.close()

    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, driver via torch {torch.__version__} (CUDA {torch.version.cuda})"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    import tomesd  # noqa: F401  (its version is pinned in requirements.txt)

    lines = [
        f"**{args.label}** — {machine}; {args.device} {args.dtype}; batch {args.batch} with CFG; "
        f"generate = {args.steps} steps; median of {args.reps} after {args.warmup} warm-up; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}"
        f"{f', tomesd 0.1.3 (max_downsample {max_downsample(args)} on both sides)' if args.tome_ratios else ''}"
        f"{'; C++ configurations first, then Python (--sequential)' if args.sequential else ''}"
        f"; {time.strftime('%Y-%m-%d')}",
        "",
    ]
    extra_head = "".join(f" tomeserve {v} (s) |" for v in variants[1:])
    extra_rule = " --- |" * (len(variants) - 1)
    if len(variants) > 1:
        lines[0] += f"; tomeserve variants: {', '.join(variants[1:])} (tomeserve-bench switches)"
    if args.tome_ratios:
        base = {(m, sz): (c, p) for m, sz, r, c, p, _, _ in rows if r == 0}
        lines += ["| mode | size | ToMe ratio | tomeserve (s) | diffusers+tomesd (s) | tomeserve / diffusers "
                  "| tomeserve speed-up vs ratio 0 | diffusers speed-up vs ratio 0 |" + extra_head,
                  "| --- | --- | --- | --- | --- | --- | --- | --- |" + extra_rule]
        for mode, size, ratio, cpp, py, rel, more in rows:
            c0, p0 = base.get((mode, size), (None, None))
            up = (f"{c0 / cpp:.2f}x | {p0 / py:.2f}x" if c0 and cpp else "– | –")
            cells = "".join(f" {fmt(m)} |" for m in more)
            lines.append(f"| {mode} | {size}x{size} | {ratio:g} | {fmt(cpp)} | {py:.4f} | {fmt(rel, 2)} | {up} |"
                         + cells)
    else:
        lines += ["| mode | size | tomeserve (s) | diffusers (s) | tomeserve / diffusers |" + extra_head,
                  "| --- | --- | --- | --- | --- |" + extra_rule]
        for mode, size, ratio, cpp, py, rel, more in rows:
            cells = "".join(f" {fmt(m)} |" for m in more)
            lines.append(f"| {mode} | {size}x{size} | {fmt(cpp)} | {py:.4f} | {fmt(rel, 2)} |" + cells)
    text = "\n".join(lines)
    print(text)
    if args.section:
        write_section(args.doc, args.section, text)


if __name__ == "__main__":
    main()
