"""Every tool answers --help with exit 0 and a usage text on stdout: the four binaries and the Python scripts a
person runs (benchmarks, load and soak tools, plots)."""
import subprocess
import sys

import pytest

from conftest import REPO, binary


@pytest.mark.parametrize("tool", ["tomeserve", "tomeserve-gen", "tomeserve-cli", "tomeserve-bench"])
def test_binaries_answer_help(tool):
    run = subprocess.run([binary(tool), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "usage" in run.stdout.lower(), run.stdout[:300]


@pytest.mark.parametrize("script", ["bench.py", "bench_table.py", "load.py", "load_open.py", "soak.py",
                                    "plot_ratios.py", "profile_unet.py", "tome_fidelity.py"])
def test_scripts_answer_help(script):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "usage" in run.stdout.lower(), run.stdout[:300]
