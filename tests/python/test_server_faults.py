"""Worker faults over real gRPC on 127.0.0.1 (tiny model, CPU), injected with --inject-worker-fault KIND@N (the
worker's Nth denoising step): a request-level error fails only that batch's calls and the next call is served; a
device-fatal error and a stuck step (noticed by the watchdog, --step-timeout-seconds) fail the running calls with
UNAVAILABLE, turn the `liveness` health service NOT_SERVING and make the process exit 3 within a bound, so an
orchestrator restarts it. Liveness stays SERVING through a normal SIGTERM drain."""
import signal
import time

import grpc
import pytest

from conftest import binary
from tomeserve_server import health_status, proto, running_server, server_under_test

pb, pb_grpc = proto()


def request(**kw):
    kw.setdefault("prompt", "a fault")
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("scheduler", pb.SCHEDULER_DDIM)
    return pb.GenerateRequest(**kw)


def test_request_level_error_fails_only_its_batch(tiny_model):
    binary("tomeserve")
    # Warm-up steps do not count: step 3 is the first call's third step.
    with running_server(["--model", tiny_model, "--inject-worker-fault", "request@3"]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(request_id="hit"), timeout=60)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "injected request-level error" in e.value.details()
        assert len(stub.Generate(request(request_id="next"), timeout=60).images) == 1
        assert health_status(s.channel) == "SERVING"
        assert health_status(s.channel, "liveness") == "SERVING"


@pytest.mark.parametrize("fault,extra", [("fatal@2", []), ("stuck@2", ["--step-timeout-seconds", "1"])])
def test_fatal_or_stuck_worker_fails_calls_and_exits_3(tiny_model, fault, extra):
    binary("tomeserve")
    with server_under_test(["--model", tiny_model, "--inject-worker-fault", fault, *extra]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        assert health_status(s.channel, "liveness") == "SERVING"
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(request_id="victim"), timeout=120)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "out of service" in e.value.details()
        # The process leaves on its own, non-zero, within a bound (5 s for the answers to go out).
        assert s.process.wait(timeout=60) == 3, s.log()
        assert time.monotonic() - t0 < 60
        log = s.log()
        assert "left service" in log and "no worker is left in service" in log, log
        if fault.startswith("stuck"):
            assert "ran past its limit" in log, log


def test_liveness_stays_serving_while_draining(tiny_model):
    binary("tomeserve")
    with server_under_test(["--model", tiny_model, "--shutdown-grace", "3", "--drain-timeout", "30"]) as s:
        assert health_status(s.channel, "liveness") == "SERVING"
        s.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while health_status(s.channel) == "SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health_status(s.channel) == "NOT_SERVING"  # readiness drops ...
        assert health_status(s.channel, "liveness") == "SERVING"  # ... liveness does not
        assert s.process.wait(timeout=60) == 0
