#!/usr/bin/env python3
"""Writes a seeded open-loop trace for tomeserve-sim and scripts/load_open.py --trace: JSON lines with `t`
(arrival in units of the trace's mean unloaded latency: unit-rate exponential gaps, the first at 0), `width`,
`height`, `steps`, `scheduler`, `guidance`, `num_images`, `ratio`, `seed`, `prompt`, and for about a third of the
calls `max_ratio` and `slo_x` (a latency target as a multiple of the call's own unloaded latency).

    make_trace.py --preset cpu-tiny|gpu-sd15 [--calls 60] [--seed 7] [--slo-fraction 0.33] -o FILE

Presets: cpu-tiny is issue 20's CPU trace (tiny model, 256x256 / 128x128 / 256x192, 6-30 steps, 1-4 images);
gpu-sd15 is a 512-1024 square mixed trace for SD 1.5 (20-50 steps, 1-4 images). Both: every scheduler, guidance
7.5 / 5 / 1, ratios 0 / 0.3 / 0.5, max_ratio 0.6 and slo_x in [2, 4] on the SLO calls.
"""
import argparse
import json
import random
import sys

SCHEDULERS = ["pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]
PRESETS = {
    # (sizes with weights, steps range, images with weights)
    "cpu-tiny": ([((256, 256), 0.5), ((128, 128), 0.3), ((256, 192), 0.2)], (6, 30), [(1, 0.55), (2, 0.25), (4, 0.2)]),
    "gpu-sd15": ([((512, 512), 0.5), ((768, 768), 0.3), ((1024, 1024), 0.2)], (20, 50), [(1, 0.55), (2, 0.25), (4, 0.2)]),
}
SUBJECTS = ["a lighthouse", "a red fox", "an old library", "a mountain lake", "a city street", "a sailing ship"]


def build(preset, calls, seed, slo_fraction):
    sizes, (lo, hi), images = PRESETS[preset]
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(calls):
        w, h = rng.choices([s for s, _ in sizes], weights=[p for _, p in sizes])[0]
        call = {"t": round(t, 6), "width": w, "height": h, "steps": rng.randint(lo, hi),
                "scheduler": rng.choice(SCHEDULERS), "guidance": rng.choice([7.5, 7.5, 5.0, 1.0]),
                "num_images": rng.choices([n for n, _ in images], weights=[p for _, p in images])[0],
                "ratio": rng.choice([0.0, 0.3, 0.5]), "seed": rng.randrange(2 ** 32),
                "prompt": f"{rng.choice(SUBJECTS)}, #{i}"}
        if rng.random() < slo_fraction:
            call["max_ratio"] = 0.6
            call["slo_x"] = round(rng.uniform(2.0, 4.0), 3)
        out.append(call)
        t += rng.expovariate(1.0)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--slo-fraction", type=float, default=1 / 3)
    p.add_argument("-o", "--out", required=True, help="output file ('-': stdout)")
    a = p.parse_args()
    if a.calls < 1:
        p.error("--calls must be >= 1")
    lines = "".join(json.dumps(c) + "\n" for c in build(a.preset, a.calls, a.seed, a.slo_fraction))
    if a.out == "-":
        sys.stdout.write(lines)
    else:
        with open(a.out, "w") as f:
            f.write(lines)


if __name__ == "__main__":
    main()
