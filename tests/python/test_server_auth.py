"""Bearer-token authentication (--auth-token-file) over real gRPC on 127.0.0.1 with the tiny model: missing and
wrong tokens get UNAUTHENTICATED on every ImageGenerator RPC, health and reflection stay open, the token file is
re-read on SIGHUP and when it changes, tokens never reach the log, the CLI sends --token-file, and token auth works
together with TLS and mutual TLS (certificates made here by the openssl CLI)."""
import os
import shutil
import signal
import subprocess
import time

import grpc
import pytest

from conftest import binary
from test_client_e2e import grpcurl
from test_server_config import make_certs
from tomeserve_server import health_status, proto, running_server

pb, pb_grpc = proto()

TOKEN, OTHER = "tok-3f9a1c2e7b", "tok-other-55d0"


def call(stub, token=None, rpc="ListModels"):
    metadata = [("authorization", f"Bearer {token}")] if token else None
    if rpc == "ListModels":
        return stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata)
    request = pb.GenerateRequest(prompt="a key", num_inference_steps=2)
    if rpc == "Generate":
        return stub.Generate(request, timeout=60, metadata=metadata)
    return list(stub.GenerateStream(request, timeout=60, metadata=metadata))[-1]


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def wait_until(predicate, seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_tokens_are_required_checked_reloaded_and_never_logged(tiny_model, tmp_path, grpcurl):
    binary("tomeserve")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# serving tokens\n{TOKEN}\n")
    with running_server(["--model", tiny_model, "--auth-token-file", str(tokens)]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        for rpc in ("ListModels", "Generate", "GenerateStream"):
            code, details = code_of(lambda: call(stub, None, rpc))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details, (rpc, details)
            code, _ = code_of(lambda: call(stub, OTHER, rpc))
            assert code == grpc.StatusCode.UNAUTHENTICATED, rpc
        assert call(stub, TOKEN).models[0].name == "tiny"
        assert len(call(stub, TOKEN, "Generate").images) == 1
        assert call(stub, TOKEN, "GenerateStream").WhichOneof("event") == "result"
        # Health and reflection stay open.
        assert health_status(s.channel) == "SERVING"
        listed = subprocess.run([grpcurl, "-plaintext", s.address, "list"], capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 0 and "tomeserve.v1.ImageGenerator" in listed.stdout, listed.stderr

        # SIGHUP re-reads the file.
        tokens.write_text(f"{OTHER}\n")
        os.kill(s.process.pid, signal.SIGHUP)
        assert wait_until(lambda: "SIGHUP: --auth-token-file re-read, 1 token(s)" in s.log()), s.log()
        assert call(stub, OTHER).models
        assert code_of(lambda: call(stub, TOKEN))[0] == grpc.StatusCode.UNAUTHENTICATED
        # A change alone is noticed too (checked at most once a second).
        tokens.write_text(f"{TOKEN}\n")
        future = time.time() + 5
        os.utime(tokens, (future, future))
        assert wait_until(lambda: _accepted(stub, TOKEN)), s.log()
        # An emptied file is not taken: the previous tokens stay.
        tokens.write_text("# nothing\n")
        os.kill(s.process.pid, signal.SIGHUP)
        assert wait_until(lambda: "not re-read, the previous tokens stay" in s.log()), s.log()
        assert call(stub, TOKEN).models
        assert health_status(s.channel) == "SERVING"  # SIGHUP does not drain
        log = s.log()
        assert TOKEN not in log and OTHER not in log


def _accepted(stub, token):
    try:
        call(stub, token)
        return True
    except grpc.RpcError:
        return False


def test_cli_sends_the_token_file(tiny_model, tmp_path):
    binary("tomeserve")
    cli = binary("tomeserve-cli")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    with running_server(["--model", tiny_model, "--auth-token-file", str(tokens)]) as s:
        without = subprocess.run([cli, "--target", s.address, "list-models"], capture_output=True, text=True)
        assert without.returncode == 9 and "UNAUTHENTICATED" in without.stderr, without.stderr
        with_token = subprocess.run([cli, "--target", s.address, "--token-file", str(tokens), "generate",
                                     "--prompt", "a key", "--steps", "2", "-o", str(tmp_path / "out.png")],
                                    capture_output=True, text=True)
        assert with_token.returncode == 0, with_token.stderr
        assert (tmp_path / "out.png").stat().st_size > 0
    missing = subprocess.run([cli, "--target", "127.0.0.1:1", "--token-file", str(tmp_path / "none"), "health"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "--token-file" in missing.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_token_auth_with_tls_and_mutual_tls(tiny_model, tmp_path):
    binary("tomeserve")
    make_certs(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    ca = (tmp_path / "ca.pem").read_bytes()
    tls = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
    client_cert = dict(private_key=(tmp_path / "client.key").read_bytes(),
                       certificate_chain=(tmp_path / "client.pem").read_bytes())
    for mutual in (False, True):
        args = ["--model", tiny_model, "--auth-token-file", str(tokens), *tls]
        if mutual:
            args += ["--tls-client-ca", str(tmp_path / "ca.pem")]
        creds = grpc.ssl_channel_credentials(root_certificates=ca, **(client_cert if mutual else {}))
        with running_server(args, channel_credentials=creds) as s:
            stub = pb_grpc.ImageGeneratorStub(s.channel)
            assert code_of(lambda: call(stub))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: call(stub, OTHER))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert len(call(stub, TOKEN, "Generate").images) == 1
            assert health_status(s.channel) == "SERVING"
