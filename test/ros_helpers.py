"""Helpers for tests that talk to other ROS processes over loopback-only DDS.

* :func:`ros_process` starts ``python -m <module> [args]`` on the test process's private domain
  and always cleans it up (SIGINT, then SIGKILL to the whole process group), also when the
  test fails or the test process dies.
* ``wait_for_*`` helpers wait for DDS matching instead of sleeping: messages published before
  a subscription has matched are simply lost.
* :func:`spin_until` spins nodes until a predicate holds.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from spark3r_ros.dds_env import loopback_env, loopback_problems

TEST_DIR = Path(__file__).resolve().parent
REPO_ROOT = TEST_DIR.parent

_live_processes: set[subprocess.Popen] = set()

# Resolved before any fork: the child must not import anything between fork and exec.
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; the setting survives the ROS wheels' re-exec,
    # so the node is killed even if the test process is SIGKILLed.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class RosProcess:
    """A started child process plus its log file; see :func:`ros_process`."""

    def __init__(self, popen: subprocess.Popen, log_path: Path, argv: Sequence[str]):
        self.popen = popen
        self.log_path = log_path
        self.argv = list(argv)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, tail_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail_chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise with the child's output if it has exited."""
        if not self.running():
            raise RuntimeError(
                f"process {' '.join(self.argv)} exited with code {self.popen.returncode}; output:\n{self.log_text()}"
            )


def child_env(domain_id: Optional[int] = None, extra_pythonpath: Iterable[Path] = ()) -> dict[str, str]:
    """Environment for a child on the same loopback domain as this process."""
    if domain_id is None:
        domain_id = int(os.environ["ROS_DOMAIN_ID"])
    env = loopback_env(os.environ, domain_id)
    # Let the child's own ROS wheels bootstrap compute LD_LIBRARY_PATH for its interpreter
    # instead of inheriting a "done" marker that may not match it.
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    paths = [str(p) for p in extra_pythonpath] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(popen: subprocess.Popen, grace_s: float = 5.0) -> Optional[int]:
    """SIGINT the child's process group, then SIGKILL after ``grace_s``; returns the exit code."""
    if popen.poll() is None:
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                popen.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    else:
        # The leader is gone; make sure nothing it started is left in its group.
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _live_processes.discard(popen)
    return popen.poll()


@atexit.register
def _kill_leftovers() -> None:
    for popen in list(_live_processes):
        stop_process(popen, grace_s=1.0)


@contextmanager
def ros_process(
    module: str,
    *args: str,
    domain_id: Optional[int] = None,
    extra_pythonpath: Iterable[Path] = (TEST_DIR,),
    grace_s: float = 5.0,
) -> Iterator[RosProcess]:
    """Run ``python -m module *args`` on this process's loopback domain for the ``with`` block.

    The child gets its own process group (so cleanup reaches its children too), its output goes
    to a temporary log file (a pipe could fill up and block it), and it is stopped on exit of
    the block whatever happened inside.
    """
    problems = loopback_problems()
    if problems:
        raise RuntimeError("refusing to start a ROS process without loopback-only DDS: " + "; ".join(problems))
    argv = [sys.executable, "-m", module, *map(str, args)]
    log_file = tempfile.NamedTemporaryFile(prefix=f"{module.rsplit('.', 1)[-1]}_", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    popen = subprocess.Popen(
        argv,
        env=child_env(domain_id, extra_pythonpath),
        cwd=str(REPO_ROOT),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    log_file.close()
    _live_processes.add(popen)
    proc = RosProcess(popen, log_path, argv)
    try:
        yield proc
    finally:
        stop_process(popen, grace_s)
        try:
            log_path.unlink()
        except OSError:
            pass


def _wait(condition: Callable[[], bool], timeout: float, what: str, process: Optional[RosProcess]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None:
            process.check_alive()
        if time.monotonic() > deadline:
            extra = f"\nprocess output:\n{process.log_text()}" if process is not None else ""
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}{extra}")
        time.sleep(0.02)


def wait_for_subscribers(publisher, n: int = 1, timeout: float = 10.0, process: Optional[RosProcess] = None) -> None:
    """Block until ``publisher`` has matched at least ``n`` subscriptions."""
    _wait(lambda: publisher.get_subscription_count() >= n, timeout,
          f"{n} subscriber(s) on {publisher.topic_name}", process)


def wait_for_publishers(subscription, n: int = 1, timeout: float = 10.0, process: Optional[RosProcess] = None) -> None:
    """Block until ``subscription`` has matched at least ``n`` publishers."""
    _wait(lambda: subscription.get_publisher_count() >= n, timeout,
          f"{n} publisher(s) on {subscription.topic_name}", process)


FINISHED_GRACE_S = 5.0


def spin_until(
    nodes,
    predicate: Callable[[], bool],
    timeout: float,
    process: Optional[RosProcess] = None,
) -> bool:
    """Spin ``nodes`` (a node or a list of nodes) until ``predicate()`` is true.

    Returns False on timeout (so the test can assert with its own message); raises if
    ``process`` failed meanwhile, with its output. A process that finished cleanly (exit 0, e.g.
    a bag replay at its end) is not a failure: what it sent may still be in flight, so spinning
    goes on for up to ``FINISHED_GRACE_S`` more seconds (within ``timeout``).
    """
    from rclpy.executors import SingleThreadedExecutor

    node_list = nodes if isinstance(nodes, (list, tuple)) else [nodes]
    executor = SingleThreadedExecutor(context=node_list[0].context)
    for node in node_list:
        executor.add_node(node)
    try:
        deadline = time.monotonic() + timeout
        while not predicate():
            if process is not None and not process.running():
                if process.popen.returncode != 0:
                    process.check_alive()
                deadline = min(deadline, time.monotonic() + FINISHED_GRACE_S)
                process = None
            if time.monotonic() > deadline:
                return False
            executor.spin_once(timeout_sec=0.02)
        return True
    finally:
        for node in node_list:
            executor.remove_node(node)
        executor.shutdown()
