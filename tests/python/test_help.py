"""Every tool answers --help with exit 0 and a usage text on stdout: the four binaries, and every script in scripts/
(each *.sh with bash, each *.py with this python), with --help and -h, and without side effects: no file in the
repository (outside build/ and .venv/, which other tests write concurrently) and none under TMPDIR appears, changes
or goes away."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, binary

SCRIPTS = sorted(p.name for p in (REPO / "scripts").iterdir() if p.suffix in (".sh", ".py"))
# Written concurrently by the build and other tests, or by the interpreter itself; not what a script's --help does.
SKIP_DIRS = {".git", "build", ".venv", "__pycache__"}


@pytest.mark.parametrize("tool", ["tomeserve", "tomeserve-gen", "tomeserve-cli", "tomeserve-bench"])
def test_binaries_answer_help(tool):
    run = subprocess.run([binary(tool), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "usage" in run.stdout.lower(), run.stdout[:300]


def tree_state(root: Path) -> dict:
    """Every file and link under root (ignored ones included, so that .devbuild/ or demo-out/ count too) with its
    size and modification time, except under SKIP_DIRS."""
    state = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("build-")]
        else:
            dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            state[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
        state.update({os.path.relpath(os.path.join(folder, d), root) + "/": None for d in dirs})
    return state


def changes(before: dict, after: dict) -> list:
    return sorted([f"new {p}" for p in after.keys() - before.keys()] +
                  [f"gone {p}" for p in before.keys() - after.keys()] +
                  [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]])


def test_all_scripts_are_covered():
    # The list is computed from the folder; this pins that it found the kinds of scripts people run.
    assert {"test.sh", "demo.sh", "bootstrap.sh", "plot_ratios.py", "convert_single_file.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_answer_help(script, flag):
    path = REPO / "scripts" / script
    command = ["bash", str(path)] if script.endswith(".sh") else [sys.executable, str(path)]
    with tempfile.TemporaryDirectory() as tmp:
        # TMPDIR: a script's mktemp lands here and must not happen; OUT: gpu-bench.sh's output folder; HOME: caches.
        env = dict(os.environ, TMPDIR=tmp, OUT=os.path.join(tmp, "out"), HOME=os.path.join(tmp, "home"),
                   PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
        before = tree_state(REPO)
        run = subprocess.run(command + [flag], capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
        after = tree_state(REPO)
        left_in_tmp = sorted(os.listdir(tmp))
    assert run.returncode == 0, f"exit {run.returncode}\nstdout: {run.stdout[-500:]}\nstderr: {run.stderr[-500:]}"
    assert "usage" in run.stdout.lower(), run.stdout[:300]
    changed = changes(before, after)
    assert not changed, changed
    assert not left_in_tmp, left_in_tmp
