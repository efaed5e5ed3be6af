"""Queue bound, cancellation, deadlines, health transitions and SIGTERM draining over real gRPC (tiny model).

A "long" request (many steps on one worker, max-batch-size 1) holds the only worker; the test waits for its
first progress event (so it is running, not queued) before queueing more. No assertion depends on how fast the
machine is: the long request would take far longer than any timeout used while it is cancelled."""
import subprocess
import threading
import time

import grpc
import pytest

from conftest import binary
from tomeserve_server import health_status, proto, running_server, server_under_test

pb, pb_grpc = proto()

LONG_STEPS = 900  # tens of seconds on the tiny model: never allowed to finish in these tests


def request(**kw):
    kw.setdefault("prompt", "a green cone")
    kw.setdefault("num_inference_steps", 2)
    return pb.GenerateRequest(**kw)


def generate_when_room(stub, req, timeout=60):
    """Generate, retrying while the queue is still full (a call that just ended may hold its place for a
    moment until the scheduler removes it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return stub.Generate(req, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def first_event(stream, kind):
    """Reads events until one of `kind` arrives; returns it."""
    for e in stream:
        if e.WhichOneof("event") == kind:
            return e
    raise AssertionError(f"stream ended before a {kind} event")


@pytest.fixture
def one_slot_server(tiny_model):
    binary("tomeserve")
    args = ["--model", tiny_model, "--max-batch-size", "1", "--max-queue-delay-ms", "0", "--max-queue-size", "1",
            "--max-steps", str(LONG_STEPS)]
    with running_server(args) as s:
        yield s


def test_full_queue_cancel_frees_slot_and_deadline_while_queued(one_slot_server):
    stub = pb_grpc.ImageGeneratorStub(one_slot_server.channel)
    running = stub.GenerateStream(request(num_inference_steps=LONG_STEPS, request_id="long"), timeout=300)
    first_event(running, "progress")  # the worker is busy with it

    queued = stub.GenerateStream(request(request_id="queued"), timeout=300)
    assert first_event(queued, "queued").queued.position == 0  # fills the queue (size 1)

    with pytest.raises(grpc.RpcError) as full:
        stub.Generate(request(), timeout=30)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max-queue-size" in full.value.details()

    # A queued call whose client goes away leaves the queue without running.
    queued.cancel()
    # A queued call whose deadline passes never starts (DEADLINE_EXCEEDED, from the client or the server).
    deadline = time.monotonic() + 30
    while True:
        try:
            stub.Generate(request(request_id="expires"), timeout=0.5)
            raise AssertionError("a call queued behind the long one finished")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                break
            # The cancelled call may still hold the queue slot for a moment.
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.05)

    # Cancelling the running call frees the worker at its next step: a new call completes long before the
    # thousand-step call could have.
    running.cancel()
    r = generate_when_room(stub, request(request_id="after"))
    assert len(r.images) == 1

    # A deadline that passes while the call runs stops it at the next step and frees the worker.
    with pytest.raises(grpc.RpcError) as late:
        stub.Generate(request(num_inference_steps=LONG_STEPS, request_id="late"), timeout=2)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(generate_when_room(stub, request(request_id="after-late")).images) == 1

    log = one_slot_server.log()
    lines = log.splitlines()
    # The queued call and the running one were both cancelled by their clients: each has its own line saying so.
    assert [l for l in lines if "id=queued " in l and "status=CANCELLED" in l], log
    assert [l for l in lines if "id=long " in l and "status=CANCELLED" in l], log
    # The server ends them as DEADLINE_EXCEEDED, or as CANCELLED when gRPC's own deadline timer cancelled the
    # call a moment before the server's check saw the deadline pass.
    for rid in ("expires", "late"):
        ended = [l for l in log.splitlines() if f"id={rid} " in l and "RESOURCE_EXHAUSTED" not in l]
        assert len(ended) == 1 and ("DEADLINE_EXCEEDED" in ended[0] or "CANCELLED" in ended[0]), ended
    # The cancelled and expired calls ended at a step boundary, long before their 900 steps.
    assert not [l for l in log.splitlines() if ("id=long" in l or "id=late" in l) and "status=OK" in l]


def test_cancelled_call_leaves_its_batch_the_other_continues(tiny_model):
    binary("tomeserve")
    # Two calls run in one batch: the second, much shorter, joins the first at a step boundary (on a CPU the
    # batching policy lets a short call join a long one's batch; one of equal length would wait). 60 steps take
    # far longer than a cancel needs to land, so it lands mid-run.
    args = ["--model", tiny_model, "--max-batch-size", "2", "--max-queue-delay-ms", "30000"]
    with running_server(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        tome = dict(tome=pb.TokenMerging(ratio=0.5))
        cancelled = stub.GenerateStream(request(request_id="cancel-me", seed=1, num_inference_steps=60, **tome),
                                        timeout=300)
        first_event(cancelled, "progress")
        kept = stub.GenerateStream(request(request_id="keep-me", seed=2, num_inference_steps=15, **tome), timeout=300)
        # Step-level batching: keep-me joins at a step boundary; once it has made a step, both shared a UNet call.
        first_progress = first_event(kept, "progress")
        cancelled.cancel()
        events = [first_progress] + list(kept)
        assert events[-1].WhichOneof("event") == "result"
        result = events[-1].result
        assert result.batch_size == 2 and len(result.images) == 1
        progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
        assert progress and progress[-1].step == progress[-1].num_steps
        # The cancelled call ended at a step boundary, not with the batch.
        lines = s.log().splitlines()
        assert [l for l in lines if "id=cancel-me " in l and "status=CANCELLED" in l], s.log()
        assert [l for l in lines if "id=keep-me " in l and "batch_size=2" in l and "status=OK" in l], s.log()


def test_sigterm_drains_in_flight_call(tiny_model):
    binary("tomeserve")
    args = ["--model", tiny_model, "--max-queue-delay-ms", "0", "--drain-timeout", "120"]
    with server_under_test(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        stream = stub.GenerateStream(request(num_inference_steps=40, request_id="inflight"), timeout=300)
        first_event(stream, "progress")
        s.process.send_signal(15)
        rest = list(stream)  # the call completes although the server is draining
        assert rest[-1].WhichOneof("event") == "result"
        assert len(rest[-1].result.images) == 1
        assert s.process.wait(timeout=120) == 0
        assert "draining" in s.log()


def test_drain_timeout_cancels_what_cannot_finish_and_exits_0(tiny_model):
    binary("tomeserve")
    args = ["--model", tiny_model, "--max-queue-delay-ms", "0", "--max-steps", str(LONG_STEPS), "--drain-timeout", "2"]
    with server_under_test(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        stream = stub.GenerateStream(request(num_inference_steps=LONG_STEPS, request_id="too-long"), timeout=300)
        first_event(stream, "progress")
        started = time.monotonic()
        s.process.send_signal(15)
        # The call cannot finish within the 2 s drain: it is cancelled and stops at its next step boundary...
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), e.value
        # ...and the server exits 0 long before the 900 steps would have taken.
        assert s.process.wait(timeout=120) == 0
        assert time.monotonic() - started < 60
        assert "draining" in s.log()


def test_shutdown_grace_reports_not_serving_while_still_answering(tiny_model):
    binary("tomeserve")
    # The grace (8 s) is well beyond the 6 s allowed for seeing NOT_SERVING, so the call below still finds the
    # listener open on a loaded machine.
    args = ["--model", tiny_model, "--max-queue-delay-ms", "0", "--shutdown-grace", "8"]
    with server_under_test(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        s.process.send_signal(15)
        # A load balancer polling health sees NOT_SERVING while the listener is still open...
        assert wait_for_health(s.channel, "NOT_SERVING", timeout=6)[-1] == "NOT_SERVING"
        # ...and a call that arrives in that window is still served.
        assert len(stub.Generate(request(request_id="in-grace"), timeout=60).images) == 1
        assert s.process.wait(timeout=120) == 0
        assert "closing the listener in" in s.log()


def wait_for_health(channel, wanted, timeout=300):
    """Polls Health/Check until it answers `wanted` (a status or a tuple of them); returns every distinct status
    seen, in order."""
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = health_status(channel, timeout=5)
        except grpc.RpcError:
            time.sleep(0.05)
            continue
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in wanted:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"health never became {wanted}; saw {seen}")


def test_health_not_serving_until_warm_then_serving(tiny_model):
    binary("tomeserve")
    # A longer warm-up keeps the server NOT_SERVING long enough to observe it.
    with server_under_test(["--model", tiny_model, "--warmup-steps", "150"], wait_serving=False) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        # Only what was actually observed is asserted: a fast machine may be SERVING before the first check.
        first = wait_for_health(s.channel, ("NOT_SERVING", "SERVING"))[0]
        if first == "NOT_SERVING":
            # Loading: calls answer UNAVAILABLE -- unless the warm-up ended in between, then the call succeeds.
            try:
                assert len(stub.Generate(request(), timeout=60).images) == 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        seen = wait_for_health(s.channel, "SERVING")
        # Never back to NOT_SERVING once SERVING.
        assert seen in (["SERVING"], ["NOT_SERVING", "SERVING"]), seen
        assert len(stub.Generate(request(), timeout=60).images) == 1
        assert s.stop(timeout=120) == 0


def test_sigterm_while_loading_exits_0(tiny_model):
    binary("tomeserve")
    args = ["--model", tiny_model, "--warmup-steps", str(LONG_STEPS)]
    with server_under_test(args, wait_serving=False) as s:
        wait_for_health(s.channel, "NOT_SERVING")
        assert s.stop(timeout=300) == 0
