"""Every tool answers --help with exit 0 and a usage text on stdout: the four binaries, and every script in scripts/
(each *.sh with bash, each *.py with this python), with --help and -h, and without side effects: no file in the
repository (outside build/ and .venv/, which other tests write concurrently) and none under TMPDIR appears, changes
or goes away."""
import os
import re
import shlex
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


# ---- the README's commands run as written: paths exist, scripts run directly are executable, flags exist ----

README = (REPO / "README.md").read_text()
BINARIES = {"tomeserve", "tomeserve-gen", "tomeserve-cli", "tomeserve-bench"}
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|deploy|docs|helm|tests|server|pipeline|tools|tome|proto|cmake|\.ci)"
                       r"/[\w./*-]*)")


def readme_code():
    """Every code block and inline code span of the README, with line continuations joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
    return [b.replace("\\\n", " ") for b in blocks] + [s.replace("\n", " ") for s in spans]


def readme_commands():
    """(program, arguments) of each command in the README's code, split at pipes and &&, without comments and
    leading VAR=value assignments."""
    for code in readme_code():
        for line in code.splitlines():
            for part in re.split(r"\|\|?|&&|;", line.split(" #")[0]):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    words.pop(0)
                if words:
                    yield words[0], words[1:]


def flags_missing(args, help_text):
    flags = {a.split("=")[0] for a in args if re.match(r"^--?[a-z]", a)} - {"--help", "-h"}
    return sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text))


def test_readme_keeps_exactly_two_set_up_commands():
    block = re.search(r"## Set-up commands\s+```sh\n(.*?)```", README, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["scripts/test.sh", "scripts/demo.sh"]


def test_readme_paths_exist():
    paths = {m.rstrip(".,)") for code in readme_code() for m in REPO_PATH.findall(code)}
    assert "scripts/convert_single_file.py" in paths
    missing = [p for p in sorted(paths) if not list(REPO.glob(p.rstrip("/")))]
    assert not missing, missing


def script_help(script):
    path = REPO / script
    command = ["bash", str(path)] if script.endswith(".sh") else [sys.executable, str(path)]
    run = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (script, run.stderr[-500:])
    return run.stdout


def test_readme_script_commands_run_as_written():
    checked = 0
    for program, args in readme_commands():
        if program.endswith("/python") or program == "bash":
            if not (args and re.fullmatch(r"scripts/[\w.-]+\.(sh|py)", args[0])):
                continue
            script, args = args[0], args[1:]
        elif re.fullmatch(r"scripts/[\w.-]+\.(sh|py)", program):
            script = program
            if args or script.endswith(".sh"):  # run as a program (a bare `scripts/x.py` is a mention)
                assert os.access(REPO / script, os.X_OK), f"README runs {script} directly but it is not executable"
        else:
            continue
        missing = flags_missing(args, script_help(script))
        assert not missing, f"README: {script} {' '.join(args)}: {missing} not in its --help"
        checked += 1
    assert checked >= 5, checked


def test_readme_binary_commands_use_existing_flags():
    helps, checked = {}, 0
    for program, args in readme_commands():
        name = program.removeprefix("build/bin/")
        if name not in BINARIES:
            continue
        if name not in helps:
            helps[name] = subprocess.run([binary(name), "--help"], capture_output=True, text=True, timeout=60).stdout
        missing = flags_missing(args, helps[name])
        assert not missing, f"README: {program} {' '.join(args)}: {missing} not in {name} --help"
        checked += 1
    assert checked >= 6, checked


def test_plot_ratios_without_matplotlib_says_how_to_run_it(tmp_path):
    # A python without matplotlib (the shebang's python3 on a fresh machine), before any Prometheus query.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_ratios.py"), "--prometheus",
                          "http://127.0.0.1:9", "--out", str(tmp_path / "r.png")], capture_output=True, text=True,
                         env=env, timeout=60)
    assert run.returncode == 2, run.stderr
    assert ".venv/bin/python scripts/plot_ratios.py" in run.stderr and not (tmp_path / "r.png").exists()
