"""`tomeserve-gen generate --tome-*`: Token Merging from the command line on the tiny model. The merged image
differs from the plain one, ratio 0 equals no ToMe, the same --tome-seed repeats, the PNG records the ratio the
way AUTOMATIC1111 does, and out-of-range settings are one-line usage errors (exit 2)."""
import subprocess

import numpy as np
from PIL import Image


def run(gen, model, out, *args):
    base = ["generate", "--model", model, "--prompt", "a red boat on a lake", "--steps", 3, "--seed", 11,
            "--width", 128, "--height", 128, "-o", out]
    return subprocess.run([str(gen), *map(str, base), *map(str, args)], capture_output=True, text=True, timeout=300)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_ratio_changes_the_image_and_is_recorded(gen, tiny_model, tmp_path):
    plain, zero, merged, again, other = (tmp_path / f"{n}.png" for n in ("plain", "zero", "merged", "again", "other"))
    assert run(gen, tiny_model, plain).returncode == 0
    assert run(gen, tiny_model, zero, "--tome-ratio", 0).returncode == 0
    r = run(gen, tiny_model, merged, "--tome-ratio", 0.5, "--tome-max-downsample", 2, "--tome-seed", 3)
    assert r.returncode == 0, r.stderr
    assert "token merging (ratio=0.5 max_downsample=2" in r.stderr
    assert "10 blocks, 1600 -> 800 tokens" in r.stderr  # 16x16 latents: 5 blocks of 256 + 5 of 64 tokens
    assert run(gen, tiny_model, again, "--tome-ratio", 0.5, "--tome-max-downsample", 2, "--tome-seed", 3).returncode == 0
    assert run(gen, tiny_model, other, "--tome-ratio", 0.5, "--tome-max-downsample", 2, "--tome-seed", 4).returncode == 0

    assert np.array_equal(pixels(zero), pixels(plain))
    assert not np.array_equal(pixels(merged), pixels(plain))
    assert np.array_equal(pixels(again), pixels(merged))
    assert not np.array_equal(pixels(other), pixels(merged))
    assert "Token merging ratio: 0.5" in Image.open(merged).info["parameters"]
    assert "Token merging" not in Image.open(plain).info["parameters"]


def test_bad_settings_are_usage_errors(gen, tiny_model, tmp_path):
    for args, message in [
        (["--tome-ratio", 0.8], "--tome-ratio must be in [0, 0.75]"),
        (["--tome-ratio", 0.6, "--tome-sx", 1], "--tome-ratio must be in [0, 0.5]"),
        (["--tome-ratio", "x"], "--tome-ratio"),
        (["--tome-max-downsample", 3], "--tome-max-downsample must be one of 1, 2, 4, 8"),
        (["--tome-sx", 0], "--tome-sx"),
        (["--tome-seed", -1], "--tome-seed"),
    ]:
        r = run(gen, tiny_model, tmp_path / "x.png", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
