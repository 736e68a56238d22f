"""spark3r_ros.dds_env and the conftest guard: the loopback-only DDS environment (no rclpy)."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from spark3r_ros import dds_env
from spark3r_ros.dds_env import PROFILE_FILE, loopback_env, loopback_problems


def test_this_test_process_runs_loopback_only():
    # conftest applied the environment before any test module was imported.
    assert loopback_problems() == []
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert 1 <= int(os.environ["ROS_DOMAIN_ID"]) <= 101
    assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == str(PROFILE_FILE)
    assert os.path.isdir(os.environ["ROS_LOG_DIR"])


def test_profile_is_shared_memory_only_with_large_segments():
    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(PROFILE_FILE).getroot()
    transports = root.findall(".//d:transport_descriptor", ns)
    assert [t.find("d:type", ns).text for t in transports] == ["SHM"]
    shm = transports[0]
    frame_bytes = 640 * 480 * 3
    assert int(shm.find("d:segment_size", ns).text) >= 8 * frame_bytes
    assert int(shm.find("d:maxMessageSize", ns).text) >= 200_000 * 16
    participant = root.find(".//d:participant", ns)
    assert participant.get("is_default_profile") == "true"
    assert participant.find(".//d:useBuiltinTransports", ns).text == "false"
    assert participant.find(".//d:userTransports/d:transport_id", ns).text == shm.find("d:transport_id", ns).text


def test_loopback_env_sets_and_removes_variables():
    base = {"PATH": "/usr/bin", "ROS_STATIC_PEERS": "192.168.1.20", "ROS_DISCOVERY_SERVER": "10.0.0.1:11811",
            "ROS_LOCALHOST_ONLY": "0", "ROS_DOMAIN_ID": "0", "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET",
            "FASTDDS_BUILTIN_TRANSPORTS": "UDPv4", "ROS_LOG_DIR": "/tmp/mine"}
    snapshot = dict(base)
    env = loopback_env(base, domain_id=17)
    assert base == snapshot  # the input mapping is not modified
    assert env["ROS_DOMAIN_ID"] == "17"
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert env["RMW_IMPLEMENTATION"] == "rmw_fastrtps_cpp"
    assert env["FASTDDS_DEFAULT_PROFILES_FILE"] == str(PROFILE_FILE)
    assert env["ROS_LOG_DIR"] == "/tmp/mine" and env["PATH"] == "/usr/bin"
    assert env["HOME"]  # rclpy.init() needs HOME or ROS_LOG_DIR
    for leaky in ("ROS_STATIC_PEERS", "ROS_DISCOVERY_SERVER", "ROS_LOCALHOST_ONLY", "FASTDDS_BUILTIN_TRANSPORTS"):
        assert leaky not in env
    assert loopback_problems(env) == []
    assert loopback_problems(base) != []


@pytest.mark.parametrize("change, needle", [
    ({"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"}, "ROS_AUTOMATIC_DISCOVERY_RANGE"),
    ({"ROS_DOMAIN_ID": "0"}, "ROS_DOMAIN_ID"),
    ({"ROS_DOMAIN_ID": "150"}, "ROS_DOMAIN_ID"),
    ({"FASTDDS_DEFAULT_PROFILES_FILE": "/etc/hosts"}, "FASTDDS_DEFAULT_PROFILES_FILE"),
    ({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}, "RMW_IMPLEMENTATION"),
    ({"ROS_STATIC_PEERS": "10.1.2.3"}, "ROS_STATIC_PEERS"),
])
def test_loopback_problems_names_each_leak(change, needle):
    env = loopback_env({}, domain_id=9)
    env.update(change)
    problems = loopback_problems(env)
    assert len(problems) == 1 and needle in problems[0]


@pytest.mark.parametrize("bad, error", [(0, ValueError), (102, ValueError), ("5", TypeError), (True, TypeError)])
def test_domain_id_validation(bad, error):
    with pytest.raises(error, match="domain_id"):
        loopback_env({}, domain_id=bad)


def test_busy_domains_from_shared_memory_port_files(tmp_path):
    # Domain 77 uses RTPS ports 7400 + 250*77 + offsets = 26650..26899.
    for name in ("fastdds_port26661", "fastdds_port26663_el", "sem.fastdds_port7411_mutex", "fastdds_port7000",
                 "fastdds_1a2b3c", "unrelated"):
        (tmp_path / name).touch()
    ports = dds_env._ports_from_shm(tmp_path)
    assert ports == {26661, 26663, 7000}
    assert {dds_env._domain_of_port(p) for p in ports} == {77, None}


def test_claimed_domain_is_seen_as_busy_by_other_processes():
    mine = int(os.environ["ROS_DOMAIN_ID"])
    code = "from spark3r_ros.dds_env import domains_in_use; print(sorted(domains_in_use()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert mine in eval(out.stdout.strip().splitlines()[-1])
    # and a new pick in another process avoids it
    code = "from spark3r_ros.dds_env import pick_free_domain_id; print(pick_free_domain_id())"
    picks = {int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                check=True).stdout.split()[-1]) for _ in range(3)}
    assert mine not in picks


def test_shell_recipe_exports_loopback_env():
    cmd = f'eval "$({sys.executable} -m spark3r_ros.dds_env --domain-id 42)"; ' \
          'echo "$ROS_DOMAIN_ID|$ROS_AUTOMATIC_DISCOVERY_RANGE|$FASTDDS_DEFAULT_PROFILES_FILE|$RMW_IMPLEMENTATION|${ROS_STATIC_PEERS-unset}"'
    env = dict(os.environ, ROS_STATIC_PEERS="10.9.8.7")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == f"42|LOCALHOST|{PROFILE_FILE}|rmw_fastrtps_cpp|unset"
