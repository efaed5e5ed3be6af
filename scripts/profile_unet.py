#!/usr/bin/env python3
"""Where a UNet call's host time goes, tomeserve next to diffusers, per torch operator.

    profile_unet.py --model DIR [--size 256] [--batch 1] [--threads 2] [--reps 3] [--warmup 1]
                    [--device cpu] [--dtype fp32] [--tome-ratio R] [--bin build/bin] [--top 25]

Both sides run one UNet call on [2B, 4, S/8, S/8] (classifier-free guidance) with random inputs, in one process
each, same thread count, under torch's profiler (CPU activity): diffusers' UNet2DConditionModel through
torch.profiler, tomeserve through `tomeserve-bench --mode unet --profile`. Prints, per operator, the self time
(time in the operator itself, not in operators it called) per call of the UNet for each side and their
difference, largest differences first, then the totals. With --tome-ratio R both sides merge tokens (tomesd's
apply_patch with its defaults, tomeserve-bench --tome-ratio) and a last line gives Token Merging's own share of
the call: the time inside tome::plan (partition and matching), tome::merge and tome::unmerge, which tomeserve
marks in tome/merge.cpp and this script marks around tomesd's bipartite_soft_matching_random2d and the merge and
unmerge functions it returns. A diagnostic for docs/benchmarks.md, never a test: the
machines are noisy, so read the big differences, not the small ones.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def mark_tomesd():
    """Wraps tomesd's matching and the merge/unmerge closures it returns in profiler scopes named as ours."""
    import tomesd.merge
    from torch.profiler import record_function

    match = tomesd.merge.bipartite_soft_matching_random2d

    def marked(*a, **kw):
        with record_function("tome::plan"):
            m, u = match(*a, **kw)

        def merge(*x, **kx):
            with record_function("tome::merge"):
                return m(*x, **kx)

        def unmerge(*x, **kx):
            with record_function("tome::unmerge"):
                return u(*x, **kx)
        return merge, unmerge

    tomesd.merge.bipartite_soft_matching_random2d = marked


def profile_diffusers(args):
    import torch
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    unet = UNet2DConditionModel.from_pretrained(str(Path(args.model) / "unet"), torch_dtype=dtype).to(args.device)
    unet.eval()
    if args.tome_ratio > 0:
        import tomesd
        mark_tomesd()
        tomesd.apply_patch(unet, ratio=args.tome_ratio)
    rows, latent = 2 * args.batch, args.size // 8
    g = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(rows, 4, latent, latent, generator=g).to(args.device, dtype)
    ctx = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g).to(args.device, dtype)
    with torch.inference_mode():
        for _ in range(args.warmup):
            unet(sample, 500, encoder_hidden_states=ctx)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.reps):
                unet(sample, 500, encoder_hidden_states=ctx)
    return {e.key: (e.self_cpu_time_total * 1e-6, e.cpu_time_total * 1e-6, e.count) for e in prof.key_averages()}


def profile_tomeserve(args):
    cmd = [str(Path(args.bin) / "tomeserve-bench"), "--model", args.model, "--device", args.device, "--dtype",
           args.dtype, "--threads", str(args.threads), "--profile", "--mode", "unet", "--width", str(args.size),
           "--height", str(args.size), "--batch", str(args.batch), "--reps", str(args.reps), "--warmup",
           str(args.warmup), "--tome-ratio", str(args.tome_ratio)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "KINETO_LOG_LEVEL": "5"})
    for line in out.stdout.splitlines():
        if line.startswith('{"profile"'):
            return {k: tuple(v) for k, v in json.loads(line)["profile"].items()}
    raise SystemExit(f"profile_unet: no profile line from {' '.join(cmd)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers SD 1.x folder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--tome-ratio", type=float, default=0.0)
    p.add_argument("--bin", default="build/bin")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if args.size % 8 or args.size <= 0 or args.reps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--size must be a positive multiple of 8; --reps >= 1, --warmup >= 0, --threads >= 1")

    ours = profile_tomeserve(args)
    theirs = profile_diffusers(args)
    per_call = 1e3 / args.reps  # milliseconds per UNet call
    names = set(ours) | set(theirs)
    rows = []
    for name in names:
        a = ours.get(name, (0.0, 0.0, 0))
        b = theirs.get(name, (0.0, 0.0, 0))
        rows.append((name, a[0] * per_call, b[0] * per_call, a[2] // args.reps, b[2] // args.reps))
    rows.sort(key=lambda r: -abs(r[1] - r[2]))
    print(f"UNet {args.size}x{args.size}, batch {args.batch} with CFG ({2 * args.batch} rows), {args.device} "
          f"{args.dtype}, {args.threads} threads; self ms per UNet call, {args.reps} calls profiled")
    print(f"{'operator':48s} {'tomeserve':>10s} {'diffusers':>10s} {'diff':>9s} {'calls':>11s}")
    for name, a, b, ca, cb in rows[:args.top]:
        print(f"{name[:48]:48s} {a:10.2f} {b:10.2f} {a - b:+9.2f} {ca:5d}/{cb:<5d}")
    total_a = sum(r[1] for r in rows)
    total_b = sum(r[2] for r in rows)
    print(f"{'all operators (self, summed)':48s} {total_a:10.2f} {total_b:10.2f} {total_a - total_b:+9.2f}")
    if args.tome_ratio > 0:
        scopes = ("tome::plan", "tome::merge", "tome::unmerge")
        share = []
        for side, total in ((ours, total_a), (theirs, total_b)):
            parts = [side.get(s, (0.0, 0.0, 0))[1] * per_call for s in scopes]
            share.append((sum(parts), parts, sum(parts) / total if total else 0.0))
        for label, (ms, parts, frac) in zip(("tomeserve", "diffusers+tomesd"), share):
            print(f"Token Merging's own work, {label}: {ms:.2f} ms per call ({frac:.1%} of the call; plan "
                  f"{parts[0]:.2f}, merge {parts[1]:.2f}, unmerge {parts[2]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
