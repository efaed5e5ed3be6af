#!/usr/bin/env python3
"""The seed's table: `generate` (text encoding + N denoising steps with guidance 7.5 + VAE decode) over sizes x
batch sizes x ToMe ratios, tomeserve and diffusers (+ tomesd) side by side in one run, same machine, same inputs.
Per cell: seconds per batch (median), seconds per image, it/s (steps per second of the batch, as diffusers'
progress bar counts), peak device memory on CUDA, and "OOM" where a side runs out of memory.

    bench_table.py --model DIR [--sizes 512,768,1024] [--batches 1,2,4,8,10] [--ratios 0,0.5] [--steps 25]
                   [--device cuda|cpu] [--dtype fp16] [--reps 2] [--warmup 1] [--threads N] [--bin build/bin]
                   [--csv FILE] [--plot FILE.png] [--doc docs/benchmarks.md --section NAME] [--label TEXT]

tomeserve runs in one `tomeserve-bench --stdin` process (the model loaded once); diffusers loads the pipeline
once and applies tomesd.apply_patch(ratio=R) per ratio. On a CPU use a reduced grid, e.g. the tiny preset with
--sizes 128,192 --batches 1,2 --steps 4 --dtype fp32. Measured, never asserted.
"""
import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, CppSession, fmt, sync, write_section  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"


def time_diffusers(pipe, args, size, batch, ratio):
    """(median seconds, peak bytes or None) for one cell, or (None, None) when it runs out of memory."""
    import torch
    import tomesd

    tomesd.remove_patch(pipe)
    if ratio > 0:
        tomesd.apply_patch(pipe, ratio=ratio)
    cuda = args.device.startswith("cuda")
    times = []
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.reps):
            sync(args.device)
            t0 = time.perf_counter()
            pipe([PROMPT] * batch, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
                 output_type="np", generator=[torch.Generator("cpu").manual_seed(b) for b in range(batch)])
            sync(args.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        if cuda:
            torch.cuda.empty_cache()
        return None, None
    return statistics.median(times), (torch.cuda.max_memory_allocated() if cuda else None)


def mib(value):
    return "–" if value is None or value < 0 else f"{value / 2**20:.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--label", default="sd15")
    p.add_argument("--sizes", default="512,768,1024")
    p.add_argument("--batches", default="1,2,4,8,10")
    p.add_argument("--ratios", default="0,0.5")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--bin", default=str(REPO / "build" / "bin"))
    p.add_argument("--csv")
    p.add_argument("--plot")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--section")
    args = p.parse_args()

    import torch
    import diffusers
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    session = CppSession(args, "plain")

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            for ratio in [float(r) for r in args.ratios.split(",")]:
                out = session.run_config("generate", size, batch, args.steps, args.warmup, args.reps, ratio)
                if "error" in out and not out.get("oom"):
                    sys.exit(f"tomeserve-bench failed at {size} batch {batch} ratio {ratio}: {out['error']}")
                cpp = None if "error" in out else out["median_s"]
                cpp_peak = None if "error" in out else out.get("peak_device_bytes")
                py, py_peak = time_diffusers(pipe, args, size, batch, ratio)
                row = {"size": size, "batch": batch, "ratio": ratio, "tomeserve_s": cpp, "diffusers_s": py,
                       "tomeserve_peak_bytes": cpp_peak, "diffusers_peak_bytes": py_peak}
                rows.append(row)
                print(f"{size} batch {batch} ratio {ratio:g}: tomeserve {fmt(cpp)} s, diffusers {fmt(py)} s", flush=True)
    session.close()

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    def cell(seconds, batch):
        return ("OOM", "OOM", "OOM") if seconds is None else (
            f"{seconds:.3f}", f"{seconds / batch:.3f}", f"{args.steps / seconds:.1f}")

    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    lines = [f"**{args.label}** — {machine}; {args.device} {args.dtype}; generate = {args.steps} steps, guidance "
             f"7.5; median of {args.reps} after {args.warmup} warm-up; diffusers {diffusers.__version__}, tomesd "
             f"0.1.3; {time.strftime('%Y-%m-%d')}", "",
             "| size | batch | ToMe | tomeserve s/batch | s/image | it/s | peak MiB | diffusers s/batch | s/image | it/s "
             "| peak MiB | tomeserve / diffusers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c, d = cell(r["tomeserve_s"], r["batch"]), cell(r["diffusers_s"], r["batch"])
        rel = fmt(r["tomeserve_s"] / r["diffusers_s"], 2) if r["tomeserve_s"] and r["diffusers_s"] else "–"
        lines.append(f"| {r['size']}² | {r['batch']} | {r['ratio']:g} | {' | '.join(c)} | "
                     f"{mib(r['tomeserve_peak_bytes'])} | {' | '.join(d)} | {mib(r['diffusers_peak_bytes'])} | {rel} |")
    text = "\n".join(lines)
    print(text)
    if args.section:
        write_section(args.doc, args.section, text)
    if args.plot:
        plot(rows, args)


def plot(rows, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for impl, style in (("tomeserve", "-"), ("diffusers", "--")):
            for ratio in sorted({r["ratio"] for r in rows}):
                cells = [r for r in rows if r["size"] == size and r["ratio"] == ratio and r[f"{impl}_s"]]
                ax.plot([r["batch"] for r in cells], [r[f"{impl}_s"] / r["batch"] for r in cells], style,
                        marker="o", label=f"{impl}, ToMe {ratio:g}")
        ax.set_title(f"{size}², {args.steps} steps, {args.dtype}")
        ax.set_xlabel("batch")
        ax.set_ylabel("seconds per image")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
