"""Fixtures shared by the pytest suites: the built binaries and the test model folders that ctest passes in."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def binary(name: str) -> Path:
    """A built executable. Under ctest (TOMESERVE_BIN_DIR set) a missing one fails; elsewhere it skips."""
    path = Path(os.environ.get("TOMESERVE_BIN_DIR", REPO / "build" / "bin")) / name
    if not path.exists():
        if "TOMESERVE_BIN_DIR" in os.environ:
            pytest.fail(f"{path} is missing")
        pytest.skip(f"{path} is not built")
    return path


@pytest.fixture(scope="session")
def gen() -> Path:
    return binary("tomeserve-gen")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    model = os.environ.get("TOMESERVE_TINY_MODEL")
    if not model:
        pytest.skip("TOMESERVE_TINY_MODEL not set")
    return model
