"""Worker faults over real gRPC on 127.0.0.1 (tiny model, CPU), injected with --inject-worker-fault KIND@N (the
worker's Nth denoising step): a request-level error fails only that batch's calls and the next call is served; a
device-fatal error and a stuck step (noticed by the watchdog, --step-timeout-seconds) fail the running calls with
UNAVAILABLE, turn the `liveness` health service NOT_SERVING and make the process exit 3 within a bound, so an
orchestrator restarts it. Liveness stays SERVING through a normal SIGTERM drain."""
import io
import signal
import time

import grpc
import numpy as np
import pytest
from PIL import Image

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
    with running_server(["--model", tiny_model, "--enable-fault-injection", "--inject-worker-fault", "request@3"]) as s:
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
    with server_under_test(["--model", tiny_model, "--enable-fault-injection", "--inject-worker-fault", fault, *extra]) as s:
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


def test_exception_while_starting_a_call_answers_it_and_the_calls_after_it(tiny_model):
    """An exception thrown while starting an admitted call (after its samples joined the batch) fails that call
    with INTERNAL; the calls admitted with it and after it are still answered, and the worker keeps serving."""
    binary("tomeserve")
    args = ["--model", tiny_model, "--enable-fault-injection", "--inject-worker-fault", "start@1",
            "--max-queue-delay-ms", "200"]
    with running_server(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        calls = [stub.Generate.future(request(request_id=f"c{i}", seed=i), timeout=60) for i in range(3)]
        outcomes = []
        for c in calls:
            try:
                outcomes.append(("OK", len(c.result().images)))
            except grpc.RpcError as e:
                outcomes.append((e.code().name, e.details()))
        failed = [o for o in outcomes if o[0] != "OK"]
        assert len(failed) == 1 and failed[0][0] == "INTERNAL" and "injected exception" in failed[0][1], outcomes
        assert sorted(o for o in outcomes if o[0] == "OK") == [("OK", 1), ("OK", 1)], outcomes
        assert len(stub.Generate(request(request_id="after"), timeout=60).images) == 1
        assert health_status(s.channel, "liveness") == "SERVING"


def test_transient_oom_cap_probes_back_up_to_the_full_batch(tiny_model):
    """One out-of-memory error (oom@1: the first step of a 4-image call) halves the batch; after successful steps
    at the cap the worker probes one image more at a time, so the same call ends in full batches of 4 again
    (GenerateResponse.batch_size: the most images in one of its UNet calls) and its images are unchanged (within
    one level of 255)."""
    binary("tomeserve")
    four = request(num_images=4, num_inference_steps=50, seed=7, request_id="four")
    with running_server(["--model", tiny_model, "--max-batch-size", "4"], metrics=True) as s:
        plain = pb_grpc.ImageGeneratorStub(s.channel).Generate(four, timeout=300)
    assert plain.batch_size == 4
    args = ["--model", tiny_model, "--max-batch-size", "4", "--enable-fault-injection", "--inject-worker-fault", "oom@1"]
    with running_server(args, metrics=True) as s:
        reply = pb_grpc.ImageGeneratorStub(s.channel).Generate(four, timeout=300)
        log = s.log()
    assert reply.batch_size == 4, log
    assert "evicting the 2 most recently admitted" in log and "image cap after an out-of-memory error raised to 3" in log
    assert "raised to 4" in log, log
    # The same images within the CPU kernels' rounding: rows computed in batches of other sizes and at other row
    # positions may differ in the last float bits (tests/step_batch_test.cpp), at most one level of 255 in a
    # value and in a handful of values (measured: 1 of 12,288 per image in two of the four).
    assert len(reply.images) == len(plain.images) == 4
    for got, want in zip(reply.images, plain.images):
        a, b = (np.asarray(Image.open(io.BytesIO(i.data))).astype(int) for i in (got, want))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
        assert np.count_nonzero(a != b) <= a.size // 1000, np.count_nonzero(a != b)


def test_oom_while_encoding_text_waits_for_the_running_call(tiny_model):
    """An out-of-memory error in a call's text encoding while another call runs (text-oom@2: the second call's)
    does not fail it: it waits until the running call finished, then runs, and both calls succeed."""
    binary("tomeserve")
    args = ["--model", tiny_model, "--enable-fault-injection", "--inject-worker-fault", "text-oom@2",
            "--max-queue-delay-ms", "0"]
    with running_server(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        # The first call streams: once it reports progress it is running, and the second call is admitted next to it.
        first = stub.GenerateStream(request(request_id="first", num_inference_steps=150), timeout=120)
        events = iter(first)
        while next(events).WhichOneof("event") != "progress":
            pass
        second = stub.Generate(request(request_id="second", prompt="another prompt"), timeout=120)
        assert len(second.images) == 1
        assert [e.result for e in events if e.WhichOneof("event") == "result"][0].images
        log = s.log()
    assert "out of memory encoding the text of a call on cpu while" in log, log


def test_hang_while_draining_is_caught_by_the_watchdog(tiny_model):
    """SIGTERM while a step hangs (stuck@3): the watchdog keeps running through the drain, fails the stuck call
    with UNAVAILABLE after --step-timeout-seconds and the process exits 3 long before --drain-timeout, instead of
    waiting for a SIGKILL."""
    binary("tomeserve")
    args = ["--model", tiny_model, "--enable-fault-injection", "--inject-worker-fault", "stuck@3",
            "--step-timeout-seconds", "3", "--drain-timeout", "120"]
    with server_under_test(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        victim = stub.Generate.future(request(request_id="victim", num_inference_steps=20), timeout=200)
        deadline = time.monotonic() + 30
        while "injected stuck step" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "injected stuck step" in s.log()
        t0 = time.monotonic()
        s.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as e:
            victim.result()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert s.process.wait(timeout=60) == 3, s.log()
        assert time.monotonic() - t0 < 60
        assert "ran past its limit" in s.log()
