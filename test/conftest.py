"""Test-suite wide set-up: loopback-only DDS, the `slow` and `ros` markers, shared golden data.

The loopback DDS environment is applied when this file is imported, i.e. before pytest imports
any test module, so no test can create a DDS participant on the default domain or with network
discovery, however pytest was started. A session check refuses to run ROS tests otherwise.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DIR = Path(__file__).resolve().parent

# Before anything else: this must precede every rclpy.init() in this process.
from spark3r_ros.dds_env import apply_loopback_env, loopback_problems  # noqa: E402  (ROS-free)

LOOPBACK_ENV = apply_loopback_env()

if str(TEST_DIR) not in sys.path:
    # Test helper modules (ros_helpers, ros_test_publisher) live beside the tests.
    sys.path.insert(0, str(TEST_DIR))


def shared_dir() -> Path:
    """`../shared` beside the repository (CI always has it), or $SPARK3R_SHARED."""
    return Path(os.environ.get("SPARK3R_SHARED", REPO_ROOT.parent / "shared"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s; run with --runslow")
    config.addinivalue_line(
        "markers", "ros: uses rclpy / DDS; only runs when the environment is loopback-only (see spark3r_ros.dds_env)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("SPARK3R_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; run with --runslow or SPARK3R_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    problems = loopback_problems()
    if problems:
        pytest.exit("refusing to run: DDS environment is not loopback-only: " + "; ".join(problems), returncode=4)


def pytest_runtest_setup(item):
    # A test may have changed os.environ; never let a later ROS test run on a leaky setup.
    if "ros" in item.keywords or "ros_context" in getattr(item, "fixturenames", ()):
        problems = loopback_problems()
        if problems:
            pytest.fail("DDS environment is not loopback-only: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared reference data not found at {path} (set SPARK3R_SHARED to its location)")
    return path


@pytest.fixture(scope="module")
def ros_context():
    """A private, initialised rclpy Context for one test module (shut down afterwards)."""
    problems = loopback_problems()
    if problems:
        pytest.fail("DDS environment is not loopback-only: " + "; ".join(problems), pytrace=False)
    rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed")
    from rclpy.signals import SignalHandlerOptions

    context = rclpy.context.Context()
    # Leave Ctrl-C to pytest: rclpy's handler would turn it into a silent context shutdown.
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    try:
        yield context
    finally:
        context.try_shutdown()


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    """One temporary kernel cache per test session (each kernel compiles once, ~3 s)."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture
def native_kernel(monkeypatch, kernel_cache):
    """``load(name)``: the native kernel ``name`` built into the session's temporary cache and
    loaded afresh (returns the cache folder); skips where no C compiler works."""
    from spark3r.accel import native

    monkeypatch.setenv("SPARK3R_KERNEL_CACHE", str(kernel_cache))
    monkeypatch.setattr(native, "_libraries", {})

    def load(name: str):
        if native.load(name) is None:
            pytest.skip("no working C compiler here: only the eager path can be tested")
        return kernel_cache

    return load
