#!/usr/bin/env python3
"""Soak test for tomeserve: many calls from concurrent clients against one server on 127.0.0.1, with faults, checking
that every call ends exactly once with an allowed status, that answers match their requests, that nothing is lost,
and that the server's memory, threads and file descriptors do not grow. Bounded in calls and time.

    soak.py --model DIR [--calls 10000] [--clients 16] [--seed 1] [--max-seconds 1800] [--threads 1]
            [--json FILE] [--doc docs/reliability.md --section NAME] [--bin build/bin]

The server runs with --max-batch-size 4, --inject-oom-above-batch 3 (UNet calls of 4 images run out of memory:
evictions), --inject-worker-fault request%97 (every 97th step fails its batch with INTERNAL) and a 32-call queue.
The seeded mix: sizes 64/96/128, 1-6 steps, ToMe ratios 0/0.3/0.5, five schedulers, 1-3 images, guidance 1 or 7.5;
10% of calls are cancelled by the client shortly after they start, 10% carry a short deadline (50-300 ms).

Checks (the exit status is 1 when one fails, with the reason):
- every call has exactly one terminal status, in {OK, CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL};
  INTERNAL only from the injected error, CANCELLED only for calls the client cancelled, DEADLINE_EXCEEDED only
  for calls with a short deadline, RESOURCE_EXHAUSTED only as "queue is full" or an image too large alone;
- OK answers match their request: request_id, image count, seeds (seed + i), PNG data;
- the server logs one line per call it saw, and none twice;
- from the end of warm-up (--warmup-fraction of the calls, 5% by default) to the end: resident memory grows < 5%,
  threads and open file descriptors do not grow (6 threads of slack for gRPC's pool). Warm-up must have seen the
  batch shapes: oneDNN's primitive caches and the allocator's pools fill per new shape.
"""
import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests" / "python"))
from bench import write_section  # noqa: E402  (markdown sections between markers)
from tomeserve_server import proto, start_server  # noqa: E402

SCHEDULERS = ["PNDM", "DDIM", "EULER", "EULER_ANCESTRAL", "DPMPP_2M_KARRAS"]
ALLOWED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL"}
THREAD_SLACK = 6  # gRPC's callback executor grows and shrinks its pool with load


def plan(seed, n):
    rng = random.Random(seed)
    calls = []
    for i in range(n):
        kind = rng.random()
        calls.append({"id": f"soak-{i}", "side": rng.choice([64, 96, 128]), "steps": rng.randint(1, 6),
                      "ratio": rng.choice([0.0, 0.3, 0.5]), "scheduler": rng.choice(SCHEDULERS),
                      "images": rng.choice([1, 1, 1, 2, 3]), "guidance": rng.choice([1.0, 7.5]),
                      "seed": rng.randrange(2 ** 31),
                      "cancel_after": rng.uniform(0.005, 0.1) if kind < 0.1 else None,
                      "deadline": rng.uniform(0.05, 0.3) if 0.1 <= kind < 0.2 else None})
    return calls


class ServerDied(RuntimeError):
    pass


def process_stats(server):
    """RSS, threads and open files of the server; ServerDied (with the log's tail) when it is no longer running."""
    if server.process.poll() is not None:
        tail = "\n".join(server.log().splitlines()[-60:])
        raise ServerDied(f"the server exited with {server.process.returncode} during the soak:\n{tail}")
    pid = server.process.pid
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    return {"rss_mb": rss_kb / 1024, "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def check_ok(call, r, problems):
    seeds = [im.seed for im in r.images]
    if r.request_id != call["id"] or len(r.images) != call["images"] or \
            seeds != [call["seed"] + i for i in range(call["images"])] or \
            not all(im.data[:8] == b"\x89PNG\r\n\x1a\n" for im in r.images):
        problems.append(f"{call['id']}: answer does not match its request")


def check_error(call, code, details, problems):
    if code not in ALLOWED:
        problems.append(f"{call['id']}: status {code} ({details}) is not allowed")
    elif code == "CANCELLED" and call["cancel_after"] is None:
        problems.append(f"{call['id']}: CANCELLED though the client did not cancel ({details})")
    elif code == "DEADLINE_EXCEEDED" and call["deadline"] is None:
        problems.append(f"{call['id']}: DEADLINE_EXCEEDED without a short deadline ({details})")
    elif code == "INTERNAL" and "injected request-level error" not in details:
        problems.append(f"{call['id']}: INTERNAL not injected: {details}")
    elif code == "RESOURCE_EXHAUSTED" and "queue is full" not in details and "does not fit" not in details:
        problems.append(f"{call['id']}: RESOURCE_EXHAUSTED: {details}")


async def run(args, server, calls):
    import grpc

    pb, pb_grpc = proto()
    outcomes = {}
    problems = []
    stats = {}
    warm = max(1, int(len(calls) * args.warmup_fraction))
    next_call = 0
    t0 = time.monotonic()

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.ImageGeneratorStub(channel)

        async def one(call):
            req = pb.GenerateRequest(
                request_id=call["id"], prompt=f"soak {call['id']}", width=call["side"], height=call["side"],
                num_inference_steps=call["steps"], guidance_scale=call["guidance"], seed=call["seed"],
                num_images=call["images"], scheduler=pb.Scheduler.Value("SCHEDULER_" + call["scheduler"]),
                tome=pb.TokenMerging(ratio=call["ratio"]))
            rpc = stub.Generate(req, timeout=call["deadline"] or 300)
            if call["cancel_after"] is not None:
                asyncio.get_running_loop().call_later(call["cancel_after"], rpc.cancel)
            try:
                r = await rpc
            except asyncio.CancelledError:
                return "CANCELLED", "cancelled by the client"
            except grpc.aio.AioRpcError as e:
                return e.code().name, e.details() or ""
            check_ok(call, r, problems)
            return "OK", ""

        async def client():
            nonlocal next_call
            while next_call < len(calls) and time.monotonic() - t0 < args.max_seconds:
                call = calls[next_call]
                next_call += 1
                code, details = await one(call)
                if call["id"] in outcomes:
                    problems.append(f"{call['id']}: a second terminal status {code}")
                outcomes[call["id"]] = code
                if code != "OK":
                    check_error(call, code, details, problems)
                if len(outcomes) == warm and "warm" not in stats:
                    stats["warm"] = process_stats(server)

        await asyncio.gather(*(client() for _ in range(args.clients)))
    await asyncio.sleep(1.0)  # let the server settle (gRPC closes idle transports)
    stats["end"] = process_stats(server)
    return outcomes, problems, stats, time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup-fraction", type=float, default=0.05,
                    help="calls before the baseline reading of RSS/threads/fds (default 0.05)")
    ap.add_argument("--json")
    ap.add_argument("--doc")
    ap.add_argument("--section", default="soak")
    ap.add_argument("--bin", default=str(REPO / "build" / "bin"))
    args = ap.parse_args()

    calls = plan(args.seed, args.calls)
    server = start_server(["--model", args.model, "--devices", "cpu", "--max-batch-size", "4",
                           "--enable-fault-injection", "--inject-oom-above-batch", "3", "--inject-worker-fault", "request%97",
                           "--max-queue-size", "32"],
                          env={"OMP_NUM_THREADS": str(args.threads)}, binary=Path(args.bin) / "tomeserve")
    try:
        outcomes, problems, stats, seconds = asyncio.run(run(args, server, calls))
        log = server.log()
    except ServerDied as e:
        print(f"soak: {e}", file=sys.stderr)
        return 1
    finally:
        server.channel.close()
        exit_code = server.stop()
    sent = [c for c in calls if c["id"] in outcomes]
    ids_logged = Counter(re.findall(r"Generate id=(soak-\d+) ", log))
    twice = [i for i, n in ids_logged.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} calls logged twice, e.g. {twice[:3]}")
    unanswered_ok = [c["id"] for c in sent if outcomes[c["id"]] == "OK" and ids_logged[c["id"]] != 1]
    if unanswered_ok:
        problems.append(f"{len(unanswered_ok)} OK calls without their one log line, e.g. {unanswered_ok[:3]}")
    if exit_code != 0:
        problems.append(f"the server exited with {exit_code} after SIGTERM")
    warm, end = stats.get("warm"), stats["end"]
    if warm:
        if end["rss_mb"] > warm["rss_mb"] * 1.05:
            problems.append(f"RSS grew {warm['rss_mb']:.0f} -> {end['rss_mb']:.0f} MiB (> 5%)")
        if end["threads"] > warm["threads"] + THREAD_SLACK:
            problems.append(f"threads grew {warm['threads']} -> {end['threads']}")
        if end["fds"] > warm["fds"]:
            problems.append(f"open fds grew {warm['fds']} -> {end['fds']}")
    codes = Counter(outcomes.values())
    result = {"calls_sent": len(sent), "calls_planned": len(calls), "seconds": round(seconds, 1),
              "clients": args.clients, "codes": dict(codes), "lost": len(sent) - sum(codes.values()),
              "evictions": len(re.findall(r"evicting the", log)), "injected_errors": len(re.findall(r"step failed on \S+: injected request-level", log)),
              "warm": warm, "end": end, "problems": problems[:20], "problem_count": len(problems)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.doc:
        write_section(args.doc, args.section, report(args, result))
    return 1 if problems else 0


def report(args, r):
    w, e = r["warm"] or {}, r["end"]
    codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
    return "\n".join([
        f"**soak, tiny model, CPU** — `scripts/soak.py --calls {args.calls} --clients {args.clients} "
        f"--seed {args.seed}`; {time.strftime('%Y-%m-%d')}",
        "",
        "| calls | clients | seconds | statuses | lost | evictions (OOM) | injected failing steps | RSS warm → end (MiB) "
        "| threads | open fds | problems |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['calls_sent']} | {r['clients']} | {r['seconds']} | {codes} | {r['lost']} | {r['evictions']} "
        f"| {r['injected_errors']} | {w.get('rss_mb', 0):.0f} → {e['rss_mb']:.0f} | {w.get('threads')} → "
        f"{e['threads']} | {w.get('fds')} → {e['fds']} | {r['problem_count']} |",
    ])


if __name__ == "__main__":
    sys.exit(main())
