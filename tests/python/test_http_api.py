"""The HTTP front door (--http-listen) against a real server on 127.0.0.1 with the tiny model: the real `openai`
and `webuiapi` clients get images byte-identical to gRPC's for the same request and seed, and `openai` raises its
own error classes; Open WebUI- and SillyTavern-shaped bodies are answered; bad input gets the right code and a
message naming the field, and the server stays healthy; /sdapi/v1/progress follows a running job and
/sdapi/v1/interrupt ends it; the playground page generates two ratios in headless Chromium."""
import base64
import io
import json
import re
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import openai
import pytest
import requests
import webuiapi
from PIL import Image

from tomeserve_server import proto, running_server

pb, pb_grpc = proto()

TOKEN = "tok-http-7c1d"
SLOW_TOKEN = "tok-http-slow-42"  # one call per 100 s: the second is refused (429)


def http_args(tmp: Path, *extra):
    return ["--http-listen", "127.0.0.1:0", "--http-port-file", str(tmp / "http.port"), *extra]


def http_url(tmp: Path) -> str:
    return f"http://127.0.0.1:{(tmp / 'http.port').read_text().strip()}"


@pytest.fixture(scope="module")
def server(tiny_model):
    tmp = Path(tempfile.mkdtemp(prefix="tomeserve_http_"))
    with running_server(["--model", tiny_model, *http_args(tmp)], metrics=True) as s:
        s.http = http_url(tmp)
        yield s


def grpc_images(server, **fields):
    stub = pb_grpc.ImageGeneratorStub(server.channel)
    tome = fields.pop("tome", None)
    request = pb.GenerateRequest(**fields)
    if tome is not None:
        request.tome.ratio = tome
    return [image.data for image in stub.Generate(request, timeout=120).images]


def test_openai_client_gets_the_grpc_images(server):
    client = openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        model="tiny", prompt="a red fox in snow", n=2, size="64x64", response_format="b64_json",
        extra_body={"num_inference_steps": 3, "seed": 7, "negative_prompt": "blurry", "guidance_scale": 6.0,
                    "scheduler": "euler_a", "tome": {"ratio": 0.5}})
    http = [base64.b64decode(d.b64_json) for d in result.data]
    assert [d.revised_prompt for d in result.data] == ["a red fox in snow"] * 2
    assert isinstance(result.created, int)
    details = result.model_extra["tomeserve"]
    assert details["seeds"] == [7, 8] and details["tome"]["ratio"] == 0.5 and details["model"] == "tiny"
    assert details["timings"]["denoising_seconds"] > 0
    grpc = grpc_images(server, prompt="a red fox in snow", num_images=2, width=64, height=64, num_inference_steps=3,
                       seed=7, negative_prompt="blurry", guidance_scale=6.0,
                       scheduler=pb.SCHEDULER_EULER_ANCESTRAL, tome=0.5)
    assert http == grpc  # byte-identical PNGs
    assert Image.open(io.BytesIO(http[0])).size == (64, 64)


def test_openai_client_raises_its_own_errors(server, tiny_model):
    client = openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", size="65x64", response_format="b64_json")
    assert e.value.status_code == 400 and e.value.body["param"] == "size" and "multiple of 8" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", response_format="url")
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="a cat", response_format="b64_json")
    assert "dall-e-3" in e.value.message and "tiny" in e.value.message

    tmp = Path(tempfile.mkdtemp(prefix="tomeserve_http_auth_"))
    tokens = tmp / "tokens"
    tokens.write_text(f"{TOKEN} tenant=a\n{SLOW_TOKEN} tenant=slow calls_per_second=0.01\n")
    with running_server(["--model", tiny_model, "--auth-token-file", tokens, *http_args(tmp)]) as s:
        url = http_url(tmp)
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-token", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.images.generate(prompt="a cat", size="64x64", response_format="b64_json")
        r = requests.post(f"{url}/v1/images/generations", json={"prompt": "a cat"}, timeout=10)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "authentication_error"
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200  # probes need no token
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        ok = good.images.generate(prompt="a cat", size="64x64", response_format="b64_json",
                                  extra_body={"num_inference_steps": 2})
        assert len(ok.data) == 1
        slow = openai.OpenAI(base_url=f"{url}/v1", api_key=SLOW_TOKEN, max_retries=0)
        slow.images.generate(prompt="a cat", size="64x64", response_format="b64_json",
                             extra_body={"num_inference_steps": 2})
        with pytest.raises(openai.RateLimitError) as e:
            slow.images.generate(prompt="a cat", size="64x64", response_format="b64_json",
                                 extra_body={"num_inference_steps": 2})
        assert e.value.status_code == 429
        # A1111 clients send HTTP Basic; the password is the token.
        api = webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))
        api.set_auth("anyone", TOKEN)
        assert api.get_sd_models()[0]["title"] == "tiny"
        assert TOKEN not in s.log() and SLOW_TOKEN not in s.log()


def test_webuiapi_client_gets_the_grpc_images(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(server.http.rsplit(":", 1)[1]))
    result = api.txt2img(prompt="a lighthouse at dusk", negative_prompt="people", seed=11, steps=3, width=64,
                         height=64, cfg_scale=7, batch_size=2, sampler_name="DPM++ 2M", scheduler="karras",
                         override_settings={"token_merging_ratio": 0.5})
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    info = result.info
    assert info["seed"] == 11 and info["all_seeds"] == [11, 12]
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert info["cfg_scale"] == 7 and info["steps"] == 3 and (info["width"], info["height"]) == (64, 64)
    assert info["token_merging_ratio"] == 0.5
    assert "Token merging ratio: 0.5" in info["infotexts"][0] and "Seed: 12" in info["infotexts"][1]
    grpc = grpc_images(server, prompt="a lighthouse at dusk", negative_prompt="people", seed=11, num_images=2,
                       width=64, height=64, num_inference_steps=3, guidance_scale=7,
                       scheduler=pb.SCHEDULER_DPMPP_2M_KARRAS, tome=0.5)
    assert [base64.b64decode(i) for i in result.json["images"]] == grpc
    # seed -1: the server draws one and reports it.
    random_seed = api.txt2img(prompt="a lighthouse", seed=-1, steps=2, width=64, height=64).info["seed"]
    assert isinstance(random_seed, int) and random_seed >= 0


def test_bodies_shaped_like_open_webui_and_sillytavern(server):
    url = server.http
    # Open WebUI, OpenAI engine.
    r = requests.post(f"{url}/v1/images/generations", timeout=60,
                      json={"model": "tiny", "prompt": "a boat", "n": 1, "size": "64x64",
                            "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1
    # Open WebUI, AUTOMATIC1111 engine: options, models, then txt2img.
    assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"] == "tiny"
    assert [m["title"] for m in requests.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()] == ["tiny"]
    r = requests.post(f"{url}/sdapi/v1/txt2img", timeout=60,
                      json={"prompt": "a boat", "batch_size": 1, "width": 64, "height": 64, "steps": 2,
                            "negative_prompt": ""})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    # SillyTavern.
    body = {"prompt": "a boat", "negative_prompt": "lowres", "sampler_name": "Euler a", "scheduler": "Automatic",
            "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "seed": 3, "restore_faces": False,
            "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "hr_second_pass_steps": 0,
            "denoising_strength": 0.7, "clip_skip": 1, "save_images": True, "send_images": True,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
            "override_settings_restore_afterwards": True}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [3] and r.json()["parameters"] == body
    assert requests.get(f"{url}/sdapi/v1/scripts", timeout=10).json() == {"txt2img": [], "img2img": []}
    samplers = [s["name"] for s in requests.get(f"{url}/sdapi/v1/samplers", timeout=10).json()]
    assert {"Euler a", "Euler", "DDIM", "PLMS", "DPM++ 2M", "DPM++ 2M Karras"} <= set(samplers)
    assert [s["name"] for s in requests.get(f"{url}/sdapi/v1/schedulers", timeout=10).json()] == ["automatic", "karras"]


BAD_OPENAI = [
    ({"prompt": "a", "size": "65x64"}, 400, "size"),
    ({"prompt": "a", "size": "2048x2048"}, 400, "size"),
    ({"prompt": "a", "size": "big"}, 400, "size"),
    ({"prompt": "a", "n": 99}, 400, "n"),
    ({"prompt": "a", "n": "2"}, 400, "n"),
    ({"prompt": 5}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "a", "num_inference_steps": 5000}, 400, "num_inference_steps"),
    ({"prompt": "a", "guidance_scale": "high"}, 400, "guidance_scale"),
    ({"prompt": "a", "seed": -3}, 400, "seed"),
    ({"prompt": "a", "tome": {"ratio": 0.99}}, 400, "tome.ratio"),
    ({"prompt": "a", "tome": {"rate": 0.5}}, 400, "tome"),
    ({"prompt": "a", "scheduler": "heun"}, 400, "scheduler"),
    ({"prompt": "a", "quality": "hd"}, 400, "quality"),
    ({"prompt": "a", "stream": True}, 400, "stream"),
    ({"prompt": "a", "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("body,code,field", BAD_OPENAI)
def test_bad_openai_input_names_the_field(server, body, code, field):
    r = requests.post(f"{server.http}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(field), error
    assert error["type"] == "invalid_request_error"


BAD_A1111 = [
    ({"prompt": "a", "enable_hr": True}, 422, "enable_hr"),
    ({"prompt": "a", "restore_faces": True}, 422, "restore_faces"),
    ({"prompt": "a", "sampler_name": "Heun"}, 422, "sampler_name"),
    ({"prompt": "a", "sampler_name": "Euler", "scheduler": "karras"}, 422, "scheduler"),
    ({"prompt": "a", "sampler_name": "DDIM", "eta": 1.0}, 422, "eta"),
    ({"prompt": "a", "width": 100, "height": 64}, 422, "width"),
    ({"prompt": "a", "steps": "many"}, 422, "steps"),
    ({"prompt": "a", "cfg_scale": 500}, 422, "cfg_scale"),
    ({"prompt": "a", "batch_size": 3, "n_iter": 2}, 422, "batch_size x n_iter"),
    ({"prompt": "a", "override_settings": {"token_merging_ratio": 0.9}},
     422, "override_settings.token_merging_ratio"),
    ({"prompt": "a", "override_settings": {"sd_vae": "vae-ft-mse"}}, 422, "override_settings.sd_vae"),
    ({"prompt": "a", "override_settings": {"sd_model_checkpoint": "sdxl"}}, 404, "sd_model_checkpoint"),
]


@pytest.mark.parametrize("body,code,field", BAD_A1111)
def test_bad_a1111_input_names_the_field(server, body, code, field):
    r = requests.post(f"{server.http}/sdapi/v1/txt2img", json=body, timeout=30)
    assert r.status_code == code, r.text
    assert r.json()["detail"].startswith(field), r.json()


def test_malformed_and_oversized_bodies_and_the_server_stays_healthy(server):
    url = server.http
    r = requests.post(f"{url}/v1/images/generations", data=b'{"prompt": "a",', timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = requests.post(f"{url}/sdapi/v1/txt2img", data=b"[1, 2]", timeout=30)
    assert r.status_code == 422 and "JSON object" in r.json()["detail"]
    big = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    for route in ("/v1/images/generations", "/sdapi/v1/txt2img"):
        try:
            r = requests.post(f"{url}{route}", data=big, timeout=30, headers={"Content-Type": "application/json"})
            assert r.status_code == 413, r.text[:200]
        except requests.ConnectionError:
            pass  # the server may close the connection before reading the rest of a refused body
    r = requests.post(f"{url}/v1/images/generations", json={"prompt": "a"}, timeout=30,
                      headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout"
    assert requests.get(f"{url}/v1/nothing", timeout=10).status_code == 404
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    r = requests.post(f"{url}/v1/images/generations", json={"prompt": "still fine", "size": "64x64",
                                                             "num_inference_steps": 2}, timeout=60)
    assert r.status_code == 200
    metrics = requests.get(server.metrics_url, timeout=10).text
    assert 'tomeserve_http_requests_total{code="200",route="/v1/images/generations"}' in metrics
    assert 'tomeserve_http_requests_total{code="400",route="/v1/images/generations"}' in metrics
    assert 'tomeserve_http_requests_total{code="404",route="other"}' in metrics


def test_progress_follows_a_job_and_interrupt_ends_it(server):
    url = server.http
    answer = {}

    def generate():
        answer["r"] = requests.post(f"{url}/sdapi/v1/txt2img", timeout=300,
                                    json={"prompt": "a long one", "steps": 150, "width": 64, "height": 64})

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 60
    progress = None
    while time.monotonic() < deadline:
        progress = requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()
        if progress["state"]["sampling_step"] >= 3:
            break
        time.sleep(0.05)
    state = progress["state"]
    assert state["job"] == "txt2img" and state["job_count"] == 1 and state["sampling_steps"] >= 150
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert requests.post(f"{url}/sdapi/v1/interrupt", timeout=10).status_code == 200
    thread.join(timeout=60)
    r = answer["r"]
    assert r.status_code == 499 and "interrupted" in r.json()["detail"], r.text
    after = requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()
    assert after["state"]["interrupted"] is True and after["state"]["job_count"] == 0


def test_a_deadline_from_x_request_timeout_answers_504(server):
    r = requests.post(f"{server.http}/v1/images/generations", timeout=120, headers={"X-Request-Timeout": "0.3"},
                      json={"prompt": "too slow", "size": "64x64", "num_inference_steps": 150})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text[:300]


def test_options_are_per_caller_defaults(server):
    url = server.http
    r = requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, timeout=10)
    assert r.status_code == 404 and r.json()["detail"].startswith("sd_model_checkpoint")
    r = requests.post(f"{url}/sdapi/v1/options", json={"show_progressbar": True}, timeout=10)
    assert r.status_code == 422 and r.json()["detail"].startswith("show_progressbar")
    assert requests.post(f"{url}/sdapi/v1/options", json={"token_merging_ratio": 0.3}, timeout=10).status_code == 200
    try:
        assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["token_merging_ratio"] == 0.3
        r = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 64, "height": 64},
                          timeout=60)
        assert json.loads(r.json()["info"])["token_merging_ratio"] == 0.3
    finally:
        requests.post(f"{url}/sdapi/v1/options", json={"token_merging_ratio": 0}, timeout=10)


def test_playground_generates_two_ratios_in_chromium(server):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by scripts/bootstrap.sh"
    page = f"{server.http}/?" + urllib.parse.urlencode(
        {"autorun": "1", "prompt": "a cat", "size": "64x64", "steps": "3", "seed": "5", "ratios": "0, 0.5"})
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--virtual-time-budget=120000"]
    def dump():
        run = [*flags, f"--user-data-dir={tempfile.mkdtemp()}", "--dump-dom", page]
        return subprocess.run(run, capture_output=True, text=True, timeout=180).stdout

    def status(dom):
        m = re.search(r'<div id="status"[^>]*>(.*?)</div>', dom, re.S)
        return m.group(1) if m else dom[-2000:]

    dom = dump()
    # Headless Chromium dumps the DOM when its virtual-time budget runs out; once in a full run (406 other tests
    # before it) it dumped while the page was still generating. A page still running is dumped once more; a
    # page that reached an error fails at once with the page's own message.
    if 'data-state="done"' not in dom and 'data-state="error"' not in dom:
        dom = dump()
    assert 'data-state="done"' in dom, status(dom)
    assert dom.count('src="data:image/png;base64,') == 2
    assert dom.count('class="result"') == 2 and 'data-ratio="0.5"' in dom
    for label in ("denoising", "total (server)", "speed-up (denoising)", "PSNR vs first", "SSIM vs first"):
        assert f"<td>{label}</td>" in dom
    artifacts = Path(os.environ.get("TOMESERVE_BIN_DIR", Path(__file__).parents[2] / "build" / "bin")).parent / \
        "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "playground.png"
    subprocess.run([*flags, "--window-size=1100,800", f"--screenshot={shot}", page], capture_output=True,
                   timeout=180)
    assert shot.exists() and Image.open(shot).size == (1100, 800)


def test_https_with_the_grpc_certificates_and_mutual_tls(tiny_model, tmp_path):
    import grpc
    from test_server_config import make_certs

    make_certs(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=(tmp_path / "client.key").read_bytes(),
                                         certificate_chain=(tmp_path / "client.pem").read_bytes())
    args = ["--model", tiny_model, "--tls-cert", tmp_path / "server.pem", "--tls-key", tmp_path / "server.key",
            "--tls-client-ca", tmp_path / "ca.pem", *http_args(tmp_path)]
    with running_server(args, channel_credentials=creds):
        port = (tmp_path / "http.port").read_text().strip()
        url = f"https://localhost:{port}"
        client_cert = (str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        r = requests.post(f"{url}/v1/images/generations", verify=str(tmp_path / "ca.pem"), cert=client_cert,
                          json={"prompt": "over tls", "size": "64x64", "num_inference_steps": 2}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 1
        # No client certificate, or plaintext: no answer.
        for attempt in (lambda: requests.get(f"{url}/readyz", verify=str(tmp_path / "ca.pem"), timeout=10),
                        lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10)):
            with pytest.raises(requests.exceptions.RequestException):
                attempt()


def test_sigterm_drains_http_calls_and_readiness_turns_503(tiny_model, tmp_path):
    import signal

    from tomeserve_server import server_under_test

    with server_under_test(["--model", tiny_model, "--shutdown-grace", "2", *http_args(tmp_path)]) as s:
        url = http_url(tmp_path)
        answer = {}

        def generate():
            answer["r"] = requests.post(f"{url}/v1/images/generations", timeout=120,
                                        json={"prompt": "drain me", "size": "64x64", "num_inference_steps": 100})

        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(0.5)
        s.process.send_signal(signal.SIGTERM)
        # During the grace period the listener is open and readiness says 503.
        deadline = time.monotonic() + 2
        ready = 200
        while ready == 200 and time.monotonic() < deadline:
            ready = requests.get(f"{url}/readyz", timeout=5).status_code
            time.sleep(0.05)
        assert ready == 503
        thread.join(timeout=120)
        assert answer["r"].status_code == 200, answer["r"].text[:300]  # the call in flight finished
        assert s.process.wait(timeout=60) == 0
