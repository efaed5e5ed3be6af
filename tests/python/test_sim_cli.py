"""tomeserve-sim's command line: the replay's JSON line and its keys, --slo, --arrival-scale, the built-in H200
profile, usage errors, and `calibrate` measuring a real profile from the tiny model (then replayed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import binary

REPO = Path(__file__).resolve().parents[2]
KEYS = {"p50_s", "p95_s", "p99_s", "throughput_rps", "completed", "refused", "slo_attainment", "mean_ratio",
        "mean_rows_per_call", "mean_solo_s"}


def sim(*args, check=True):
    p = subprocess.run([binary("tomeserve-sim"), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "trace.jsonl"
    subprocess.run([sys.executable, REPO / "scripts" / "make_trace.py", "--preset", "gpu-sd15", "--calls", "40",
                    "-o", path], check=True)
    return path


def test_replay_prints_one_json_line_with_the_interface_keys(trace):
    lines = sim("--trace", trace, "--profile", "h200-sd15-fp16", "--load", "0.8").stdout.splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert KEYS <= out.keys()
    assert out["completed"] == 40 and out["refused"] == 0
    assert out["slo_attainment"] is None  # without --slo
    assert 0 < out["p50_s"] <= out["p95_s"] <= out["p99_s"]
    with_slo = json.loads(sim("--trace", trace, "--profile", "h200-sd15-fp16", "--load", "0.8", "--slo").stdout)
    assert 0 <= with_slo["slo_attainment"] <= 1
    # --arrival-scale S = mean_solo_s / X replays exactly what --load X does.
    scaled = json.loads(sim("--trace", trace, "--profile", "h200-sd15-fp16",
                            "--arrival-scale", repr(out["mean_solo_s"] / 0.8)).stdout)
    assert scaled["p95_s"] == pytest.approx(out["p95_s"])
    request = json.loads(sim("--trace", trace, "--profile", "h200-sd15-fp16", "--load", "0.8",
                             "--batching", "request").stdout)
    assert request["mean_rows_per_call"] < out["mean_rows_per_call"]  # step mode batches more


def test_usage_errors_exit_2_with_one_line(trace, tmp_path):
    for args in (["--trace", trace, "--profile", "h200-sd15-fp16"],                       # no --load
                 ["--trace", trace, "--profile", "nope", "--load", "1"],                  # unknown profile
                 ["--trace", tmp_path / "none.jsonl", "--profile", "h200-sd15-fp16", "--load", "1"],
                 ["--trace", trace, "--profile", "h200-sd15-fp16", "--load", "1", "--batching", "x"]):
        p = sim(*args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert sim("--help").stdout.startswith("usage: tomeserve-sim")


def test_calibrate_measures_a_profile_the_replay_uses(tiny_model, tmp_path, trace):
    out = tmp_path / "cpu.json"
    p = sim("calibrate", "--model", tiny_model, "--devices", "cpu", "--out", out, "--sizes", "64x64,128x128",
            "--rows", "1,2", "--ratios", "0,0.5", "--repeats", "1")
    profile = json.loads(out.read_text())
    assert len(profile["step"]) == 2 * 2 * 2 and len(profile["fixed"]) == 2
    assert all(s["seconds"] > 0 for s in profile["step"]), p.stderr
    tiny_trace = tmp_path / "tiny.jsonl"
    tiny_trace.write_text("".join(json.dumps(dict(json.loads(line), width=128, height=128)) + "\n"
                                  for line in Path(trace).read_text().splitlines()[:10]))
    result = json.loads(sim("--trace", tiny_trace, "--profile", out, "--load", "0.8").stdout)
    assert result["completed"] == 10
