"""Reusable helpers for tests that talk to a real build/bin/tomeserve over gRPC on 127.0.0.1.

    from tomeserve_server import proto, running_server

    pb, pb_grpc = proto()                       # grpcio stubs generated from the .proto (cached per process)
    with running_server(["--model", tiny_model]) as server:
        stub = pb_grpc.ImageGeneratorStub(server.channel)
        stub.Generate(pb.GenerateRequest(prompt="a cat", num_inference_steps=2))

running_server starts the binary with --listen 127.0.0.1:0 --port-file, --devices cpu unless `args` name
--devices (the tests assume CPU fp32), and with metrics=True a free --metrics-listen port; waits until
grpc.health.v1 reports SERVING, yields a RunningServer -- a str equal to the address "127.0.0.1:PORT" that
also has .port, .channel, .metrics_url, .log(), .process -- and on exit sends SIGTERM and checks that the
process exits with 0. Nothing listens anywhere but 127.0.0.1.
start_server is the same without the context manager (call .stop() yourself); health_status(channel) reads
grpc.health.v1.Health/Check.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import grpc

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "tomeserve/v1/image_generator.proto"

_stubs = None


def proto():
    """(image_generator_pb2, image_generator_pb2_grpc), generated once per process into a temp dir."""
    global _stubs
    if _stubs is None:
        from grpc_tools import protoc

        out = tempfile.mkdtemp(prefix="tomeserve_stubs_")
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", PROTO_FILE]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed for {PROTO_FILE}")
        sys.path.insert(0, out)
        pb = importlib.import_module("tomeserve.v1.image_generator_pb2")
        pb_grpc = importlib.import_module("tomeserve.v1.image_generator_pb2_grpc")
        _stubs = (pb, pb_grpc)
    return _stubs


_health = None


def health_stubs():
    """(health_pb2, health_pb2_grpc) from grpcio-health-checking when installed, else generated here (once per
    process: a second grpc.health.v1 module would clash in protobuf's descriptor pool)."""
    global _health
    if _health is None:
        _health = _load_health_stubs()
    return _health


def _load_health_stubs():
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore

        return health_pb2, health_pb2_grpc
    except ImportError:
        pass
    from grpc_tools import protoc

    # Package grpc.health.v1 (the service name clients call) in a folder that is not grpcio's "grpc" package.
    out = tempfile.mkdtemp(prefix="tomeserve_health_")
    (Path(out) / "tomeserve_health").mkdir()
    (Path(out) / "tomeserve_health" / "health.proto").write_text(_HEALTH_PROTO)
    if protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}",
                    "tomeserve_health/health.proto"]) != 0:
        raise RuntimeError("grpc_tools.protoc failed for health.proto")
    sys.path.insert(0, out)
    return (importlib.import_module("tomeserve_health.health_pb2"),
            importlib.import_module("tomeserve_health.health_pb2_grpc"))


_HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (for listeners that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binary() -> Path:
    return Path(os.environ.get("TOMESERVE_BIN_DIR", REPO / "build" / "bin")) / "tomeserve"


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """'SERVING', 'NOT_SERVING', ... from grpc.health.v1.Health/Check."""
    health_pb2, health_pb2_grpc = health_stubs()
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class RunningServer(str):
    """A started server. It IS its address string ("127.0.0.1:PORT"), so `with running_server(...) as addr:`
    can pass it anywhere an address goes, and it also carries the process, port, channel and log."""

    process: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int | None
    channel: grpc.Channel

    def __new__(cls, *, process: subprocess.Popen, port: int, log_path: Path, metrics_port: int | None = None):
        self = super().__new__(cls, f"127.0.0.1:{port}")
        self.process = process
        self.port = port
        self.log_path = log_path
        self.metrics_port = metrics_port
        self.channel = None  # type: ignore[assignment]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(args: Sequence[str], *, metrics: bool = False, env: dict | None = None,
                 startup_timeout: float = 120.0, wait_serving: bool = True, binary: Path | None = None,
                 channel_credentials: grpc.ChannelCredentials | None = None,
                 tls_target_name: str = "localhost") -> RunningServer:
    """Starts tomeserve on 127.0.0.1 with `args` (which must name --model) and waits for SERVING.

    With channel_credentials (the server runs with --tls-cert ...), the channel is a TLS channel whose
    expected server name is tls_target_name."""
    binary = binary or server_binary()
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is not built")
    tmp = Path(tempfile.mkdtemp(prefix="tomeserve_server_"))
    port_file = tmp / "port"
    log_path = tmp / "server.log"
    cmd = [str(binary), "--listen", "127.0.0.1:0", "--port-file", str(port_file)]
    metrics_port = None
    if metrics:
        metrics_port = free_port()
        cmd += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    args = [str(a) for a in args]
    # The tests assume CPU fp32 (ListModels devices, image tolerances); "auto" would pick a GPU where present.
    if not any(a == "--devices" or a.startswith(("--devices=", "--devices ")) for a in args):
        cmd += ["--devices", "cpu"]
    cmd += args
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    log = open(log_path, "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    log.close()
    deadline = time.monotonic() + startup_timeout
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"tomeserve exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"tomeserve wrote no port file:\n{log_path.read_text()}")
        time.sleep(0.05)
    port = int(port_file.read_text().strip())
    server = RunningServer(process=process, port=port, log_path=log_path, metrics_port=metrics_port)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if channel_credentials is None:
        server.channel = grpc.insecure_channel(server.address, options=options)
    else:
        options.append(("grpc.ssl_target_name_override", tls_target_name))
        server.channel = grpc.secure_channel(server.address, channel_credentials, options=options)
    if wait_serving:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tomeserve exited with {process.returncode}:\n{server.log()}")
            try:
                if health_status(server.channel, timeout=2.0) == "SERVING":
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"tomeserve did not become SERVING:\n{server.log()}")
            time.sleep(0.1)
    return server


@contextlib.contextmanager
def server_under_test(args: Sequence[str], **kw) -> Iterator[RunningServer]:
    """start_server for tests that stop the server themselves (signals, injected faults) and check how it exits:
    on leaving, the channel is closed and a process still running is killed."""
    server = start_server(args, **kw)
    try:
        yield server
    finally:
        server.channel.close()
        if server.process.poll() is None:
            server.process.kill()


@contextlib.contextmanager
def running_server(args: Sequence[str], *, metrics: bool = False, env: dict | None = None,
                   startup_timeout: float = 120.0, check_exit: bool = True,
                   channel_credentials: grpc.ChannelCredentials | None = None) -> Iterator[RunningServer]:
    """Context manager around start_server: SIGTERM on exit and (check_exit) assert the exit code is 0."""
    server = start_server(args, metrics=metrics, env=env, startup_timeout=startup_timeout,
                          channel_credentials=channel_credentials)
    try:
        yield server
    finally:
        server.channel.close()
        try:
            code = server.stop()
        except subprocess.TimeoutExpired:
            server.process.kill()
            raise AssertionError(f"tomeserve did not stop after SIGTERM:\n{server.log()}")
        if check_exit and code != 0:
            raise AssertionError(f"tomeserve exited with {code} after SIGTERM:\n{server.log()}")
