"""ctest's summary tells GPU coverage apart: every gtest binary with GPU-only cases (names with _CUDA) has a
second entry NAME.cuda that runs only those, and without a device it reads as "Skipped", not "Passed"."""
import json
import re
import subprocess

from conftest import binary

CUDA_BINARIES = {"pipeline_load_test", "vae_test", "scheduler_test", "unet_test", "tome_test", "step_batch_test",
                 "unet_graphs_test"}


def properties(test):
    return {p["name"]: p["value"] for p in test.get("properties", [])}


def test_gpu_only_cases_have_their_own_entry_that_reads_as_skipped_without_a_device():
    build = binary("step_batch_test").parent.parent
    listing = subprocess.run(["ctest", "--test-dir", str(build), "--show-only=json-v1"], capture_output=True,
                             text=True, check=True, timeout=120)
    tests = {t["name"]: t for t in json.loads(listing.stdout)["tests"]}
    assert {f"{b}.cuda" for b in CUDA_BINARIES} <= set(tests), sorted(tests)
    regex = None
    for name in CUDA_BINARIES:
        cpu, gpu = tests[name], tests[f"{name}.cuda"]
        assert cpu["command"][1:] == ["--gtest_filter=-*_CUDA*"], cpu["command"]
        assert gpu["command"][1:] == ["--gtest_filter=*_CUDA*"], gpu["command"]
        regex = properties(gpu)["SKIP_REGULAR_EXPRESSION"]
        regex = regex[0] if isinstance(regex, list) else regex
        assert "SKIPPED" not in str(properties(cpu).get("SKIP_REGULAR_EXPRESSION", "")), name
    # The GPU-only cases of one binary, run as ctest runs them: on this machine (no device) the output matches the
    # skip expression, so ctest reports the entry as skipped.
    import torch

    run = subprocess.run([str(binary("step_batch_test")), "--gtest_filter=*_CUDA*"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    assert "[==========] 1 test" in run.stdout, run.stdout[-2000:]
    assert bool(re.search(regex, run.stdout)) == (not torch.cuda.is_available()), run.stdout[-2000:]
