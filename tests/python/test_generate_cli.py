"""`tomeserve-gen generate` end to end on the tiny model: a valid PNG with an AUTOMATIC1111 "parameters" chunk
(read back with Pillow), several images, latents saved and fed back, and usage errors with exit code 2."""
import subprocess

import numpy as np
import pytest
from PIL import Image

def torch_allclose(a, b):
    return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def run(gen, *args):
    return subprocess.run([str(gen), "generate", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_writes_png_with_a1111_parameters(gen, tiny_model, tmp_path):
    model = tiny_model
    out = tmp_path / "cat.png"
    r = run(gen, "--model", model, "--prompt", "a cat, on a sofa", "--negative-prompt", "blurry", "--steps", 3,
            "--seed", 42, "--guidance", 6.5, "--scheduler", "euler_a", "--width", 72, "--height", 48, "-o", out)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (72, 48)
    params = img.info["parameters"]
    lines = params.split("\n")
    assert lines[0] == "a cat, on a sofa"
    assert lines[1] == "Negative prompt: blurry"
    assert "Steps: 3" in lines[2] and "Sampler: Euler a" in lines[2] and "CFG scale: 6.5" in lines[2]
    assert "Seed: 42" in lines[2] and "Size: 72x48" in lines[2]
    assert f"{out} seed=42" in r.stdout


def test_several_images_and_latents_round_trip(gen, tiny_model, tmp_path):
    model = tiny_model
    out = tmp_path / "img.png"
    saved = tmp_path / "latents.safetensors"
    r = run(gen, "--model", model, "--prompt", "a house", "--steps", 2, "--seed", 5, "--num-images", 2,
            "--scheduler", "ddim", "-o", out, "--save-latents", saved)
    assert r.returncode == 0, r.stderr
    a, b = tmp_path / "img-0.png", tmp_path / "img-1.png"
    assert a.exists() and b.exists()
    assert "Seed: 6" in Image.open(b).info["parameters"]  # seeds S, S+1
    from safetensors.torch import load_file

    latents = load_file(str(saved))["latents"]
    assert tuple(latents.shape) == (2, 4, 8, 8)
    # The first image of the pair equals the same seed generated alone (per-sample noise and state).
    alone = tmp_path / "alone.safetensors"
    r = run(gen, "--model", model, "--prompt", "a house", "--steps", 2, "--seed", 5, "--scheduler", "ddim",
            "-o", tmp_path / "alone.png", "--save-latents", alone)
    assert r.returncode == 0, r.stderr
    assert torch_allclose(load_file(str(alone))["latents"][0], latents[0])

    # Feeding initial latents: the same file twice gives the same images (and a valid run).
    init = tmp_path / "init.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}, str(init))
    r1 = run(gen, "--model", model, "--prompt", "x", "--steps", 2, "--num-images", 2, "--init-latents", init,
             "-o", tmp_path / "i1.png")
    r2 = run(gen, "--model", model, "--prompt", "x", "--steps", 2, "--num-images", 2, "--init-latents", init,
             "-o", tmp_path / "i2.png")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i1-0.png")), np.asarray(Image.open(tmp_path / "i2-0.png")))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", "x", "-o", "o.png"], "--model is required"),
        (["--model", "M", "-o", "o.png"], "--prompt is required"),
        (["--model", "M", "--prompt", "x"], "-o OUT.png is required"),
        (["--model", "M", "--prompt", "x", "-o", "o.png", "--width", "65"], "multiples of 8"),
        (["--model", "M", "--prompt", "x", "-o", "o.png", "--steps", "0"], "--steps must be an integer in [1, 1000]"),
        (["--model", "M", "--prompt", "x", "-o", "o.png", "--guidance", "nan"], "--guidance must be a number"),
        (["--model", "M", "--prompt", "x", "-o", "o.png", "--scheduler", "lms"], "--scheduler"),
        (["--model", "M", "--prompt", "x", "-o", "o.png", "--dtype", "fp8"], "--dtype"),
        (["--model", "M", "--prompt", "x", "-o", "o.png", "--device", "tpu"], "--device"),
        (["--model", "M", "--prompt", "x", "-o", "o.png", "--seed", "-2"], "--seed"),
    ],
)
def test_usage_errors(gen, args, needle):
    r = subprocess.run([str(gen), "generate", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_init_latents_with_wrong_count_is_a_usage_error(gen, tiny_model, tmp_path):
    model = tiny_model
    import torch
    from safetensors.torch import save_file

    init = tmp_path / "one.safetensors"
    save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(init))
    r = run(gen, "--model", model, "--prompt", "x", "--steps", 1, "--num-images", 2, "--init-latents", init,
            "-o", tmp_path / "o.png")
    assert r.returncode == 2
    assert "--init-latents" in r.stderr


def test_init_latents_of_wrong_size_and_missing_output_folder_exit_2(gen, tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file

    init = tmp_path / "small.safetensors"
    save_file({"latents": torch.zeros(1, 4, 5, 5)}, str(init))
    r = run(gen, "--model", tiny_model, "--prompt", "x", "--steps", 1, "--init-latents", init, "-o", tmp_path / "o.png")
    assert r.returncode == 2 and "init_latents must be [4, 8, 8]" in r.stderr, r.stderr
    r = run(gen, "--model", tiny_model, "--prompt", "x", "--steps", 1, "-o", tmp_path / "nope" / "o.png")
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr


def test_stdout_output_seed_minus_one_and_the_ratio_alias(gen, tiny_model, tmp_path):
    common = ["--model", tiny_model, "--prompt", "a lighthouse", "--steps", 2, "--width", 64, "--height", 64]
    out = tmp_path / "file.png"
    assert run(gen, *common, "--seed", 5, "-o", out).returncode == 0
    # -o -: the PNG bytes on stdout, byte for byte the file's; the seed line on stderr.
    piped = subprocess.run([str(gen), "generate", *map(str, common), "--seed", "5", "-o", "-"], capture_output=True,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == out.read_bytes()
    assert b"- seed=5" in piped.stderr
    r = run(gen, *common, "--num-images", 2, "-o", "-")
    assert r.returncode == 2 and "--num-images > 1 needs a file name" in r.stderr
    # --seed -1: a random seed (A1111's convention), printed.
    r = run(gen, *common, "--seed", -1, "-o", tmp_path / "random.png")
    assert r.returncode == 0, r.stderr
    assert "seed=" in r.stdout and "seed=18446744073709551615" not in r.stdout
    # --ratio is --tome-ratio under tomeserve-cli's name: the same image; both at once is a usage error.
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run(gen, *common, "--seed", 5, "--tome-ratio", 0.5, "--tome-max-downsample", 2, "-o", a).returncode == 0
    assert run(gen, *common, "--seed", 5, "--ratio", 0.5, "--tome-max-downsample", 2, "-o", b).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    r = run(gen, *common, "--ratio", 0.5, "--tome-ratio", 0.5, "-o", a)
    assert r.returncode == 2 and "not both" in r.stderr
