"""tomeserve-gen's command-line contract: usage errors are one line on stderr with exit code 2; runtime errors
(bad model folder) exit 1 naming the path; --help exits 0."""
import subprocess

import pytest

def run(gen, *args, stdin=""):
    return subprocess.run([str(gen), *args], input=stdin, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "missing subcommand"),
        (["frobnicate"], 'unknown subcommand "frobnicate"'),
        (["tokenize"], "--model is required"),
        (["tokenize", "--model"], "--model needs a value"),
        (["tokenize", "--model", "x", "--bogus"], "unknown flag --bogus"),
        (["tokenize", "--model", "x", "--max-length", "500"], "--max-length must be an integer in [2, 77]"),
        (["tokenize", "--model", "x", "--pad=yes"], "--pad takes no value"),
    ],
)
def test_usage_errors_exit_2_with_one_line(gen, args, needle):
    r = run(gen, *args)
    assert r.returncode == 2, r
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]


def test_missing_model_folder_names_the_path(gen, tmp_path):
    r = run(gen, "tokenize", "--model", str(tmp_path / "nope"), stdin="a cat\n")
    assert r.returncode == 1
    assert str(tmp_path / "nope") in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_exits_0(gen):
    r = run(gen, "--help")
    assert r.returncode == 0
    assert "tokenize" in r.stdout


def test_tokenize_prints_one_array_per_line(gen, tiny_model):
    model = tiny_model
    r = run(gen, "tokenize", "--model", model, stdin="a photo of a cat\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[49406, 320, 1125, 539, 320, 2368, 49407]", "[49406, 49407]"]
    padded = run(gen, "tokenize", "--model", model, "--pad", stdin="a cat\n")
    assert padded.stdout.count(",") == 76
