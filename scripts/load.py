#!/usr/bin/env python3
"""Load generator for tomeserve: closed-loop clients calling Generate over gRPC, bounded in request count and time.
Measures, per concurrency level, end-to-end latency, the gRPC overhead (end to end minus the server-reported total,
which spans queueing, text encoding, denoising and decoding) at p50/p99, and throughput, next to the offline
pipeline (tomeserve-bench --mode generate) at the batch size the server actually formed. A benchmark, not a test.

    load.py (--model DIR | --target HOST:PORT) [--concurrency 1,4,16] [--requests 64] [--max-seconds 120]
            [--steps 4] [--ratio 0] [--width W --height H] [--max-batch-size 16] [--max-queue-delay-ms 20]
            [--threads N] [--no-offline] [--section NAME] [--doc docs/benchmarks.md] [--bin build/bin]
            [--json FILE]

--model starts build/bin/tomeserve on 127.0.0.1 (free port, CPU unless --devices says otherwise) and stops it
afterwards; --target measures a running server (no offline comparison unless --model is also given for
tomeserve-bench). Each level sends at most --requests calls and stops starting new ones after --max-seconds.

Why Python (grpc.aio) and not C++: one event loop drives 16 concurrent calls without threads, it reuses the
stubs and the server start-up of the tests (tests/python/tomeserve_server.py), and it adds no target to the
build. The client's own cost (~0.1-0.3 ms per call in grpcio) lands in the "overhead" column, so that column is an
upper bound on the server's gRPC cost.
"""
import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests" / "python"))
from tomeserve_server import health_stubs, proto, start_server  # noqa: E402  (grpcio stubs, server start/stop)


def percentile(values, q):
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def start(args):
    """build/bin/tomeserve on 127.0.0.1 (free port), SERVING, with --threads intra-op threads (OMP_NUM_THREADS)."""
    flags = ["--model", args.model, "--devices", args.devices, "--max-batch-size", str(args.max_batch_size),
             "--max-queue-delay-ms", str(args.max_queue_delay_ms),
             "--max-queue-size", str(max(64, 4 * max(args.levels)))]
    return start_server(flags, env={"OMP_NUM_THREADS": str(args.threads)}, startup_timeout=args.start_timeout,
                        binary=Path(args.bin) / "tomeserve")


async def wait_serving(target, timeout):
    import grpc

    health_pb2, health_pb2_grpc = health_stubs()
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{target} did not become SERVING within {timeout} s")
            await asyncio.sleep(0.2)


async def run_level(target, args, concurrency, requests, max_seconds):
    """Closed loop: `concurrency` clients, each sending its next call when the previous one returns."""
    import grpc

    pb2, pb2_grpc = proto()
    records, errors = [], {}
    counter = iter(range(requests))
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb2_grpc.ImageGeneratorStub(ch)
        t_start = time.perf_counter()

        async def client():
            for i in counter:
                if time.perf_counter() - t_start > max_seconds:
                    return
                req = pb2.GenerateRequest(prompt=args.prompt, num_inference_steps=args.steps, seed=i,
                                          width=args.width, height=args.height,
                                          tome=pb2.TokenMerging(ratio=args.ratio), request_id=f"load-{i}")
                t0 = time.perf_counter()
                try:
                    r = await stub.Generate(req, timeout=args.call_timeout)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                e2e = time.perf_counter() - t0
                t = r.timings
                records.append({"e2e": e2e, "total": t.total_seconds, "queue": t.queue_seconds,
                                "pipeline": t.text_encoding_seconds + t.denoising_seconds + t.decoding_seconds,
                                "batch": r.batch_size, "images": len(r.images)})

        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t_start
    return records, errors, wall


def offline(args, batch):
    """tomeserve-bench --mode generate at `batch`: (median seconds per batch, images per second)."""
    cmd = [str(Path(args.bin) / "tomeserve-bench"), "--model", args.model, "--mode", "generate",
           "--batch", str(batch), "--steps", str(args.steps), "--reps", str(args.offline_reps), "--warmup", "1",
           "--threads", str(args.threads)]
    if args.width and args.height:
        cmd += ["--width", str(args.width), "--height", str(args.height)]
    else:
        cmd += ["--width", str(args.native[0]), "--height", str(args.native[1])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"tomeserve-bench failed: {r.stderr.strip()}")
    median = json.loads(r.stdout.strip().splitlines()[-1])["median_s"]
    return median, batch / median


async def native_size(target):
    import grpc

    pb2, pb2_grpc = proto()
    async with grpc.aio.insecure_channel(target) as ch:
        models = (await pb2_grpc.ImageGeneratorStub(ch).ListModels(pb2.ListModelsRequest(), timeout=10)).models
    return models[0].native_width, models[0].native_height


def ms(x):
    return f"{1000 * x:.1f}"


async def measure(target, args):
    await wait_serving(target, args.start_timeout)
    args.native = await native_size(target)
    rows = []
    for c in args.levels:
        await run_level(target, args, c, c, args.max_seconds)  # warm-up: one call per client, not counted
        records, errors, wall = await run_level(target, args, c, args.requests, args.max_seconds)
        if not records:
            sys.exit(f"concurrency {c}: every call failed: {errors}")
        overhead = [r["e2e"] - r["total"] for r in records]
        batch = statistics.median(r["batch"] for r in records)
        row = {
            "clients": c, "calls": len(records), "errors": errors, "wall_s": wall,
            "e2e_p50": percentile([r["e2e"] for r in records], 50),
            "e2e_p99": percentile([r["e2e"] for r in records], 99),
            "total_p50": percentile([r["total"] for r in records], 50),
            "pipeline_p50": percentile([r["pipeline"] for r in records], 50),
            "queue_p50": percentile([r["queue"] for r in records], 50),
            "overhead_p50": percentile(overhead, 50), "overhead_p99": percentile(overhead, 99),
            "batch_median": batch, "served_ips": sum(r["images"] for r in records) / wall,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(args, rows):
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    size = f"{args.width or args.native[0]}x{args.height or args.native[1]}"
    lines = [
        f"**{args.label}** — {machine}; server --devices {args.devices}, --max-batch-size {args.max_batch_size}, "
        f"--max-queue-delay-ms {args.max_queue_delay_ms}; {size}, {args.steps} steps, ToMe ratio {args.ratio}; "
        f"closed loop, at most {args.requests} calls / {args.max_seconds:.0f} s per level after one warm-up call "
        f"per client; client scripts/load.py (grpc.aio); torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
        "",
        "overhead = end-to-end latency at the client − the server's reported total (queue + text encoding + "
        "denoising + decoding): transport, (de)serialization, handler and completion. Offline = tomeserve-bench "
        "--mode generate at the median batch size the server formed (no gRPC, no queue, no PNG encoding).",
        "",
        "| clients | calls | median batch | e2e p50 / p99 (ms) | server total p50 (ms) | queue p50 (ms) "
        "| overhead p50 / p99 (ms) | served (img/s) | offline (img/s) | served / offline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        off = f"{r['offline_ips']:.2f} (batch {r['offline_batch']})" if "offline_ips" in r else "—"
        ratio = f"{r['served_ips'] / r['offline_ips']:.2f}" if "offline_ips" in r else "—"
        err = f" ({sum(r['errors'].values())} failed)" if r["errors"] else ""
        lines.append(f"| {r['clients']} | {r['calls']}{err} | {r['batch_median']:g} | {ms(r['e2e_p50'])} / "
                     f"{ms(r['e2e_p99'])} | {ms(r['total_p50'])} | {ms(r['queue_p50'])} | "
                     f"{ms(r['overhead_p50'])} / {ms(r['overhead_p99'])} | {r['served_ips']:.2f} | {off} | {ratio} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder: start a server on it (and run the offline comparison)")
    p.add_argument("--target", help="HOST:PORT of a running server")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=64, help="most calls per level")
    p.add_argument("--max-seconds", type=float, default=120, help="no new calls after this long per level")
    p.add_argument("--call-timeout", type=float, default=300)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.0)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--devices", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch intra-op threads for the server (OMP_NUM_THREADS) and tomeserve-bench")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=int, default=20)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--offline-reps", type=int, default=5)
    p.add_argument("--no-offline", action="store_true")
    p.add_argument("--label", default="load, tiny model")
    p.add_argument("--section", help="write the table into --doc between <!-- bench:NAME --> markers")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--bin", default=str(REPO / "build" / "bin"))
    p.add_argument("--json", help="also write the raw rows here")
    args = p.parse_args()
    if bool(args.target) == bool(args.model) and not args.target:
        p.error("give --model DIR (start a server) or --target HOST:PORT")
    args.levels = [int(c) for c in args.concurrency.split(",")]

    server = None if args.target else start(args)
    try:
        rows = asyncio.run(measure(args.target or server.address, args))
    finally:
        if server:
            server.channel.close()
            server.stop()
    # Offline runs after the server has exited, so the two never share the CPU/GPU.
    if args.model and not args.no_offline:
        for row in rows:
            b = max(1, int(round(row["batch_median"])))
            row["offline_batch"] = b
            row["offline_s"], row["offline_ips"] = offline(args, b)
            print(f"offline batch {b}: {row['offline_s']:.4f} s per batch", flush=True)
    text = table(args, rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.section:
        from bench import write_section

        write_section(args.doc, args.section, text)


if __name__ == "__main__":
    main()
