"""CPU threads for inference on a shared machine.

A robot's CPU is always shared (camera driver, ROS executor, the node's own threads). Two things
make PyTorch slow there, and this module handles both:

* **Oversubscription.** Torch's intra-op pool defaults to one thread per core. When another
  process keeps one of those cores busy, every parallel op waits at its barrier for the thread
  that lost its core, and a forward pass gets many times slower. The ``threads`` setting (node
  parameter ``threads``, ``--threads`` of every ``spark3r`` command) chooses the pool size; its
  default (0 = auto, :func:`default_threads`) is the usable cores minus :data:`RESERVED_CORES`,
  at least 1.
* **Spin-waiting.** OpenMP threads without work spin by default (libgomp: 300,000 iterations),
  stealing the cycles the thread they wait for needs. ``OMP_WAIT_POLICY=PASSIVE`` makes them
  sleep. OpenMP reads it once, when torch loads it, so it must be in the environment before
  ``import torch``: :func:`prefer_passive_waiting` runs when the ``spark3r`` package is imported,
  which every entry point (``spark3r`` commands, the ROS nodes, launch files) does before torch.
  A value set by the user (e.g. ``OMP_WAIT_POLICY=ACTIVE`` on a dedicated machine) is kept.

Where the count applies: ``torch.set_num_threads`` sets a process-wide default, but OpenMP keeps
the team size per thread (``omp_set_num_threads`` acts on the calling thread; other threads pick
up the process default only when they first run a parallel op). So :func:`apply_threads` is
called in the thread that runs inference (the node's mapping worker, the offline runner), right
before each forward, and returns what that thread will actually use. Inter-op threads (TorchScript
``fork``) are not used by spark3r's eager models and are left alone.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

# Cores left to what runs beside inference. In the node, image decoding and the keyframe gate run
# in the same worker thread as the backbone (one after the other, so they never compete with it);
# beside it run the executor's threads (they only queue messages and answer services/timers) and
# DDS's receive threads, all mostly idle, plus the robot's other processes (camera driver). One
# core covers them; `spark3r map` reads and decodes in its one thread too.
RESERVED_CORES = 1
MAX_THREADS = 1024

_WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_waiting(environ=os.environ) -> str:
    """Ask OpenMP to let idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose
    a policy; returns the policy in effect. Only works before torch is imported (see module
    docstring)."""
    return environ.setdefault(_WAIT_POLICY, "PASSIVE")


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """CPUs allowed by a cgroup quota (``docker run --cpus``, systemd ``CPUQuota``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may run on: its CPU affinity (``taskset``, cpusets), capped by a cgroup
    CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def default_threads(cpus: Optional[int] = None, reserved: int = RESERVED_CORES) -> int:
    """Inference threads that leave ``reserved`` cores to the rest: ``cpus - reserved``, >= 1."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, min(MAX_THREADS, cpus - reserved))


def check_threads(threads) -> int:
    """``threads`` as given by a user (0 = auto); ValueError naming the setting otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an integer in [0, {MAX_THREADS}] (0 = auto: usable cores - "
                         f"{RESERVED_CORES}), got {threads!r}")
    return threads


def resolve_threads(threads: int) -> int:
    """The thread count a ``threads`` setting means (0 = :func:`default_threads`)."""
    return check_threads(threads) or default_threads()


def apply_threads(threads: int) -> int:
    """Set torch's intra-op pool of the *calling* thread to ``threads`` (>= 1) and return the
    count it now uses. Cheap when nothing changes, so it is called before every forward."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def add_threads_argument(parser) -> None:
    """``--threads N`` with the same meaning in every ``spark3r`` command (node: ``threads``)."""
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help=f"CPU threads for inference (torch intra-op), applied in the thread that runs it; "
                             f"0 = auto: usable cores - {RESERVED_CORES}, at least 1 (default 0)")
