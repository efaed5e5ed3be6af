"""tomeserve over real gRPC on 127.0.0.1 with the tiny model: Generate, GenerateStream, ListModels, health,
validation (each bad input gets its status and the server keeps serving), multiple models, metrics, startup
errors. Images are 64x64 with 2-3 steps so the whole module takes seconds."""
import io
import subprocess
import urllib.request

import grpc
import pytest

from conftest import binary
from tomeserve_server import health_status, proto, running_server, server_binary

pb, pb_grpc = proto()


@pytest.fixture(scope="module")
def server(tiny_model):
    binary("tomeserve")
    with running_server(["--model", tiny_model, "--model", f"second={tiny_model}", "--max-queue-delay-ms", "0"],
                        metrics=True) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    return pb_grpc.ImageGeneratorStub(server.channel)


def request(**kw):
    kw.setdefault("prompt", "a red cube")
    kw.setdefault("num_inference_steps", 2)
    return pb.GenerateRequest(**kw)


def test_health_serving(server):
    assert health_status(server.channel) == "SERVING"
    assert health_status(server.channel, "tomeserve.v1.ImageGenerator") == "SERVING"


def test_list_models(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert set(models) == {"tiny", "second"}
    tiny = models["tiny"]
    assert (tiny.native_width, tiny.native_height) == (64, 64)
    assert tiny.default_scheduler == pb.SCHEDULER_PNDM
    assert list(tiny.devices) == ["cpu"]
    assert tiny.dtype == "fp32"
    # What a client needs before its first call: the default ratio and the request limits (the server's flags).
    assert tiny.default_tome_ratio == 0  # ToMe off unless a request asks (--default-tome-ratio)
    assert (tiny.limits.max_side, tiny.limits.max_pixels, tiny.limits.max_steps) == (1024, 1024 * 1024, 150)
    assert (tiny.limits.max_images, tiny.limits.max_prompt_tokens, tiny.limits.max_prompt_bytes) == (4, 77, 4096)


def test_generate_png_with_parameters(stub):
    from PIL import Image

    r = stub.Generate(request(seed=7, num_images=2, request_id="req-1", negative_prompt="blurry",
                              tome=pb.TokenMerging(ratio=0.3)), timeout=60)
    assert r.request_id == "req-1"
    assert r.model == "tiny"
    assert [i.seed for i in r.images] == [7, 8]
    for img in r.images:
        assert img.mime_type == "image/png"
        assert (img.width, img.height) == (64, 64)
        decoded = Image.open(io.BytesIO(img.data))
        assert decoded.size == (64, 64)
        params = decoded.info["parameters"]
        assert params.startswith("a red cube\nNegative prompt: blurry\n")
        assert f"Seed: {img.seed}" in params and "Size: 64x64" in params and "Token merging ratio: 0.3" in params
    assert r.batch_size == 2
    assert r.tome.ratio == pytest.approx(0.3)
    assert r.tome.sx == 2 and r.tome.use_rand
    assert r.merged_tokens and all(m.tokens_after < m.tokens_before for m in r.merged_tokens)
    t = r.timings
    assert t.total_seconds > 0 and t.denoising_seconds > 0
    assert t.total_seconds >= t.denoising_seconds


def test_generate_is_deterministic_and_seed_is_reported(stub):
    a = stub.Generate(request(seed=11), timeout=60)
    b = stub.Generate(request(seed=11), timeout=60)
    assert a.images[0].data == b.images[0].data
    c = stub.Generate(request(), timeout=60)  # random seed, reported back
    d = stub.Generate(request(seed=c.images[0].seed), timeout=60)
    assert c.images[0].data == d.images[0].data


def test_raw_rgb8_and_ratio_zero(stub):
    r = stub.Generate(request(output_format=pb.OUTPUT_FORMAT_RAW_RGB8, tome=pb.TokenMerging(ratio=0)), timeout=60)
    assert len(r.images[0].data) == 64 * 64 * 3
    assert r.images[0].mime_type == "application/octet-stream"
    assert not r.merged_tokens


def test_generate_stream_progress_then_result(stub):
    events = list(stub.GenerateStream(request(num_inference_steps=3, scheduler=pb.SCHEDULER_DDIM), timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result"
    assert kinds.count("result") == 1
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert progress, kinds
    assert progress[-1].step == progress[-1].num_steps == 3
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    assert all(k in ("queued", "progress") for k in kinds[:-1])
    assert len(events[-1].result.images) == 1


def test_second_model(stub):
    r = stub.Generate(request(model="second"), timeout=60)
    assert r.model == "second" and len(r.images) == 1


BAD = [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompt="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompt="cat " * 80), grpc.StatusCode.INVALID_ARGUMENT, "CLIP tokens"),
    (dict(negative_prompt="cat " * 80), grpc.StatusCode.INVALID_ARGUMENT, "negative_prompt"),
    (dict(width=100), grpc.StatusCode.INVALID_ARGUMENT, "width"),
    (dict(height=32), grpc.StatusCode.INVALID_ARGUMENT, "height"),
    (dict(width=4096), grpc.StatusCode.INVALID_ARGUMENT, "width"),
    (dict(num_inference_steps=10000), grpc.StatusCode.INVALID_ARGUMENT, "num_inference_steps"),
    (dict(num_images=50), grpc.StatusCode.INVALID_ARGUMENT, "num_images"),
    (dict(guidance_scale=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
    (dict(guidance_scale=-2), grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
    (dict(scheduler=99), grpc.StatusCode.INVALID_ARGUMENT, "scheduler"),
    (dict(tome=pb.TokenMerging(ratio=0.9)), grpc.StatusCode.INVALID_ARGUMENT, "tome.ratio"),
    (dict(tome=pb.TokenMerging(ratio=-0.5)), grpc.StatusCode.INVALID_ARGUMENT, "tome.ratio"),
    (dict(tome=pb.TokenMerging(ratio=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "tome.ratio"),
    (dict(tome=pb.TokenMerging(max_downsample=3)), grpc.StatusCode.INVALID_ARGUMENT, "tome.max_downsample"),
    (dict(tome=pb.TokenMerging(sx=40)), grpc.StatusCode.INVALID_ARGUMENT, "tome.sx"),
    (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
]


@pytest.mark.parametrize("fields,code,needle", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_server_keeps_serving(stub, fields, code, needle):
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(request(**fields), timeout=30)
        assert e.value.code() == code
        assert needle in e.value.details()
    assert len(stub.Generate(request(), timeout=60).images) == 1


def test_metrics_endpoint(server, stub):
    stub.Generate(request(tome=pb.TokenMerging(ratio=0.25)), timeout=60)
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'tomeserve_request_latency_seconds_bucket{code="OK",le="+Inf",model="tiny",resolution="<=256x256",tome_ratio="0.25"}' in text or (
        "tomeserve_request_latency_seconds_bucket" in text and 'tome_ratio="0.25"' in text)
    assert 'tomeserve_requests_total{code="INVALID_ARGUMENT",model="unknown"}' in text
    assert 'tomeserve_phase_seconds_count{model="tiny",phase="denoising"}' in text
    assert "tomeserve_batch_size_bucket" in text
    assert "tomeserve_queue_depth 0" in text


def text_cache_lookups(server):
    import re
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts = {"hit": 0.0, "miss": 0.0}
    for result, value in re.findall(
            r'^tomeserve_text_cache_lookups_total\{model="tiny",result="(hit|miss)"\} (\S+)$', text, re.M):
        counts[result] = float(value)
    return counts


def test_repeated_texts_are_cache_hits_in_metrics(server, stub):
    stub.Generate(request(prompt="a text seen twice", negative_prompt="cache-neg"), timeout=60)
    before = text_cache_lookups(server)
    assert before["miss"] >= 2  # both texts were new on the first call
    stub.Generate(request(prompt="a text seen twice", negative_prompt="cache-neg", seed=5), timeout=60)
    after = text_cache_lookups(server)
    assert after == {"hit": before["hit"] + 2, "miss": before["miss"]}, (before, after)


def unet_calls(server):
    import re
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts = {}
    for path, value in re.findall(r'^tomeserve_unet_calls_total\{device="cpu",path="(\w+)"\} (\S+)$', text, re.M):
        counts[path] = float(value)
    return counts


def test_unet_calls_are_counted_by_path(server, stub):
    # On the CPU there are no CUDA graphs: every UNet call is eager, one per DDIM step.
    before = unet_calls(server).get("eager", 0.0)
    stub.Generate(request(request_id="count-calls", num_inference_steps=3, scheduler=pb.SCHEDULER_DDIM), timeout=60)
    after = unet_calls(server)
    assert after.get("eager", 0.0) - before == 3, (before, after)
    assert "graph" not in after and "capture" not in after


def test_log_has_one_line_per_request(server, stub):
    stub.Generate(request(request_id="log-me"), timeout=60)
    lines = [l for l in server.log().splitlines() if "id=log-me" in l]
    assert len(lines) == 1
    assert "batch_size=1" in lines[0] and "status=OK" in lines[0] and "model=tiny" in lines[0]


def test_usage_error_exits_2():
    b = server_binary()
    if not b.exists():
        pytest.skip("tomeserve not built")
    p = subprocess.run([str(b), "--model", "/x", "--max-batch-size", "zero"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "--max-batch-size" in p.stderr
    h = subprocess.run([str(b), "--help"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "--inject-oom-above-batch" in h.stdout


@pytest.mark.parametrize("flag,value", [("--encode-threads", "17"), ("--encode-threads", "-2")])
def test_out_of_range_flag_names_the_flag_and_range(flag, value):
    b = server_binary()
    if not b.exists():
        pytest.skip("tomeserve not built")
    p = subprocess.run([str(b), "--model", "/x", flag, value], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and flag in p.stderr and "-1 (auto) to 16" in p.stderr, p.stderr


def test_missing_model_folder_fails_fast(tmp_path):
    b = server_binary()
    if not b.exists():
        pytest.skip("tomeserve not built")
    missing = tmp_path / "no_such_model"
    p = subprocess.run([str(b), "--model", str(missing), "--listen", "127.0.0.1:0"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    errors = [l for l in p.stderr.splitlines() if "startup failed" in l]
    assert len(errors) == 1 and str(missing) in errors[0]
