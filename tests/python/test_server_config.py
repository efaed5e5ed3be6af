"""Configuration paths of the real binary: a YAML config file plus environment variables, JSON logs, and TLS /
mutual TLS with certificates made by the openssl CLI (skipped when it is missing)."""
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from conftest import binary
from tomeserve_server import proto, running_server, start_server

pb, pb_grpc = proto()


def test_config_file_env_and_json_logs(tiny_model, tmp_path):
    binary("tomeserve")
    config = tmp_path / "tomeserve.yaml"
    config.write_text(f"models:\n  cfg: {tiny_model}\nmax-batch-size: 2\ndefault_tome_ratio: 0.25\n"
                      "log-format: text\n")
    env = {"TOMESERVE_CONFIG": str(config), "TOMESERVE_LOG_FORMAT": "json"}  # env beats the file
    with running_server(["--max-queue-delay-ms", "0"], env=env) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models] == ["cfg"]
        r = stub.Generate(pb.GenerateRequest(prompt="x", num_inference_steps=2, request_id="json-1"), timeout=60)
        assert r.tome.ratio == pytest.approx(0.25)
        lines = [json.loads(l) for l in s.log().splitlines() if l.startswith("{")]
        assert lines and all({"time", "level", "msg"} <= set(l) for l in lines)
        assert [l for l in lines if "id=json-1" in l["msg"] and "status=OK" in l["msg"]]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=tomeserve test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN={'localhost' if name == 'server' else 'client'}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_mutual_tls(tiny_model, tmp_path):
    binary("tomeserve")
    make_certs(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca,
                                         private_key=(tmp_path / "client.key").read_bytes(),
                                         certificate_chain=(tmp_path / "client.pem").read_bytes())
    args = ["--model", tiny_model, "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
            str(tmp_path / "server.key"), "--tls-client-ca", str(tmp_path / "ca.pem")]
    with running_server(args, channel_credentials=creds) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].name == "tiny"
        # Without a client certificate the handshake fails.
        anonymous = grpc.secure_channel(s.address, grpc.ssl_channel_credentials(root_certificates=ca),
                                        options=[("grpc.ssl_target_name_override", "localhost")])
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ImageGeneratorStub(anonymous).ListModels(pb.ListModelsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        anonymous.close()
        # Plaintext is refused too.
        plain = grpc.insecure_channel(s.address)
        with pytest.raises(grpc.RpcError):
            pb_grpc.ImageGeneratorStub(plain).ListModels(pb.ListModelsRequest(), timeout=10)
        plain.close()


def test_missing_tls_file_fails_fast(tiny_model, tmp_path):
    binary("tomeserve")
    with pytest.raises(RuntimeError, match="--tls-cert"):
        start_server(["--model", tiny_model, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key",
                      str(tmp_path / "none.key")])


def test_second_server_on_a_taken_port_exits_naming_the_address(tiny_model):
    """gRPC sets SO_REUSEPORT by default, so a second server on a taken port used to bind as well and split the
    traffic with the first. It must fail at startup (exit 1) with one line naming the address."""
    with running_server(["--model", f"other={tiny_model}"]) as first:
        address = f"127.0.0.1:{first.port}"
        run = subprocess.run([str(binary("tomeserve")), "--model", tiny_model, "--listen", address],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, run.stderr
        ours = [line for line in run.stderr.splitlines() if "startup failed" in line]
        assert len(ours) == 1 and f"cannot listen on {address}" in ours[0], run.stderr
        # The first server still answers alone.
        stub = pb_grpc.ImageGeneratorStub(first.channel)
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models] == ["other"]


@pytest.mark.parametrize("args, env, needle", [
    (["--listen", "127.0.0.1"], {}, "--listen"),
    ([], {"TOMESERVE_MAX_BATCHSIZE": "4"}, "TOMESERVE_MAX_BATCH_SIZE (--max-batch-size)"),
    # Testing aids that break a server on purpose: never from the environment, and on the command line only with
    # the explicit switch (a stray chart or environment value must not crash-loop a production pod).
    (["--enable-fault-injection"], {"TOMESERVE_INJECT_WORKER_FAULT": "request@1"},
     "TOMESERVE_INJECT_WORKER_FAULT: fault-injection settings are accepted only on the command line"),
    (["--inject-oom-above-batch", "0"], {}, "--inject-oom-above-batch is a testing aid: add --enable-fault-injection"),
])
def test_usage_errors_exit_2_with_one_line(tiny_model, args, env, needle):
    import os
    run = subprocess.run([str(binary("tomeserve")), "--model", tiny_model, *args], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env})
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and needle in run.stderr, run.stderr


def test_variant_only_folder_serves_the_same_image(tiny_model, tmp_path):
    """Hugging Face folders often carry only variant files (diffusion_pytorch_model.fp16.safetensors,
    model.fp16.safetensors): they load when they are the only weights, and give the plain folder's image."""
    variant = tmp_path / "tiny-fp16-variant"
    shutil.copytree(tiny_model, variant)
    renamed = 0
    for weights in variant.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
        renamed += 1
    assert renamed >= 3
    request = pb.GenerateRequest(prompt="a lighthouse", num_inference_steps=2, seed=5)
    images = []
    for folder in (tiny_model, variant):
        with running_server(["--model", f"m={folder}"]) as s:
            r = pb_grpc.ImageGeneratorStub(s.channel).Generate(request, timeout=60)
            images.append(r.images[0].data)
    assert images[0] == images[1]


def test_variant_flag_picks_the_variant_beside_plain_weights(tiny_model, tmp_path):
    """--variant fp16 (diffusers' variant=) loads <name>.fp16.safetensors although plain weights are there; a
    variant the folder lacks stops startup with one line naming the file looked for."""
    both = tmp_path / "tiny-both"
    shutil.copytree(tiny_model, both)
    for weights in list(both.glob("*/*.safetensors")):
        shutil.copy(weights, weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
        weights.write_bytes(b"not safetensors")  # the plain files are broken: only the variant can load
    request = pb.GenerateRequest(prompt="a lighthouse", num_inference_steps=2, seed=5)
    with running_server(["--model", f"m={tiny_model}"]) as s:
        expected = pb_grpc.ImageGeneratorStub(s.channel).Generate(request, timeout=60).images[0].data
    with running_server(["--model", f"m={both}", "--variant", "fp16"]) as s:
        assert pb_grpc.ImageGeneratorStub(s.channel).Generate(request, timeout=60).images[0].data == expected
    run = subprocess.run([str(binary("tomeserve")), "--model", f"m={both}", "--variant", "bf16", "--listen",
                          "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "model.bf16.safetensors" in run.stderr and "drop --variant" in run.stderr, run.stderr
    gen = subprocess.run([str(binary("tomeserve-gen")), "generate", "--model", str(both), "--variant", "fp16",
                          "--prompt", "a lighthouse", "--steps", "2", "--seed", "5", "-o", str(tmp_path / "g.png")],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr


def test_single_file_checkpoint_is_refused_with_the_conversion(tiny_model, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(next(Path(tiny_model).glob("unet/*.safetensors")), checkpoint)
    run = subprocess.run([str(binary("tomeserve")), "--model", str(checkpoint), "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "single-file checkpoint" in run.stderr and "scripts/convert_single_file.py" in run.stderr, run.stderr
