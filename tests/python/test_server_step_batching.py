"""Step-level batching (--batching step, the default) over real gRPC on 127.0.0.1 with the tiny model on CPU.

No assertion depends on how fast the machine is: a "long" call has so many more steps than a "short" one that the
short one, joining at the next step boundary, must end first; ordering is read from the server's log (one line
per finished call, written when it finishes). Images are compared with their solo runs within 1 level of 255
(the CPU kernels' float rounding depends on the batch's row count; see tests/step_batch_test.cpp)."""
import concurrent.futures as futures
import io
import random
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import binary
from tomeserve_server import health_status, proto, running_server

pb, pb_grpc = proto()


def pixels(image):
    return np.asarray(Image.open(io.BytesIO(image.data)), dtype=np.int16)


def finished_order(log, ids):
    """Request ids in the order their calls finished (the server logs one line per finished call)."""
    order = []
    for line in log.splitlines():
        for rid in ids:
            if f" id={rid} " in line and rid not in order:
                order.append(rid)
    return order


def first_progress(stream):
    for e in stream:
        if e.WhichOneof("event") == "progress":
            return e
    raise AssertionError("stream ended before a progress event")


LONG = dict(prompt="a long call", seed=1, num_inference_steps=120, guidance_scale=7.5,
            scheduler=pb.SCHEDULER_PNDM, tome=pb.TokenMerging(ratio=0.5))
SHORT = dict(prompt="a short call", seed=2, num_inference_steps=4, guidance_scale=1.0,
             scheduler=pb.SCHEDULER_EULER_ANCESTRAL, tome=pb.TokenMerging(ratio=0.3, max_downsample=2))


def test_short_call_overtakes_long_one_and_both_equal_their_solo_runs(tiny_model):
    binary("tomeserve")
    args = ["--model", tiny_model, "--max-steps", "150"]
    with running_server(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        long_stream = stub.GenerateStream(pb.GenerateRequest(request_id="long", **LONG), timeout=600)
        first_progress(long_stream)  # running
        short = stub.Generate(pb.GenerateRequest(request_id="short", **SHORT), timeout=600)
        events = list(long_stream)
        long = events[-1].result
        assert finished_order(s.log(), ["short", "long"]) == ["short", "long"], s.log()
        # They shared UNet calls: different steps, scheduler, guidance and ToMe settings in one batch.
        assert short.batch_size == 2 and long.batch_size == 2
        assert short.tome.ratio == pytest.approx(0.3) and long.tome.ratio == pytest.approx(0.5)
        progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
        assert progress[-1].step == progress[-1].num_steps == 121  # PNDM: steps + 1 UNet calls, its own count

        solo_short = stub.Generate(pb.GenerateRequest(**SHORT), timeout=600)
        solo_long = stub.Generate(pb.GenerateRequest(**LONG), timeout=600)
        assert solo_short.batch_size == 1 and solo_long.batch_size == 1
        assert np.abs(pixels(short.images[0]) - pixels(solo_short.images[0])).max() <= 1
        assert np.abs(pixels(long.images[0]) - pixels(solo_long.images[0])).max() <= 1


def test_lone_call_on_idle_server_does_not_wait_for_batch_mates(tiny_model):
    binary("tomeserve")
    # A 30 s batching delay would hold a lone call in request mode; step mode starts it at once.
    with running_server(["--model", tiny_model, "--max-queue-delay-ms", "30000"]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        r = stub.Generate(pb.GenerateRequest(prompt="alone", num_inference_steps=2), timeout=120)
        assert r.timings.queue_seconds < 1.0, r.timings


def test_calls_joining_and_leaving_at_random_steps_equal_their_solo_runs(tiny_model):
    """Seeded random arrivals with mixed settings, some cancelled mid-run and some with deadlines that pass:
    every call that completes equals its solo run; the others end CANCELLED / DEADLINE_EXCEEDED."""
    binary("tomeserve")
    rng = random.Random(9)
    schedulers = [pb.SCHEDULER_PNDM, pb.SCHEDULER_DDIM, pb.SCHEDULER_EULER, pb.SCHEDULER_EULER_ANCESTRAL,
                  pb.SCHEDULER_DPMPP_2M_KARRAS]
    calls = []
    for i in range(10):
        calls.append(dict(
            request=pb.GenerateRequest(
                request_id=f"c{i}", prompt=f"call {i}", seed=100 + i,
                # Cancelled calls are long, so the cancel always lands mid-run.
                num_inference_steps=150 if i in (3, 7) else rng.randint(10, 40),
                guidance_scale=rng.choice([1.0, 4.0, 7.5]), scheduler=rng.choice(schedulers),
                num_images=rng.choice([1, 1, 2]),
                tome=pb.TokenMerging(ratio=rng.choice([0.0, 0.3, 0.5]))),
            delay=rng.uniform(0, 0.15), cancel=(i in (3, 7)), deadline=(i == 5)))
    with running_server(["--model", tiny_model, "--max-batch-size", "6"]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)

        def run(c):
            time.sleep(c["delay"])
            if c["cancel"]:
                stream = stub.GenerateStream(c["request"], timeout=600)
                first_progress(stream)
                stream.cancel()
                return "cancelled"
            try:
                return stub.Generate(c["request"], timeout=0.05 if c["deadline"] else 600)
            except grpc.RpcError as e:
                return e.code()

        with futures.ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(run, calls))
        batched = [r for r in results if isinstance(r, pb.GenerateResponse)]
        assert len(batched) == 7, results
        assert results[5] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert max(r.batch_size for r in batched) > 1  # some really shared UNet calls
        for c, r in zip(calls, results):
            if not isinstance(r, pb.GenerateResponse):
                continue
            solo = stub.Generate(c["request"], timeout=600)
            for a, b in zip(r.images, solo.images):
                assert a.seed == b.seed
                assert np.abs(pixels(a) - pixels(b)).max() <= 1, c["request"].request_id
        log = s.log()
        for rid in ("c3", "c7"):
            assert [l for l in log.splitlines() if f"id={rid} " in l and "status=CANCELLED" in l], log


def test_queued_event_carries_estimates(tiny_model):
    binary("tomeserve")
    with running_server(["--model", tiny_model, "--max-batch-size", "1", "--max-steps", "600"]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        long_stream = stub.GenerateStream(pb.GenerateRequest(prompt="long", num_inference_steps=600), timeout=600)
        first_progress(long_stream)
        queued = stub.GenerateStream(pb.GenerateRequest(prompt="queued", num_inference_steps=10), timeout=600)
        event = next(e for e in queued if e.WhichOneof("event") == "queued").queued
        # The warm-up measured steps, so there are estimates; the call waits behind most of 600 steps.
        assert event.HasField("estimated_start_seconds") and event.HasField("estimated_finish_seconds")
        assert 0 < event.estimated_start_seconds < event.estimated_finish_seconds
        long_stream.cancel()
        assert list(queued)[-1].WhichOneof("event") == "result"


def test_slo_controller_raises_the_ratio_only_when_the_target_needs_it(tiny_model):
    """At 320x320 the tiny model's steps get clearly cheaper with ToMe (its first block has 1600 tokens; measured
    1.3-1.7x at ratios 0.3-0.5). The server learns that from its own steps: after calls at ratio 0 and 0.75, a
    target under the ratio-0 prediction makes the controller pick a ratio above the minimum; a loose target keeps
    the minimum."""
    binary("tomeserve")
    with running_server(["--model", tiny_model, "--max-batch-size", "1"]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        base = dict(prompt="slo", width=320, height=320, num_inference_steps=8, guidance_scale=7.5)
        for _ in range(2):
            for ratio in (0.0, 0.75):
                stub.Generate(pb.GenerateRequest(tome=pb.TokenMerging(ratio=ratio, max_downsample=1), **base),
                              timeout=600)
        loose = stub.Generate(pb.GenerateRequest(tome=pb.TokenMerging(ratio=0.0, max_ratio=0.75),
                                                 latency_target_seconds=600, **base), timeout=600)
        assert loose.tome.ratio == 0.0 and loose.slo.target_met
        assert loose.slo.predicted_seconds > 0
        # A target under the ratio-0 prediction: only a higher ratio meets it.
        target = loose.slo.predicted_seconds * 0.85
        tight = stub.Generate(pb.GenerateRequest(tome=pb.TokenMerging(ratio=0.0, max_ratio=0.75),
                                                 latency_target_seconds=target, **base), timeout=600)
        assert tight.tome.ratio > 0.0, tight.slo
        assert tight.slo.latency_target_seconds == pytest.approx(target)
        assert tight.slo.min_ratio == 0.0 and tight.slo.max_ratio == pytest.approx(0.75)
        # An impossible target: max_ratio, and the response says the target was not met.
        impossible = stub.Generate(pb.GenerateRequest(tome=pb.TokenMerging(ratio=0.0, max_ratio=0.75),
                                                      latency_target_seconds=1e-4, **base), timeout=600)
        assert impossible.tome.ratio == pytest.approx(0.75) and not impossible.slo.target_met


ENCODED = [dict(request_id=f"e{i}", prompt=f"encode {i}", seed=300 + 10 * i, num_inference_steps=2 + i % 3,
                num_images=1 + i % 3, scheduler=pb.SCHEDULER_DDIM) for i in range(5)]


def test_images_encoded_on_the_pool_equal_inline_ones_and_none_is_lost(tiny_model):
    """--encode-threads 2 (the GPU default) encodes finished images off the worker thread while the batch goes on.
    Run one after another, each call's PNG bytes equal those encoded on the worker thread (--encode-threads 0);
    run together with one call cancelled mid-way, every other call gets all its images, each with its own seed."""
    binary("tomeserve")
    results = {}
    for threads in (0, 2):
        with running_server(["--model", tiny_model, "--encode-threads", str(threads)]) as s:
            stub = pb_grpc.ImageGeneratorStub(s.channel)
            results[threads] = [stub.Generate(pb.GenerateRequest(**r), timeout=120) for r in ENCODED]
            if not threads:
                continue
            cancelled = stub.GenerateStream(pb.GenerateRequest(request_id="gone", prompt="cancel me", seed=9,
                                                               num_inference_steps=60, num_images=2), timeout=120)
            first_progress(cancelled)
            with futures.ThreadPoolExecutor(len(ENCODED)) as pool:
                calls = [pool.submit(stub.Generate, pb.GenerateRequest(**r), timeout=120) for r in ENCODED]
                cancelled.cancel()
                together = [c.result() for c in calls]
            for req, res in zip(ENCODED, together):
                assert [im.seed for im in res.images] == [req["seed"] + k for k in range(req["num_images"])]
                assert all(Image.open(io.BytesIO(im.data)).size == (64, 64) for im in res.images)
            assert health_status(s.channel) == "SERVING"
            assert "internal error" not in s.log()
    for inline, pooled in zip(results[0], results[2]):
        assert [im.data for im in pooled.images] == [im.data for im in inline.images]
        assert [im.seed for im in pooled.images] == [im.seed for im in inline.images]


# A long call of the native size, and a short call of another size with a latency target: more urgent (its due
# time is its target; a best-effort call's is 4x its unloaded latency), so with two running batches allowed the
# worker opens a second batch for it and steps that one first; with one, it waits for the long batch to drain.
OTHER_SIZE = dict(prompt="another size", seed=3, num_inference_steps=4, guidance_scale=7.5, width=96, height=96,
                  scheduler=pb.SCHEDULER_DDIM, latency_target_seconds=0.5)


@pytest.mark.parametrize("batches,order", [(2, ["other", "long"]), (1, ["long", "other"])])
def test_a_more_urgent_call_of_another_size_runs_beside_the_long_batch(tiny_model, batches, order):
    binary("tomeserve")
    args = ["--model", tiny_model, "--max-steps", "150", "--max-running-batches", str(batches)]
    with running_server(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        long_stream = stub.GenerateStream(pb.GenerateRequest(request_id="long", **LONG), timeout=600)
        first_progress(long_stream)  # running
        other = stub.Generate(pb.GenerateRequest(request_id="other", **OTHER_SIZE), timeout=600)
        long = list(long_stream)[-1].result
        assert finished_order(s.log(), ["other", "long"]) == order, s.log()
        # Separate batches: neither shared a UNet call, and each image equals its solo run.
        assert other.batch_size == 1 and long.batch_size == 1
        solo = stub.Generate(pb.GenerateRequest(**OTHER_SIZE), timeout=600)
        assert np.abs(pixels(other.images[0]) - pixels(solo.images[0])).max() <= 1


def test_two_cpu_workers_serve_two_calls_at_once(tiny_model):
    binary("tomeserve")
    # One image per UNet batch: two calls can only run at once on two workers.
    args = ["--model", tiny_model, "--max-steps", "150", "--devices", "cpu:0,cpu:1", "--max-batch-size", "1"]
    with running_server(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        with futures.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(stub.Generate, pb.GenerateRequest(request_id=f"w{i}", **dict(LONG, seed=i)),
                                 timeout=600) for i in range(2)]
            results = [c.result() for c in calls]
        # Neither queued behind the other (on one worker the second would wait the first's whole denoise).
        for r in results:
            assert r.batch_size == 1
            assert r.timings.queue_seconds < 0.5 * min(x.timings.denoising_seconds for x in results), r.timings
        assert "worker 0 on cpu:0" in s.log() and "worker 1 on cpu:1" in s.log(), s.log()
