"""SDXL served next to SD 1.5 (`--model sd15=DIR --model sdxl=DIR`) over real gRPC on 127.0.0.1, tiny models on
CPU: concurrent calls of both models each equal their solo runs (and `tomeserve-gen` on the same model, and the
OpenAI Images API on the same server), Token Merging on SDXL merges in its 2x-down blocks by default, settings
that would merge nothing are refused, and metrics carry the model."""
import base64
import json
import concurrent.futures as futures
import io
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import binary
from tomeserve_server import proto, running_server

pb, pb_grpc = proto()


@pytest.fixture(scope="module")
def tiny_xl_model():
    import os
    model = os.environ.get("TOMESERVE_TINY_XL_MODEL")
    if not model:
        pytest.skip("TOMESERVE_TINY_XL_MODEL not set")
    return model


def pixels(data):
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


SD = dict(model="sd15", prompt="a red boat on a lake", seed=5, num_inference_steps=12, guidance_scale=7.5)
XL = dict(model="sdxl", prompt="a lighthouse at dusk", seed=9, num_inference_steps=12, guidance_scale=5.0,
          width=128, height=96)


def test_sd15_and_sdxl_side_by_side(tiny_model, tiny_xl_model, tmp_path):
    binary("tomeserve")
    http_port = tmp_path / "http.port"
    args = ["--model", f"sd15={tiny_model}", "--model", f"sdxl={tiny_xl_model}", "--http-listen", "127.0.0.1:0",
            "--http-port-file", str(http_port)]
    with running_server(args, metrics=True) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        assert models["sdxl"].family == "sdxl" and models["sd15"].family == "sd1"
        assert list(models["sdxl"].tome_downsamples) == [2, 4]
        assert list(models["sd15"].tome_downsamples) == [1, 2, 4, 8]
        assert models["sdxl"].default_scheduler == pb.SCHEDULER_EULER
        assert (models["sdxl"].native_width, models["sdxl"].native_height) == (128, 128)

        solo_sd = stub.Generate(pb.GenerateRequest(**SD), timeout=300)
        solo_xl = stub.Generate(pb.GenerateRequest(**XL), timeout=300)
        with futures.ThreadPoolExecutor(2) as pool:
            both = [pool.submit(stub.Generate, pb.GenerateRequest(**kw), timeout=300) for kw in (SD, XL)]
            got_sd, got_xl = (f.result() for f in both)
        assert np.abs(pixels(got_sd.images[0].data) - pixels(solo_sd.images[0].data)).max() <= 1
        assert np.abs(pixels(got_xl.images[0].data) - pixels(solo_xl.images[0].data)).max() <= 1
        assert pixels(got_xl.images[0].data).shape == (96, 128, 3)
        # One batch never mixes models: each call ran with its own kind of samples only.
        assert got_sd.batch_size == 1 and got_xl.batch_size == 1

        # ToMe on SDXL with the model-aware default (max_downsample 2): it merges, in the 2x-down blocks only.
        merged = stub.Generate(pb.GenerateRequest(**XL, tome=pb.TokenMerging(ratio=0.5)), timeout=300)
        assert merged.tome.max_downsample == 2
        assert merged.merged_tokens, "ToMe on SDXL merged nothing"
        for m in merged.merged_tokens:
            assert m.block.startswith(("down_blocks.1.", "up_blocks.1.")), m.block
            assert m.tokens_after < m.tokens_before == (96 // 16) * (128 // 16)
        assert not np.array_equal(pixels(merged.images[0].data), pixels(solo_xl.images[0].data))

        # tomesd's default of 1 patches no SDXL block: refused, naming the field and the model's levels.
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(**XL, tome=pb.TokenMerging(ratio=0.5, max_downsample=1)), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tome.max_downsample is 1" in e.value.details() and "2, 4" in e.value.details()
        ok = stub.Generate(pb.GenerateRequest(**SD, tome=pb.TokenMerging(ratio=0.5, max_downsample=1)), timeout=300)
        assert ok.merged_tokens

        # The HTTP front door reaches the same model: the OpenAI Images API's image is the gRPC one.
        body = {"model": "sdxl", "prompt": XL["prompt"], "seed": 9, "size": "128x96", "num_inference_steps": 12,
                "guidance_scale": 5.0, "response_format": "b64_json"}
        req = urllib.request.Request(f"http://127.0.0.1:{http_port.read_text().strip()}/v1/images/generations",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            png = base64.b64decode(json.load(r)["data"][0]["b64_json"])
        assert np.array_equal(pixels(png), pixels(solo_xl.images[0].data))

        with urllib.request.urlopen(s.metrics_url, timeout=30) as r:
            metrics = r.read().decode()
        assert 'tomeserve_requests_total{code="OK",model="sdxl"}' in metrics, metrics[:2000]

    # The same SDXL image from the command line.
    out = tmp_path / "xl.png"
    r = subprocess.run([str(binary("tomeserve-gen")), "generate", "--model", tiny_xl_model, "--prompt", XL["prompt"],
                        "--seed", "9", "--steps", "12", "--guidance", "5", "--width", "128", "--height", "96",
                        "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.abs(pixels(out.read_bytes()) - pixels(solo_xl.images[0].data)).max() <= 1


def test_gen_cli_tome_on_sdxl(gen, tiny_xl_model, tmp_path):
    def run(*args):
        base = ["generate", "--model", tiny_xl_model, "--prompt", "a bowl of fruit", "--steps", "3", "--seed", "2",
                "-o", str(tmp_path / "o.png")]
        return subprocess.run([str(gen), *base, *map(str, args)], capture_output=True, text=True, timeout=300)

    r = run("--tome-ratio", 0.5)
    assert r.returncode == 0, r.stderr
    # 128x128: 16x16 latents, the 2x-down level has 8x8 = 64 tokens in 2 down + 3 up attentions of 2 transformer
    # blocks each, 32 merged in each block.
    assert "max_downsample=2" in r.stderr and "10 blocks, 640 -> 320 tokens" in r.stderr, r.stderr
    bad = run("--tome-ratio", 0.5, "--tome-max-downsample", 1)
    assert bad.returncode == 2
    assert "--tome-max-downsample is 1, which patches no block" in bad.stderr and "2, 4" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
