#!/usr/bin/env python3
"""Benchmark report of the batching policy (issue 20) from tomeserve-sim, and the simulator's honesty against a
real server: writes the tables between <!-- bench:NAME --> markers in docs/benchmarks.md and a plot. A
benchmark, not a test (it asserts nothing).

    sim_report.py [--sim build/bin/tomeserve-sim] [--calls 200] [--seed 7] [--real-dir DIR]
                  [--cpu-profile FILE] [--cpu-trace FILE] [--doc docs/benchmarks.md] [--plot docs/sim_policy.png]

1. GPU projection: a scripts/make_trace.py gpu-sd15 trace (512/768/1024², 20-50 steps, 1-4 images, a third with
   max_ratio 0.6 and slo_x 2-4) on the built-in h200-sd15-fp16 profile, request vs step batching at several
   loads, with and without --slo; the issue's goal checks.
2. Honesty (when --real-dir holds scripts/load_open.py --trace --json outputs real-noslo.json / real-slo.json and
   --cpu-profile a `tomeserve-sim calibrate` profile of the same machine): the real server's p50/p95 next to the
   simulator's on the same trace and the same arrivals (--arrival-scale), and the error.
3. Capacity planning on the H200 profile: the fewest GPUs (one worker each) whose p95 stays within a bound at a
   given request rate, by ratio setting (every call at ratio 0, at 0.5, or the controller with range 0-0.6 and
   targets of 3x the unloaded latency).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import write_section  # noqa: E402
from make_trace import build as build_trace  # noqa: E402


def run_sim(sim, trace, profile, *flags):
    out = subprocess.run([sim, "--trace", trace, "--profile", profile, *map(str, flags)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def write_trace(calls, path):
    Path(path).write_text("".join(json.dumps(c) + "\n" for c in calls))
    return path


def f2(x):
    return "—" if x is None else f"{x:.2f}"


def pct(x):
    return "—" if x is None else f"{100 * x:.0f}%"


def gpu_projection(args, tmp):
    trace = write_trace(build_trace("gpu-sd15", args.calls, args.seed, 1 / 3), tmp / "gpu.jsonl")
    rows = []
    for load in (0.5, 0.8, 1.0, 1.2, 1.5):
        for slo in (False, True):
            for mode in ("request", "step"):
                flags = ["--load", load, "--batching", mode] + (["--slo"] if slo else [])
                rows.append(dict(run_sim(args.sim, trace, "h200-sd15-fp16", *flags), slo=slo))
    by = {(r["batching"], r["load"], r["slo"]): r for r in rows}
    lines = [f"**Batching policy on the H200 profile (tomeserve-sim)** — trace: scripts/make_trace.py --preset "
             f"gpu-sd15 --calls {args.calls} --seed {args.seed} (512² 50%, 768² 30%, 1024² 20%; 20-50 steps; 1-4 "
             "images; all six schedulers; guidance 7.5/5/1; ratios 0/0.3/0.5; a third with max_ratio 0.6 and "
             "slo_x 2-4); profile h200-sd15-fp16 (docs/benchmarks.md run 1, 29 ms served overhead per step); one "
             "worker; --max-batch-size 8, --max-running-batches 2. Load = offered rate × mean unloaded latency "
             f"({f2(rows[0]['mean_solo_s'])} s). Slowdown = latency / the call's own unloaded latency.", "",
             "| load | targets | mode | p50 / p95 / p99 (s) | p95 slowdown | throughput (req/s) | SLO attainment "
             "| mean ratio | rows per UNet call |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['load']:g} | {'yes' if r['slo'] else 'no'} | {r['batching']} | {f2(r['p50_s'])} / "
                     f"{f2(r['p95_s'])} / {f2(r['p99_s'])} | {f2(r['p95_slowdown'])} | {r['throughput_rps']:.3f} | "
                     f"{pct(r['slo_attainment'])} | {f2(r['mean_ratio'])} | {r['mean_rows_per_call']:.2f} |")
    s08, r08 = by[("step", 0.8, False)], by[("request", 0.8, False)]
    a12 = by[("step", 1.2, True)]
    lines += ["", "Goal checks (issue 20):", "",
              f"- load 0.8: step p95 / request p95 = {s08['p95_s']:.2f} / {r08['p95_s']:.2f} = "
              f"{s08['p95_s'] / r08['p95_s']:.2f} (goal ≤ 0.6: {'met' if s08['p95_s'] <= 0.6 * r08['p95_s'] else 'missed'})",
              f"- load 1.2 with targets: step attainment {pct(a12['slo_attainment'])} (request "
              f"{pct(by[('request', 1.2, True)]['slo_attainment'])}; goal ≥ 95%: "
              f"{'met' if a12['slo_attainment'] >= 0.95 else 'missed'})"]
    return "\n".join(lines), rows


def honesty(args):
    real_dir = Path(args.real_dir)
    lines = ["**Simulator vs the real server (CPU, tiny model)** — the same trace and the same arrivals: "
             f"scripts/load_open.py --trace {args.cpu_trace} --load 0.8 on build/bin/tomeserve (--devices cpu, "
             "OMP_NUM_THREADS=1), and tomeserve-sim --arrival-scale (the real run's) on the profile `tomeserve-sim "
             f"calibrate` measured on this machine ({args.cpu_profile}).", "",
             "| targets | mode | real p50 / p95 (s) | sim p50 / p95 (s) | p50 error | p95 error | real / sim SLO "
             "attainment |", "| --- | --- | --- | --- | --- | --- | --- |"]
    out = []
    for tag in ("noslo", "slo"):
        path = real_dir / f"real-{tag}.json"
        if not path.exists():
            continue
        real = json.loads(path.read_text())
        for mode, data in real["modes"].items():
            r = data["summary"]
            flags = ["--arrival-scale", real["arrival_scale_s"], "--batching", mode] + (["--slo"] if tag == "slo" else [])
            s = run_sim(args.sim, args.cpu_trace, args.cpu_profile, *flags)
            e50, e95 = s["p50_s"] / r["p50_s"] - 1, s["p95_s"] / r["p95_s"] - 1
            out.append({"tag": tag, "mode": mode, "real": r, "sim": s})
            lines.append(f"| {'yes' if tag == 'slo' else 'no'} | {mode} | {f2(r['p50_s'])} / {f2(r['p95_s'])} | "
                         f"{f2(s['p50_s'])} / {f2(s['p95_s'])} | {100 * e50:+.0f}% | {100 * e95:+.0f}% | "
                         f"{pct(r['slo_attainment'])} / {pct(s['slo_attainment'])} |")
    by = {(o["tag"], o["mode"]): o["real"] for o in out}
    if ("slo", "step") in by and ("slo", "request") in by:
        st, rq = by[("slo", "step")], by[("slo", "request")]
        lines += ["", "Goal check (issue 20, real server, load 0.8 with targets, one run): step attainment "
                  f"{pct(st['slo_attainment'])} (goal ≥ 90%: {'met' if st['slo_attainment'] >= 0.9 else 'missed'}); "
                  f"step p95 / request p95 = {st['p95_s']:.2f} / {rq['p95_s']:.2f} = {st['p95_s'] / rq['p95_s']:.2f} "
                  f"(goal ≤ 1.1: {'met' if st['p95_s'] <= 1.1 * rq['p95_s'] else 'missed'})."]
    return "\n".join(lines), out


def capacity(args, tmp):
    base = build_trace("gpu-sd15", args.calls, args.seed, 0.0)
    settings = {"ratio 0": [dict(c, ratio=0.0) for c in base],
                "ratio 0.5": [dict(c, ratio=0.5) for c in base],
                "controller 0-0.6, targets 3x": [dict(c, ratio=0.0, max_ratio=0.6, slo_x=3.0) for c in base]}
    rates = (0.5, 1.0, 2.0, 4.0)
    bound = args.p95_bound
    lines = [f"**Capacity planning, H200 profile (tomeserve-sim)**: the fewest H200s (one worker each, step "
             f"batching) whose p95 end-to-end latency stays ≤ {bound:g} s at a request rate, for the gpu-sd15 trace "
             f"mix ({args.calls} calls, Poisson arrivals), by ToMe setting. Request-level batching in brackets.", "",
             "| setting | " + " | ".join(f"{r:g} req/s" for r in rates) + " |", "| --- |" + " --- |" * len(rates)]
    for name, calls in settings.items():
        trace = write_trace(calls, tmp / f"cap-{name.split()[0]}-{len(name)}.jsonl")
        cells = []
        for rate in rates:
            found = {}
            for mode in ("step", "request"):
                for gpus in range(1, 17):
                    devices = ",".join(f"cuda:{i}" for i in range(gpus))
                    flags = ["--arrival-scale", 1 / rate, "--devices", devices, "--batching", mode]
                    if "controller" in name:
                        flags.append("--slo")
                    r = run_sim(args.sim, trace, "h200-sd15-fp16", *flags)
                    if r["p95_s"] is not None and r["p95_s"] <= bound:
                        found[mode] = gpus
                        break
            cells.append(f"{found.get('step', '>16')} ({found.get('request', '>16')})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(gpu_rows, honest, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, color in (("request", "tab:red"), ("step", "tab:blue")):
        for slo, style in ((False, "o-"), (True, "s--")):
            pts = [(r["load"], r["p95_s"]) for r in gpu_rows if r["batching"] == mode and r["slo"] == slo]
            x, y = zip(*pts)
            a.plot(x, y, style, color=color, label=f"{mode}{' + targets' if slo else ''}")
    a.set_yscale("log")
    a.set_xlabel("offered load (× one-at-a-time capacity)")
    a.set_ylabel("p95 end-to-end latency (s)")
    a.set_title("H200 profile, gpu-sd15 trace (tomeserve-sim)")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    if honest:
        labels = [f"{o['mode']}\n{'targets' if o['tag'] == 'slo' else 'none'}" for o in honest]
        x = range(len(honest))
        for k, (q, off) in enumerate((("p50_s", -0.3), ("p95_s", 0.1))):
            b.bar([i + off - 0.0 for i in x], [o["real"][q] for o in honest], 0.2, color="tab:gray",
                  label="real" if k == 0 else None)
            b.bar([i + off + 0.2 for i in x], [o["sim"][q] for o in honest], 0.2, color="tab:green",
                  label="sim" if k == 0 else None)
        b.set_xticks(list(x))
        b.set_xticklabels(labels, fontsize=8)
        b.set_ylabel("seconds (left pair p50, right pair p95)")
        b.set_title("CPU: real server vs simulator, same arrivals")
        b.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", default=str(REPO / "build" / "bin" / "tomeserve-sim"))
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--p95-bound", type=float, default=10.0, help="capacity planning: p95 bound in seconds")
    p.add_argument("--real-dir", help="folder with load_open.py --trace --json outputs real-noslo.json, real-slo.json")
    p.add_argument("--cpu-profile", help="the calibrated CPU profile for the honesty table")
    p.add_argument("--cpu-trace", help="the trace the real runs used")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "sim_policy.png"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        gpu_text, gpu_rows = gpu_projection(args, tmp)
        write_section(args.doc, "sim-h200-policy", gpu_text)
        honest = []
        if args.real_dir and args.cpu_profile and args.cpu_trace:
            text, honest = honesty(args)
            write_section(args.doc, "sim-cpu-honesty", text)
        write_section(args.doc, "sim-h200-capacity", capacity(args, tmp))
    plot(gpu_rows, honest, args.plot)
    print(f"wrote sections to {args.doc} and {args.plot}")


if __name__ == "__main__":
    main()
