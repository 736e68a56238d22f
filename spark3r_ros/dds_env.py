"""Loopback-only DDS environment for every rclpy process of the project (no ROS imports here).

ROS 2 reads its transport settings from environment variables when ``rclpy.init()`` creates
the participant, so they must be in place before that call, in every process. This module
builds that environment:

* ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``: no multicast discovery; peers are looked for on
  127.0.0.1 only.
* a private ``ROS_DOMAIN_ID`` (1..101), chosen so it does not collide with other DDS
  participants running on this machine (other test sessions, other engineers' nodes).
* ``FASTDDS_DEFAULT_PROFILES_FILE`` = the project's shared-memory profile, whose large SHM
  segment lets full-size images and clouds reach best-effort subscribers.
* ``RMW_IMPLEMENTATION=rmw_fastrtps_cpp`` (the profile is Fast DDS specific), ``ROS_LOG_DIR``
  in the temp dir and ``HOME`` when missing (``rclpy.init`` fails without either).
* variables that could point discovery at other machines are removed (``ROS_STATIC_PEERS``,
  ``ROS_DISCOVERY_SERVER``, ...).

Shell recipe (prints ``export`` lines)::

    eval "$(python -m spark3r_ros.dds_env)"              # random free domain id
    eval "$(python -m spark3r_ros.dds_env --domain-id 42)"

Note: in LOCALHOST mode rmw_fastrtps appends its own default SHM and UDPv4 transports to the
profile's SHM transport; discovery then runs as unicast to 127.0.0.1 without multicast.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import os
import random
import shlex
import tempfile
from pathlib import Path
from typing import Mapping, Optional

PROFILE_FILE = Path(__file__).resolve().parent / "dds" / "fastdds_shm_localhost.xml"

# Linux-safe ROS domain ids: above 101 the RTPS ports run into the ephemeral port range.
# Domain 0 is the default every unconfigured ROS process joins, so it is never handed out.
DOMAIN_ID_MIN, DOMAIN_ID_MAX = 1, 101

# RTPS port mapping (DDSI-RTPS 9.6.1.1): PB + DG * domain + offsets, PB = 7400, DG = 250.
_PORT_BASE, _DOMAIN_GAIN = 7400, 250

# Variables that would let discovery or data leave the machine, or replace our transports.
_REMOVED_VARS = (
    "ROS_LOCALHOST_ONLY",  # deprecated predecessor of the discovery range; conflicts with it
    "ROS_STATIC_PEERS",
    "ROS_DISCOVERY_SERVER",
    "ROS_SUPER_CLIENT",
    "FASTDDS_ENVIRONMENT_FILE",
    "FASTDDS_BUILTIN_TRANSPORTS",
    "FASTRTPS_DEFAULT_PROFILES_FILE",
)

_LOCK_DIR = Path(tempfile.gettempdir()) / f"spark3r_ros_dds_domains_{os.getuid()}"
# Open lock files of the domains this process claimed; they stay locked until the process exits,
# which is how concurrent test sessions see each other's domains.
_claimed_locks: dict[int, int] = {}


def _domain_of_port(port: int) -> Optional[int]:
    if port < _PORT_BASE:
        return None
    domain = (port - _PORT_BASE) // _DOMAIN_GAIN
    return domain if domain <= 232 else None


def _ports_from_shm(shm_dir: Path = Path("/dev/shm")) -> set[int]:
    # Fast DDS shared-memory ports appear as files "fastdds_port<N>" / "fastrtps_port<N>".
    ports = set()
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return ports
    for name in names:
        for prefix in ("fastdds_port", "fastrtps_port"):
            if name.startswith(prefix):
                digits = name[len(prefix):].split("_", 1)[0]
                if digits.isdigit():
                    ports.add(int(digits))
    return ports


def _ports_from_proc_net() -> set[int]:
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 1 and ":" in fields[1]:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def _domain_locked_elsewhere(domain_id: int) -> bool:
    path = _LOCK_DIR / f"{domain_id}.lock"
    if domain_id in _claimed_locks or not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def domains_in_use() -> set[int]:
    """Domain ids that look busy on this machine.

    Evidence: Fast DDS shared-memory port files, bound UDP ports in the RTPS port ranges, and
    lock files of other processes that called :func:`claim_domain_id`. Stale SHM files of
    crashed processes only make a domain look busy, which is the safe direction.
    """
    busy = {d for d in map(_domain_of_port, _ports_from_shm() | _ports_from_proc_net()) if d is not None}
    busy |= {d for d in range(DOMAIN_ID_MIN, DOMAIN_ID_MAX + 1) if _domain_locked_elsewhere(d)}
    return busy


def claim_domain_id(domain_id: int) -> bool:
    """Hold an exclusive lock on ``domain_id`` for this process's lifetime; False if taken."""
    if domain_id in _claimed_locks:
        return True
    _LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(_LOCK_DIR / f"{domain_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _claimed_locks[domain_id] = fd
    return True


def pick_free_domain_id(rng: Optional[random.Random] = None) -> int:
    """A random domain id in 1..101 that no other participant on this machine seems to use.

    The id is claimed (see :func:`claim_domain_id`) before it is returned. If every id looks
    busy, a random claimable one is returned anyway: isolation is then best effort.
    """
    rng = rng or random.SystemRandom()
    candidates = list(range(DOMAIN_ID_MIN, DOMAIN_ID_MAX + 1))
    rng.shuffle(candidates)
    busy = domains_in_use()
    for domain_id in [d for d in candidates if d not in busy] + [d for d in candidates if d in busy]:
        if claim_domain_id(domain_id):
            return domain_id
    return candidates[0]


def _check_domain_id(domain_id) -> int:
    if isinstance(domain_id, bool) or not isinstance(domain_id, int):
        raise TypeError(f"domain_id must be an int in {DOMAIN_ID_MIN}..{DOMAIN_ID_MAX}, got {domain_id!r}")
    if not DOMAIN_ID_MIN <= domain_id <= DOMAIN_ID_MAX:
        raise ValueError(f"domain_id must be in {DOMAIN_ID_MIN}..{DOMAIN_ID_MAX} (0 is the shared default), got {domain_id}")
    return domain_id


def default_log_dir() -> str:
    return str(Path(tempfile.gettempdir()) / f"spark3r_ros_log_{os.getuid()}")


def loopback_env(base: Optional[Mapping[str, str]] = None, domain_id: Optional[int] = None) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) configured for loopback-only DDS.

    ``domain_id=None`` picks (and claims) a random free id; pass the parent's id to put a
    child process on the same private domain. An existing ``ROS_LOG_DIR``/``HOME`` is kept.
    """
    env = dict(os.environ if base is None else base)
    domain_id = pick_free_domain_id() if domain_id is None else _check_domain_id(domain_id)
    for name in _REMOVED_VARS:
        env.pop(name, None)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE_FILE)
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    env.setdefault("ROS_LOG_DIR", default_log_dir())
    if not env.get("HOME"):
        env["HOME"] = tempfile.gettempdir()
    return env


def apply_loopback_env(domain_id: Optional[int] = None) -> dict[str, str]:
    """Configure ``os.environ`` of this process for loopback-only DDS; call before rclpy.init().

    Returns the resulting environment (a copy). Creates ``ROS_LOG_DIR`` if needed.
    """
    env = loopback_env(os.environ, domain_id)
    for name in _REMOVED_VARS:
        os.environ.pop(name, None)
    os.environ.update(env)
    Path(env["ROS_LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    return env


def loopback_problems(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """Why ``env`` (default: ``os.environ``) is not loopback-only DDS; empty list when it is."""
    env = os.environ if env is None else env
    problems = []
    if env.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        problems.append(f"ROS_AUTOMATIC_DISCOVERY_RANGE is {env.get('ROS_AUTOMATIC_DISCOVERY_RANGE')!r}, expected 'LOCALHOST'")
    domain = env.get("ROS_DOMAIN_ID", "")
    if not (domain.isdigit() and DOMAIN_ID_MIN <= int(domain) <= DOMAIN_ID_MAX):
        problems.append(f"ROS_DOMAIN_ID is {domain!r}, expected a private id in {DOMAIN_ID_MIN}..{DOMAIN_ID_MAX}")
    profile = env.get("FASTDDS_DEFAULT_PROFILES_FILE")
    if not profile or not Path(profile).is_file() or Path(profile).resolve() != PROFILE_FILE:
        problems.append(f"FASTDDS_DEFAULT_PROFILES_FILE is {profile!r}, expected {str(PROFILE_FILE)!r}")
    if env.get("RMW_IMPLEMENTATION") != "rmw_fastrtps_cpp":
        problems.append(f"RMW_IMPLEMENTATION is {env.get('RMW_IMPLEMENTATION')!r}, expected 'rmw_fastrtps_cpp'")
    for name in _REMOVED_VARS:
        if env.get(name):
            problems.append(f"{name} is set ({env[name]!r}); it must be unset for loopback-only DDS")
    if not env.get("ROS_LOG_DIR") and not env.get("HOME"):
        problems.append("neither ROS_LOG_DIR nor HOME is set; rclpy.init() would fail")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print shell exports for loopback-only DDS (use with eval).")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS domain id 1..101 (default: random free)")
    args = parser.parse_args(argv)
    env = loopback_env(dict(os.environ), args.domain_id)
    for name in _REMOVED_VARS:
        print(f"unset {name}")
    for name in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID", "FASTDDS_DEFAULT_PROFILES_FILE",
                 "RMW_IMPLEMENTATION", "ROS_LOG_DIR", "HOME"):
        print(f"export {name}={shlex.quote(env[name])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
