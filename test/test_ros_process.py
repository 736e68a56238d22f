"""test/ros_helpers.ros_process: same domain for the child, and cleanup that always happens."""
import os
import textwrap
import time

import pytest

from ros_helpers import ros_process

pytestmark = pytest.mark.ros


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def _wait_for_file(path, timeout=30.0, proc=None):
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().endswith("\n"):
        if proc is not None:
            proc.check_alive()
        assert time.monotonic() < deadline, f"{path} not written"
        time.sleep(0.02)
    return path.read_text()


@pytest.fixture
def stubborn_module(tmp_path):
    """A child that ignores SIGINT and starts a grandchild: only SIGKILL of the group ends both."""
    (tmp_path / "stubborn_child.py").write_text(textwrap.dedent("""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(sys.argv[1] + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()} {grandchild.pid}\\n")
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)
    """))
    return tmp_path


def test_child_and_grandchild_are_killed_even_when_the_test_fails(stubborn_module):
    out = stubborn_module / "pids.txt"
    with pytest.raises(RuntimeError, match="simulated failure"):
        with ros_process("stubborn_child", out, extra_pythonpath=[stubborn_module], grace_s=0.5) as proc:
            child_pid, grandchild_pid = map(int, _wait_for_file(out, proc=proc).split())
            assert child_pid == proc.pid  # the wheels' re-exec keeps the pid
            assert _pid_alive(grandchild_pid)
            raise RuntimeError("simulated failure")
    assert proc.popen.returncode is not None
    deadline = time.monotonic() + 5
    while _pid_alive(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(child_pid) and not _pid_alive(grandchild_pid)


def test_child_runs_rclpy_on_the_same_private_domain(tmp_path):
    (tmp_path / "env_probe.py").write_text(textwrap.dedent("""
        import os, sys
        import rclpy
        rclpy.init()
        node = rclpy.create_node("env_probe")
        domain = node.context.get_domain_id()
        node.destroy_node()
        rclpy.shutdown()
        keys = ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE")
        with open(sys.argv[1] + ".tmp", "w") as fh:
            fh.write(" ".join([str(domain)] + [os.environ[k] for k in keys]) + "\\n")
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    """))
    out = tmp_path / "env.txt"
    with ros_process("env_probe", out, extra_pythonpath=[tmp_path]) as proc:
        fields = _wait_for_file(out, proc=proc).split()
    domain = os.environ["ROS_DOMAIN_ID"]
    assert fields == [domain, domain, "LOCALHOST", os.environ["FASTDDS_DEFAULT_PROFILES_FILE"]]


def test_crashed_child_reports_its_output(tmp_path):
    (tmp_path / "crasher.py").write_text("raise SystemExit('boom: bad parameter')\n")
    with ros_process("crasher", extra_pythonpath=[tmp_path]) as proc:
        proc.popen.wait(timeout=30)
        with pytest.raises(RuntimeError, match="boom: bad parameter"):
            proc.check_alive()
