"""Test-suite wide set-up: the `slow` marker and the location of the shared golden data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """`../shared` beside the repository (CI always has it), or $SPARK3R_SHARED."""
    return Path(os.environ.get("SPARK3R_SHARED", REPO_ROOT.parent / "shared"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("SPARK3R_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; run with --runslow or SPARK3R_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared reference data not found at {path} (set SPARK3R_SHARED to its location)")
    return path
