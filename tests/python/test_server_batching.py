"""Request-level batching (--batching request, the pre-step-level mode kept for comparison) and the
out-of-memory path over real gRPC with the tiny model.

Request-mode batches are made deterministic without timing assertions: the queue delay is long (30 s) and
max-batch-size equals the number of concurrent same-key requests, so a batch is dispatched the moment it is
full; requests with different ToMe ratios can never fill each other's batch, so they are released by the delay
only if the test waits for it (it does not: each ratio group is exactly one full batch)."""
import concurrent.futures as futures
import urllib.request

import grpc
import pytest

from conftest import binary
from tomeserve_server import health_status, proto, running_server

pb, pb_grpc = proto()


def request(**kw):
    kw.setdefault("prompt", "a blue sphere")
    kw.setdefault("num_inference_steps", 2)
    return pb.GenerateRequest(**kw)


def run_concurrently(stub, requests):
    with futures.ThreadPoolExecutor(len(requests)) as pool:
        calls = [pool.submit(stub.Generate, r, timeout=120) for r in requests]
        return [c.result() for c in calls]


def test_same_key_batched_different_ratios_not_mixed(tiny_model):
    binary("tomeserve")
    with running_server(["--model", tiny_model, "--batching", "request", "--max-batch-size", "4",
                         "--max-queue-delay-ms", "30000"]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        # Four requests, one key: one batch of four, prompts and seeds differ freely within it.
        same = run_concurrently(stub, [request(prompt=f"prompt {i}", seed=i, guidance_scale=5 + i,
                                               tome=pb.TokenMerging(ratio=0.5)) for i in range(4)])
        assert [r.batch_size for r in same] == [4, 4, 4, 4]
        assert [r.images[0].seed for r in same] == [0, 1, 2, 3]
        # Two ratios, two requests of two images each: each ratio fills its own batch of four, never mixed.
        mixed = run_concurrently(stub, [request(num_images=2, seed=10 * i, tome=pb.TokenMerging(ratio=ratio))
                                        for i, ratio in enumerate([0.3, 0.5, 0.3, 0.5])])
        for r, ratio in zip(mixed, [0.3, 0.5, 0.3, 0.5]):
            assert r.batch_size == 4
            assert r.tome.ratio == pytest.approx(ratio)
        # A batched image equals the same request run alone (batch-invariant noise and ToMe partitions).
        alone_server_args = ["--model", tiny_model, "--max-queue-delay-ms", "0"]
    with running_server(alone_server_args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        alone = stub.Generate(request(prompt="prompt 2", seed=2, guidance_scale=7, tome=pb.TokenMerging(ratio=0.5)),
                              timeout=120)
        assert alone.batch_size == 1
        # PNG bytes can differ only through the pixels: compare the decoded pixels within 1 level (float
        # reductions over a different batch size may round differently).
        import io

        import numpy as np
        from PIL import Image

        a = np.asarray(Image.open(io.BytesIO(alone.images[0].data)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(same[2].images[0].data)), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def metric(text, name):
    """The value of an unlabelled sample `name` in Prometheus text."""
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))


@pytest.mark.parametrize("batching", ["request", "step"])
def test_injected_oom_evicts_keeps_state_and_answers_every_call(tiny_model, batching):
    binary("tomeserve")
    args = ["--model", tiny_model, "--batching", batching, "--max-batch-size", "4", "--max-queue-delay-ms",
            "30000", "--enable-fault-injection", "--inject-oom-above-batch", "1"]
    with running_server(args, metrics=True) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        responses = run_concurrently(stub, [request(seed=i, scheduler=pb.SCHEDULER_DDIM,
                                                    tome=pb.TokenMerging(ratio=0.5)) for i in range(4)])
        assert all(len(r.images) == 1 for r in responses)
        # Only UNet calls of one image succeed; every image still comes back.
        assert [r.batch_size for r in responses] == [1, 1, 1, 1]
        text = urllib.request.urlopen(s.metrics_url, timeout=10).read().decode()
        # No step is computed twice: 4 guided images x 2 steps x 2 rows, whatever was evicted and when.
        assert metric(text, "tomeserve_unet_rows_sum") == 16
        oom = [l for l in text.splitlines() if l.startswith("tomeserve_oom_total{")]
        # Bounded labels: the ratio with two decimals, the resolution as a pixel-count bucket. How many OOMs
        # depends on how the four calls arrived (one batch of 4: 4 -> evict 2 -> 2 -> evict 1 -> 1 = 2 OOMs).
        assert len(oom) == 1 and oom[0].startswith('tomeserve_oom_total{model="tiny",resolution="<=256x256",tome_ratio="0.50"}')
        assert metric(text, "tomeserve_oom_evictions_total") >= 1
        if batching == "request":
            assert oom[0].endswith(" 2"), oom
            assert "out of memory for a batch of 4" in s.log()


def test_single_image_that_does_not_fit_alone_gets_resource_exhausted(tiny_model):
    binary("tomeserve")
    # 0 fails every UNet batch, single images included; the warm-up is not affected (the server starts).
    args = ["--model", tiny_model, "--max-queue-delay-ms", "0", "--enable-fault-injection",
            "--inject-oom-above-batch", "0"]
    with running_server(args, metrics=True) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(request_id="too-big", tome=pb.TokenMerging(ratio=0.5)), timeout=120)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "does not fit even alone" in e.value.details(), e.value.details()
        # The server keeps serving.
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models] == ["tiny"]
        assert health_status(s.channel) == "SERVING"
        text = urllib.request.urlopen(s.metrics_url, timeout=10).read().decode()
        oom = [l for l in text.splitlines() if l.startswith("tomeserve_oom_total{")]
        assert oom == ['tomeserve_oom_total{model="tiny",resolution="<=256x256",tome_ratio="0.50"} 1'], oom
        assert 'tomeserve_requests_total{code="RESOURCE_EXHAUSTED",model="tiny"} 1' in text
