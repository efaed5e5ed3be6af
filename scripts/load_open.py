#!/usr/bin/env python3
"""Open-loop load benchmark for tomeserve: one seeded trace of mixed requests (sizes, steps, schedulers, guidance,
ToMe ratios) sent with Poisson arrivals at several offered loads, against request-level batching, step-level
batching, and step-level batching with the SLO ratio controller. A benchmark, not a test.

    load_open.py --trace FILE --load X [--slo] [--model DIR] [--modes request,step] [--json FILE] [--devices cpu]
                 [--transport grpc|http] [--server-flags "..."] [--bin build/bin]
    load_open.py --model DIR [--modes request,step,step+slo] [--loads 0.5,1,1.5,2,3] [--requests 40]
                 [--max-seconds 90] [--seed 7] [--threads 1] [--max-batch-size 8] [--max-queue-delay-ms 20]
                 [--slo-target-factor 2.0] [--adaptive-max-ratio 0.75] [--calibration 6] [--call-timeout 300]
                 [--doc docs/benchmarks.md] [--section NAME] [--plot docs/load_open.png] [--json FILE]
                 [--bin build/bin]

With --trace (the form tomeserve-sim shares; scripts/make_trace.py writes one): the trace's JSON lines are
played with the simulator's meaning of X. Every trace call is first run alone on an idle --batching step server
(after one warm-up call per size): its unloaded latency. mean_solo_s = their mean; arrival seconds = t x
mean_solo_s / X (--arrival-scale S instead: t x S). With --slo a call with slo_x sends latency_target_seconds =
slo_x x its own unloaded latency and tome.max_ratio = its max_ratio; otherwise every call runs at its ratio
(--solo-from an earlier --json output reuses its unloaded latencies; --server-flags adds tomeserve flags). Per
mode a fresh server replays the trace open loop and one JSON line is printed with tomeserve-sim's keys (p50_s,
p95_s, p99_s, throughput_rps, completed, refused, slo_attainment, mean_ratio, mean_rows_per_call (null: the
server does not report it), mean_solo_s, arrival_scale_s) plus mode; --json also keeps every call's outcome.
--transport http sends the calls to the HTTP front door (POST /v1/images/generations) with the standard library
only, for machines without grpcio (the GPU image).

Without --trace (the original sweep):
1. Trace: random.Random(--seed) draws --requests requests (mostly 256x256, some 128x128; 10-50 steps; ToMe ratio
   0 / 0.3 / 0.5; DDIM, Euler, Euler a, DPM++ 2M Karras, PNDM; guidance 7.5, sometimes 1.0; distinct prompts and
   seeds) and unit-rate exponential inter-arrival gaps. Every mode and load replays the same trace, its arrival
   times divided by the offered rate.
2. Calibration: a --batching step server runs --calibration trace requests one at a time (after one warm-up call
   per size); per size, seconds ~ a + b * steps is fitted to their end-to-end latencies. That fit gives each trace
   request its unloaded latency estimate; L0 is the mean estimate over the trace and the capacity C = 1 / L0
   requests/s (one request at a time, no batching). Offered rate = load factor * C.
3. Per mode a fresh server on 127.0.0.1 (free port, --devices cpu, OMP_NUM_THREADS=--threads); per load, every
   trace request is sent at its arrival time whether or not earlier calls have returned (grpc.aio), none after
   --max-seconds, each with --call-timeout. Every call's SLO target is --slo-target-factor * its own unloaded
   estimate; step+slo sends it as latency_target_seconds with tome.max_ratio = --adaptive-max-ratio, the
   fixed-ratio modes are scored against the same targets.
4. Per (mode, load): offered and achieved req/s, p50/p95/p99 end-to-end latency, SLO attainment (calls within
   target / calls sent; failed calls miss), mean effective ToMe ratio, errors; the issue's two goal checks; a
   markdown section in --doc between <!-- bench:NAME --> markers, a PNG plot (matplotlib) and optional JSON.
"""
import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests" / "python"))
from load import percentile  # noqa: E402  (nearest-rank percentile, shared with the closed-loop benchmark)


def proto():
    """grpcio stubs (imported only for the gRPC transport: --transport http needs no grpcio)."""
    from tomeserve_server import proto as stubs

    return stubs()


def start_server(*args, **kw):
    from tomeserve_server import start_server as start_grpc

    return start_grpc(*args, **kw)

SIZES = [(256, 0.75), (128, 0.25)]  # (side, probability)
SCHEDULERS = ["DDIM", "EULER", "EULER_ANCESTRAL", "DPMPP_2M_KARRAS", "PNDM"]
RATIOS = [0.0, 0.3, 0.5]
SUBJECTS = ["a lighthouse", "a red fox", "an old library", "a mountain lake", "a city street", "a sailing ship",
            "a bowl of fruit", "a robot", "a forest path", "a desert canyon"]
STYLES = ["at dawn", "in watercolor", "oil painting", "photograph, 35mm", "in the rain", "isometric render"]


def build_trace(seed, n):
    """n request dicts plus `arrival`: cumulative unit-rate exponential gaps (the first at 0)."""
    rng = random.Random(seed)
    trace, t = [], 0.0
    for i in range(n):
        side = rng.choices([s for s, _ in SIZES], weights=[w for _, w in SIZES])[0]
        trace.append({"side": side, "steps": rng.randint(10, 50), "ratio": rng.choice(RATIOS),
                      "scheduler": rng.choice(SCHEDULERS), "guidance": 7.5 if rng.random() < 0.8 else 1.0,
                      "prompt": f"{rng.choice(SUBJECTS)}, {rng.choice(STYLES)}, #{i}",
                      "seed": rng.randrange(2 ** 32), "arrival": t})
        t += rng.expovariate(1.0)
    return trace


def make_request(pb2, item, rid, target=None, max_ratio=None):
    tome = pb2.TokenMerging(ratio=item["ratio"])
    if max_ratio is not None:
        tome.max_ratio = max_ratio
    req = pb2.GenerateRequest(prompt=item["prompt"], width=item["side"], height=item["side"],
                              num_inference_steps=item["steps"], guidance_scale=item["guidance"],
                              seed=item["seed"], scheduler=pb2.Scheduler.Value("SCHEDULER_" + item["scheduler"]),
                              tome=tome, request_id=rid)
    if target is not None:
        req.latency_target_seconds = target
    return req


def start(args, mode):
    """build/bin/tomeserve for `mode` on 127.0.0.1 (free port), SERVING, with OMP_NUM_THREADS=--threads."""
    flags = ["--model", args.model, "--devices", args.devices, "--max-batch-size", str(args.max_batch_size),
             "--max-queue-size", str(max(64, args.requests)),
             "--batching", "request" if mode == "request" else "step"]
    if mode == "request":
        flags += ["--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    if mode == "step+slo":
        flags += ["--adaptive-tome-max-ratio", str(args.adaptive_max_ratio)]
    flags += getattr(args, "server_flags", "").split()
    return start_server(flags, env={"OMP_NUM_THREADS": str(args.threads)}, startup_timeout=args.start_timeout,
                        binary=Path(args.bin) / "tomeserve")


def channel(address):
    import grpc

    return grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])


async def warm_up(stub, pb2, trace, timeout):
    """One uncounted 4-step call per size, so first-call costs and the server's step-time model are settled."""
    for side in sorted({it["side"] for it in trace}):
        item = dict(trace[0], side=side, steps=4, ratio=0.0)
        await stub.Generate(make_request(pb2, item, f"warm-{side}"), timeout=timeout)


def pick_calibration(trace, n):
    """Per size, trace indices spread evenly over its step range (shortest and longest included)."""
    sides = sorted({it["side"] for it in trace})
    picks = []
    for side in sides:
        idx = sorted((i for i, it in enumerate(trace) if it["side"] == side), key=lambda i: trace[i]["steps"])
        k = min(len(idx), max(2, n // len(sides)))
        picks += sorted({idx[round(j * (len(idx) - 1) / max(1, k - 1))] for j in range(k)})
    return picks


async def calibrate(args, trace):
    """Unloaded latencies of a few trace requests, one at a time, on a --batching step server; fit per size."""
    pb2, pb2_grpc = proto()
    server = start(args, "step")
    try:
        async with channel(server.address) as ch:
            stub = pb2_grpc.ImageGeneratorStub(ch)
            await warm_up(stub, pb2, trace, args.call_timeout)
            runs = []
            for i in pick_calibration(trace, args.calibration):
                t0 = time.perf_counter()
                await stub.Generate(make_request(pb2, trace[i], f"calib-{i}"), timeout=args.call_timeout)
                runs.append({"index": i, "side": trace[i]["side"], "steps": trace[i]["steps"],
                             "seconds": time.perf_counter() - t0})
                print(f"calibration: {json.dumps(runs[-1])}", flush=True)
    finally:
        server.channel.close()
        server.stop()
    fit = {}
    for side in sorted({r["side"] for r in runs}):
        steps = [r["steps"] for r in runs if r["side"] == side]
        secs = [r["seconds"] for r in runs if r["side"] == side]
        if len(set(steps)) > 1:
            import numpy as np

            b, a = np.polyfit(steps, secs, 1)
        else:
            a, b = 0.0, statistics.mean(s / n for s, n in zip(secs, steps))
        fit[side] = (float(a), float(b))
    estimates = [max(1e-3, fit[it["side"]][0] + fit[it["side"]][1] * it["steps"]) for it in trace]
    l0 = statistics.mean(estimates)
    return {"runs": runs, "fit": fit, "estimates": estimates, "L0": l0, "capacity": 1 / l0,
            "measured_mean": statistics.mean(r["seconds"] for r in runs)}


async def run_level(stub, pb2, trace, targets, rate, mode, load, args):
    """Open loop: each trace request at arrival / rate seconds, regardless of outstanding calls."""
    import grpc

    slo = mode == "step+slo"
    t_start = time.perf_counter()

    async def one(i, item):
        at = item["arrival"] / rate
        if at > args.max_seconds:
            return None
        await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
        req = make_request(pb2, item, f"open-{mode}-{load:g}-{i}", targets[i] if slo else None,
                           args.adaptive_max_ratio if slo else None)
        t0 = time.perf_counter()
        try:
            r = await stub.Generate(req, timeout=args.call_timeout)
        except grpc.aio.AioRpcError as e:
            return {"code": e.code().name, "met": False, "end": time.perf_counter()}
        end = time.perf_counter()
        return {"code": "OK", "e2e": end - t0, "end": end, "met": end - t0 <= targets[i], "ratio": r.tome.ratio,
                "batch": r.batch_size, "queue": r.timings.queue_seconds, "slo_set": r.HasField("slo")}

    calls = [c for c in await asyncio.gather(*(one(i, it) for i, it in enumerate(trace))) if c]
    ok = [c for c in calls if c["code"] == "OK"]
    elapsed = max(c["end"] for c in calls) - t_start
    errors = {}
    for c in calls:
        if c["code"] != "OK":
            errors[c["code"]] = errors.get(c["code"], 0) + 1
    lat = [c["e2e"] for c in ok]
    return {"mode": mode, "load": load, "offered_rps": rate, "sent": len(calls), "completed": len(ok),
            "elapsed_s": elapsed, "throughput_rps": len(ok) / elapsed, "errors": errors,
            **{f"p{q}": percentile(lat, q) if lat else None for q in (50, 95, 99)},
            "attainment": sum(c["met"] for c in calls) / len(calls),
            "mean_ratio": statistics.mean(c["ratio"] for c in ok) if ok else None,
            "mean_batch": statistics.mean(c["batch"] for c in ok) if ok else None,
            "queue_p50": percentile([c["queue"] for c in ok], 50) if ok else None,
            "slo_decisions": sum(c["slo_set"] for c in ok)}


async def run_mode(args, mode, trace, calib):
    pb2, pb2_grpc = proto()
    targets = [args.slo_target_factor * e for e in calib["estimates"]]
    server = start(args, mode)
    rows = []
    try:
        async with channel(server.address) as ch:
            stub = pb2_grpc.ImageGeneratorStub(ch)
            await warm_up(stub, pb2, trace, args.call_timeout)
            for load in args.load_factors:
                row = await run_level(stub, pb2, trace, targets, load * calib["capacity"], mode, load, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.channel.close()
        server.stop()
    return rows


async def measure(args, trace):
    """Calibration, then every mode, in one event loop (grpc.aio binds to the loop it first runs on)."""
    calib = await calibrate(args, trace)
    print(f"L0 = {calib['L0']:.3f} s (mean fitted unloaded latency), capacity C = 1/L0 = "
          f"{calib['capacity']:.3f} req/s, fit {calib['fit']}", flush=True)
    rows = []
    for mode in args.mode_list:
        rows += await run_mode(args, mode, trace, calib)
    return calib, rows


def goal_checks(rows, l0):
    """(a) step p95 / request p95 where request p95 first reaches 2 x L0 (goal <= 0.6); (b) step+slo attainment
    at >= 1.3 x the first load where fixed-ratio step attainment drops below 90% (goal >= 95%)."""
    by = {(r["mode"], r["load"]): r for r in rows}
    loads = sorted({r["load"] for r in rows})
    out = []
    req = [x for x in loads if (by.get(("request", x)) or {}).get("p95") is not None
           and by[("request", x)]["p95"] >= 2 * l0]
    if not req:
        out.append(f"(a) not reached: request-level p95 never reached 2 × L0 = {2 * l0:.2f} s at the measured loads")
    elif ("step", req[0]) not in by or by[("step", req[0])]["p95"] is None:
        out.append(f"(a) not reached: no step-level result at load {req[0]:g}")
    else:
        x, rp, sp = req[0], by[("request", req[0])]["p95"], by[("step", req[0])]["p95"]
        out.append(f"(a) at load {x:g} (first where request-level p95 {rp:.2f} s ≥ 2 × L0 = {2 * l0:.2f} s): "
                   f"step p95 / request p95 = {sp:.2f} / {rp:.2f} = {sp / rp:.2f} "
                   f"(goal ≤ 0.6: {'met' if sp / rp <= 0.6 else 'missed'})")
    drop = [x for x in loads if ("step", x) in by and by[("step", x)]["attainment"] < 0.9]
    if not drop:
        out.append("(b) not reached: fixed-ratio step-level attainment stayed ≥ 90% at every measured load")
    else:
        want = 1.3 * drop[0]
        above = [x for x in loads if x >= want - 1e-9 and ("step+slo", x) in by]
        if not above:
            out.append(f"(b) not reached: step attainment drops below 90% at load {drop[0]:g}, "
                       f"but no step+slo level at ≥ 1.3 × that = {want:.2f}")
        else:
            att = by[("step+slo", above[0])]["attainment"]
            out.append(f"(b) step attainment first < 90% at load {drop[0]:g} "
                       f"({100 * by[('step', drop[0])]['attainment']:.0f}%); step+slo attainment at load "
                       f"{above[0]:g} (≥ 1.3 × {drop[0]:g}) = {100 * att:.0f}% "
                       f"(goal ≥ 95%: {'met' if att >= 0.95 else 'missed'})")
    return out


def plot(args, rows, path):
    """p95 (solid) and p50 (dashed) end-to-end latency vs offered load, one colour per mode."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed in this Python: no plot written to {path}", flush=True)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, color in zip(args.mode_list, ["tab:red", "tab:blue", "tab:green"]):
        pts = [(r["offered_rps"], r["p95"], r["p50"]) for r in rows if r["mode"] == mode and r["p95"] is not None]
        if pts:
            x, p95, p50 = zip(*pts)
            ax.plot(x, p95, "o-", color=color, label=f"{mode} p95")
            ax.plot(x, p50, "s--", color=color, alpha=0.7, label=f"{mode} p50")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("tomeserve open-loop latency (tiny model, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def secs(x):
    return "—" if x is None else f"{x:.2f}"


def report(args, trace, calib, rows, goals, plotted):
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    n256 = sum(it["side"] == 256 for it in trace)
    fit = "; ".join(f"{s}x{s}: {a:.3f} + {b:.4f} × steps s" for s, (a, b) in calib["fit"].items())
    lines = [
        f"**{args.label}** — {machine}; model {args.model}; seed {args.seed}; server --devices {args.devices}, "
        f"--max-batch-size {args.max_batch_size}, request mode --max-queue-delay-ms {args.max_queue_delay_ms}, "
        f"step+slo --adaptive-tome-max-ratio {args.adaptive_max_ratio}; client scripts/load_open.py (grpc.aio); "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
        "",
        f"Trace: {len(trace)} requests ({n256} at 256x256, {len(trace) - n256} at 128x128; steps 10-50; ToMe ratio "
        f"0 / 0.3 / 0.5; schedulers {', '.join(SCHEDULERS)}; guidance 7.5 or 1.0), Poisson arrivals; at most "
        f"{args.requests} calls and {args.max_seconds:.0f} s of arrivals per level. The tiny random-weight model "
        "runs at 256x256 and 128x128 rather than its native 64x64 because at 256x256 its first transformer block "
        "holds 32 × 32 = 1024 tokens, so ToMe ratios change its step time as they do on a real model, while a "
        "whole sweep still fits in minutes on a CPU.",
        "",
        f"Capacity: {len(calib['runs'])} trace requests run one at a time on an idle --batching step server "
        f"(mean {calib['measured_mean']:.2f} s); fit {fit}. L0 = mean fitted unloaded latency over the trace = "
        f"{calib['L0']:.2f} s, capacity C = 1 / L0 = {calib['capacity']:.2f} req/s (one request at a time, no "
        f"batching); load = offered rate / C. SLO target per call = {args.slo_target_factor:g} × its own fitted "
        "unloaded latency (guidance and ratio not in the fit); attainment = calls within target / calls sent "
        "(failed calls miss); step+slo sends the target as latency_target_seconds with tome.max_ratio "
        f"{args.adaptive_max_ratio:g}.",
        "",
        "| mode | load | offered (req/s) | sent / done | throughput (req/s) | p50 / p95 / p99 (s) | SLO attainment "
        "| mean ratio | mean batch | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        err = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        ratio = "—" if r["mean_ratio"] is None else f"{r['mean_ratio']:.2f}"
        batch = "—" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        lines.append(f"| {r['mode']} | {r['load']:g} | {r['offered_rps']:.2f} | {r['sent']} / {r['completed']} | "
                     f"{r['throughput_rps']:.2f} | {secs(r['p50'])} / {secs(r['p95'])} / {secs(r['p99'])} | "
                     f"{100 * r['attainment']:.0f}% | {ratio} | {batch} | {err} |")
    lines += ["", "Goal checks:", ""] + [f"- {g}" for g in goals]
    if plotted:
        rel = os.path.relpath(Path(args.plot).resolve(), Path(args.doc).resolve().parent)
        lines += ["", f"![p95 (solid) and p50 (dashed) latency vs offered load]({rel})"]
    return "\n".join(lines)


TRACE_SCHEDULERS = {"pndm": "PNDM", "ddim": "DDIM", "euler": "EULER", "euler_a": "EULER_ANCESTRAL",
                    "dpmpp_2m": "DPMPP_2M", "dpmpp_2m_karras": "DPMPP_2M_KARRAS"}


def read_trace(path):
    """tomeserve-sim's trace: one JSON object per line (t, width, height, steps, scheduler, guidance, num_images,
    ratio, seed, prompt; optional max_ratio, slo_x)."""
    calls = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        c = json.loads(line)
        missing = [k for k in ("t", "width", "height", "steps", "scheduler", "guidance", "num_images", "ratio",
                               "seed", "prompt") if k not in c]
        if missing or c["scheduler"] not in TRACE_SCHEDULERS:
            sys.exit(f"load_open.py: {path}:{n}: missing {missing} or unknown scheduler {c.get('scheduler')!r}")
        calls.append(c)
    if not calls:
        sys.exit(f"load_open.py: {path}: no calls")
    return calls


def trace_request(pb2, c, rid, target=None):
    tome = pb2.TokenMerging(ratio=c["ratio"])
    if target is not None and c.get("max_ratio") is not None:
        tome.max_ratio = c["max_ratio"]
    req = pb2.GenerateRequest(prompt=c["prompt"], width=c["width"], height=c["height"],
                              num_inference_steps=c["steps"], guidance_scale=c["guidance"], seed=c["seed"],
                              num_images=c["num_images"],
                              scheduler=pb2.Scheduler.Value("SCHEDULER_" + TRACE_SCHEDULERS[c["scheduler"]]),
                              tome=tome, request_id=rid)
    if target is not None:
        req.latency_target_seconds = target
    return req


class GrpcTraceClient:
    """Trace calls over gRPC (grpc.aio) to a fresh server of `mode` (start())."""

    def __init__(self, args, mode):
        self.args, self.mode = args, mode

    async def __aenter__(self):
        self.pb2, pb2_grpc = proto()
        self.server = start(self.args, self.mode)
        self.channel = channel(self.server.address)
        self.stub = pb2_grpc.ImageGeneratorStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        self.server.channel.close()
        self.server.stop()

    async def generate(self, c, rid, target=None):
        """{"code": "OK", "ratio", "batch"} or {"code": the status name}."""
        import grpc

        try:
            r = await self.stub.Generate(trace_request(self.pb2, c, rid, target), timeout=self.args.call_timeout)
        except grpc.aio.AioRpcError as e:
            return {"code": e.code().name}
        return {"code": "OK", "ratio": r.tome.ratio, "batch": r.batch_size}


class HttpTraceClient:
    """Trace calls over the HTTP front door (POST /v1/images/generations, stdlib only: for machines without
    grpcio, such as the GPU image) to a fresh server of `mode` started with --http-listen on 127.0.0.1."""

    def __init__(self, args, mode):
        self.args, self.mode = args, mode

    async def __aenter__(self):
        import concurrent.futures
        import subprocess
        import tempfile
        import urllib.request

        a = self.args
        self.tmp = Path(tempfile.mkdtemp(prefix="load_open_"))
        flags = ["--model", a.model, "--devices", a.devices, "--max-batch-size", str(a.max_batch_size),
                 "--max-queue-size", str(max(64, a.requests)),
                 "--batching", "request" if self.mode == "request" else "step",
                 "--listen", "127.0.0.1:0", "--port-file", str(self.tmp / "port"),
                 "--http-listen", "127.0.0.1:0", "--http-port-file", str(self.tmp / "http.port")]
        if self.mode == "request":
            flags += ["--max-queue-delay-ms", str(a.max_queue_delay_ms)]
        flags += a.server_flags.split()
        self.log = open(self.tmp / "server.log", "wb")
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        self.process = subprocess.Popen([str(Path(a.bin) / "tomeserve")] + flags, stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + a.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tomeserve exited with {self.process.returncode}: "
                                   f"{(self.tmp / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise TimeoutError(f"tomeserve not ready after {a.start_timeout} s")
            port_file = self.tmp / "http.port"
            if port_file.exists() and port_file.read_text().strip():
                self.base = f"http://127.0.0.1:{int(port_file.read_text())}"
                try:
                    with urllib.request.urlopen(self.base + "/readyz", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
            await asyncio.sleep(0.2)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(256, a.requests + 4))
        return self

    async def __aexit__(self, *exc):
        import signal

        self.pool.shutdown(wait=False, cancel_futures=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except Exception:  # noqa: BLE001  (a server that does not stop is killed: bounded)
            self.process.kill()
            self.process.wait()
        self.log.close()

    def _post(self, body):
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.base + "/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.args.call_timeout) as r:
                return {"code": "OK", **json.loads(r.read())["tomeserve"]}
        except urllib.error.HTTPError as e:
            return {"code": f"HTTP_{e.code}"}
        except OSError as e:
            return {"code": type(e).__name__}

    async def generate(self, c, rid, target=None):
        tome = {"ratio": c["ratio"]}
        if target is not None and c.get("max_ratio") is not None:
            tome["max_ratio"] = c["max_ratio"]
        body = {"prompt": c["prompt"], "n": c["num_images"], "size": f"{c['width']}x{c['height']}",
                "response_format": "b64_json", "num_inference_steps": c["steps"], "guidance_scale": c["guidance"],
                "seed": c["seed"], "scheduler": c["scheduler"], "tome": tome, "request_id": rid}
        if target is not None:
            body["latency_target_seconds"] = target
        r = await asyncio.get_running_loop().run_in_executor(self.pool, self._post, body)
        if r["code"] != "OK":
            return r
        return {"code": "OK", "ratio": r["tome"]["ratio"], "batch": r["batch_size"]}


def trace_client(args, mode):
    return (HttpTraceClient if args.transport == "http" else GrpcTraceClient)(args, mode)


async def trace_warm_up(client, calls):
    """One uncounted 4-step call per trace size, so first-call costs and the step-time model are settled."""
    for w, h in sorted({(c["width"], c["height"]) for c in calls}):
        warm = dict(calls[0], width=w, height=h, steps=4, ratio=0.0, num_images=1)
        r = await client.generate(warm, f"warm-{w}x{h}")
        if r["code"] != "OK":
            sys.exit(f"load_open.py: the warm-up call at {w}x{h} failed: {r['code']}")


async def trace_solo(args, calls):
    """Each trace call alone on an idle --batching step server, after one warm-up call per size."""
    solo = []
    async with trace_client(args, "step") as client:
        await trace_warm_up(client, calls)
        for i, c in enumerate(calls):
            t0 = time.perf_counter()
            r = await client.generate(c, f"solo-{i}")
            if r["code"] != "OK":
                sys.exit(f"load_open.py: trace call {i} alone failed: {r['code']}")
            solo.append(time.perf_counter() - t0)
    return solo


async def trace_mode(args, mode, calls, solo, scale):
    """The trace open loop against a fresh `mode` server: arrival t x scale seconds."""
    async with trace_client(args, mode) as client:
        await trace_warm_up(client, calls)
        t_start = time.perf_counter()

        async def one(i, c):
            await asyncio.sleep(max(0.0, t_start + c["t"] * scale - time.perf_counter()))
            target = c["slo_x"] * solo[i] if args.slo and c.get("slo_x") is not None else None
            t0 = time.perf_counter()
            r = await client.generate(c, f"{mode}-{i}", target)
            if r["code"] != "OK":
                return {"code": r["code"], "arrival": t0 - t_start, "target": target}
            end = time.perf_counter()
            return {"code": "OK", "arrival": t0 - t_start, "latency": end - t0, "end": end - t_start,
                    "ratio": r["ratio"], "batch": r["batch"], "target": target}

        outcomes = await asyncio.gather(*(one(i, c) for i, c in enumerate(calls)))
    ok = [o for o in outcomes if o["code"] == "OK"]
    lat = sorted(o["latency"] for o in ok)
    slo_calls = [o for o in outcomes if o["target"] is not None]
    makespan = (max(o["end"] for o in ok) - min(o["arrival"] for o in outcomes)) if ok else 0.0
    summary = {"mode": mode, "p50_s": percentile(lat, 50) if lat else None,
               "p95_s": percentile(lat, 95) if lat else None, "p99_s": percentile(lat, 99) if lat else None,
               "throughput_rps": len(ok) / makespan if makespan > 0 else 0.0, "completed": len(ok),
               "refused": len(outcomes) - len(ok),
               "slo_attainment": (sum(o["code"] == "OK" and o["latency"] <= o["target"] for o in slo_calls)
                                  / len(slo_calls)) if args.slo and slo_calls else None,
               "mean_ratio": statistics.mean(o["ratio"] for o in ok) if ok else None, "mean_rows_per_call": None,
               "mean_solo_s": statistics.mean(solo), "arrival_scale_s": scale, "load": args.load,
               "mean_batch_images": statistics.mean(o["batch"] for o in ok) if ok else None,
               "errors": sorted({o["code"] for o in outcomes if o["code"] != "OK"})}
    return summary, outcomes


async def run_trace(args):
    calls = read_trace(args.trace)
    if args.solo_from:
        solo = json.loads(Path(args.solo_from).read_text())["solo_s"]
        if len(solo) != len(calls):
            sys.exit(f"load_open.py: --solo-from {args.solo_from} has {len(solo)} calls, the trace {len(calls)}")
    else:
        solo = await trace_solo(args, calls)
    scale = args.arrival_scale if args.arrival_scale is not None else statistics.mean(solo) / args.load
    print(json.dumps({"mean_solo_s": statistics.mean(solo), "arrival_scale_s": scale}), file=sys.stderr, flush=True)
    results = {}
    for mode in args.mode_list:
        summary, outcomes = await trace_mode(args, mode, calls, solo, scale)
        print(json.dumps(summary), flush=True)
        results[mode] = {"summary": summary, "calls": outcomes}
    if args.json:
        Path(args.json).write_text(json.dumps({"trace": args.trace, "solo_s": solo, "arrival_scale_s": scale,
                                               "modes": results}, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder: the script starts one server per mode on it (with --trace, "
                   "default: the embedded tiny model, build/testdata/tiny)")
    p.add_argument("--modes", default="request,step,step+slo")
    p.add_argument("--loads", default="0.5,1,1.5,2,3", help="offered loads as multiples of the capacity C")
    p.add_argument("--requests", type=int, default=40, help="trace length: most calls per level")
    p.add_argument("--max-seconds", type=float, default=90, help="no arrivals after this long per level")
    p.add_argument("--call-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--calibration", type=int, default=6, help="trace requests timed one at a time")
    p.add_argument("--devices", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the server (OMP_NUM_THREADS)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-ms", type=int, default=20)
    p.add_argument("--slo-target-factor", type=float, default=2.0)
    p.add_argument("--adaptive-max-ratio", type=float, default=0.75)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--label", default="open-loop load, tiny model")
    p.add_argument("--section", default="grpc-load-open-tiny", help="<!-- bench:NAME --> markers in --doc")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "load_open.png"))
    p.add_argument("--bin", default=str(REPO / "build" / "bin"))
    p.add_argument("--json", help="also write calibration, rows and goal checks here")
    p.add_argument("--trace", help="tomeserve-sim's trace (JSON lines); with --load X or --arrival-scale S")
    p.add_argument("--load", type=float, help="--trace: arrival seconds = t x mean_solo_s / X")
    p.add_argument("--arrival-scale", type=float, help="--trace: arrival seconds = t x S")
    p.add_argument("--slo", action="store_true", help="--trace: calls with slo_x send their target and max_ratio")
    p.add_argument("--solo-from", help="--trace: reuse the unloaded latencies (solo_s) of an earlier --json output")
    p.add_argument("--server-flags", default="", help="--trace: extra tomeserve flags, space-separated")
    p.add_argument("--transport", choices=["grpc", "http"], default="grpc",
                   help="--trace: gRPC (grpc.aio) or the HTTP front door (stdlib only; no grpcio needed)")
    args = p.parse_args()
    if args.trace and args.model is None:
        args.model = str(REPO / "build" / "testdata" / "tiny")
        if not (Path(args.model) / "model_index.json").exists():
            p.error(f"--model not given and the tiny model is not built at {args.model} (scripts/test.sh makes it)")
    if args.model is None:
        p.error("--model is required")
    if args.trace:
        args.mode_list = (args.modes if args.modes != "request,step,step+slo" else "request,step").split(",")
        if not set(args.mode_list) <= {"request", "step"}:
            p.error("--trace: --modes takes request and step (--slo sends the trace's targets)")
        if (args.load is None) == (args.arrival_scale is None):
            p.error("--trace needs exactly one of --load and --arrival-scale")
        if args.load is not None and not args.load > 0:
            p.error("--load must be > 0")
        args.requests = sum(1 for line in Path(args.trace).read_text().splitlines() if line.strip())
        asyncio.run(run_trace(args))
        return
    args.mode_list = args.modes.split(",")
    if not set(args.mode_list) <= {"request", "step", "step+slo"}:
        p.error("--modes takes request, step and step+slo")
    args.load_factors = sorted(float(x) for x in args.loads.split(","))

    trace = build_trace(args.seed, args.requests)
    calib, rows = asyncio.run(measure(args, trace))
    goals = goal_checks(rows, calib["L0"])
    plotted = plot(args, rows, args.plot)
    text = report(args, trace, calib, rows, goals, plotted)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": calib, "rows": rows, "goals": goals}, indent=1))
    from bench import write_section

    write_section(args.doc, args.section, text)


if __name__ == "__main__":
    main()
