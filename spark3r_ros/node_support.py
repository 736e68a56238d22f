"""The mapping node's plumbing that needs no ROS: the image queue, its counters, throttled warnings.

Kept apart from ``mapping_node.py`` (which holds the ROS objects) so each piece is testable on
its own and the node module stays a readable list of publishers, subscriptions and callbacks.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

WARN_PERIOD_S = 5.0


class FrameQueue:
    """Bounded FIFO between the executor (producer) and the mapping worker (consumer); when
    full, ``put`` drops the oldest item so the newest image always gets in."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"queue depth must be >= 1, got {depth}")
        self._items: deque = deque()
        self._depth = int(depth)
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item) -> bool:
        """Append ``item``; True if an older item had to be dropped for it."""
        with self._cond:
            dropped = len(self._items) >= self._depth
            if dropped:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()
            return dropped

    def get(self, timeout: float):
        """The oldest item, or None after ``timeout`` seconds without one."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


@dataclass
class NodeCounters:
    """What the node itself counts (the mapper's own counters are in ``Mapper.stats``)."""

    images_received: int = 0
    images_dropped_queue: int = 0          # overload: oldest queued image dropped
    images_dropped_no_backbone: int = 0    # backbone failed to load
    images_bad: int = 0                    # undecodable: wrong encoding, bad payload, corrupt jpeg
    frames_rejected_bad_image: int = 0     # decoded, but unusable (too small, ...)
    camera_info_bad: int = 0
    camera_info_size_mismatch: int = 0
    time_jumps_backwards: int = 0
    map_to_odom_missing_odometry: int = 0  # external odom -> base not available at the image stamp
    windows_published: int = 0
    last_error: str = ""


class WarningThrottle:
    """Warn at most once per period per key (and say how many were suppressed)."""

    def __init__(self, logger, period_s: float = WARN_PERIOD_S):
        self._logger = logger
        self._period = period_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self._period:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        extra = f" ({suppressed} similar messages suppressed)" if suppressed else ""
        self._logger.warning(message + extra)


class RateMeter:
    """Events per second over the last ``window_s`` seconds (the input image rate)."""

    def __init__(self, window_s: float = 5.0):
        self._window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def record(self) -> None:
        with self._lock:
            self._times.append(time.monotonic())

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._times and now - self._times[0] > self._window_s:
                self._times.popleft()
            return len(self._times) / self._window_s


def diagnostic_summary(values: dict, backbone_error: str) -> tuple[str, str]:
    """``(level, message)`` of the node's diagnostic status; level is "ok", "warn" or "error"."""
    if backbone_error:
        return "error", f"backbone not loaded: {backbone_error}"
    if values["images_received"] == 0:
        return "warn", "no images received yet"
    if values.get("windows_mapped", 0) == 0:
        return "ok", "waiting for the first window"
    return "ok", f"{values['windows_mapped']} windows, {values['keyframes']} keyframes, {values['map_points']} map points"


def diagnostic_text(value) -> str:
    """A diagnostic value as the string a ``KeyValue`` carries."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
