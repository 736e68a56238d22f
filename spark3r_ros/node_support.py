"""The mapping node's plumbing that needs no ROS: the image queue, the two-stage pipeline, counters,
throttled warnings.

Kept apart from ``mapping_node.py`` (which holds the ROS objects) so each piece is testable on
its own and the node module stays a readable list of publishers, subscriptions and callbacks.
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

WARN_PERIOD_S = 5.0
SESSION_SUBDIR = "session"  # ~/save_map writes the loadable session here, beside map.ply and trajectory.tum


class FrameQueue:
    """Bounded FIFO between the executor (producer) and the intake stage (consumer); when
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


class MappingPipeline:
    """The node's two worker threads, so that keyframes are chosen at camera rate while the
    backbone runs.

    * intake (camera rate): takes each image message from ``queue`` and hands it to
      ``intake(msg)`` (decode, checks, ``Mapper.offer``: a few ms), which returns True when a
      keyframe was accepted. Accepted keyframes wait in the mapper's bounded pending store
      (``max_pending_keyframes``; beyond it the oldest are dropped and counted).
    * inference: whenever keyframes wait, runs ``mapper.process_pending()`` until nothing is due
      and calls ``publish(epoch, stats_before, stats_after, result)`` after every call (``result``
      may be None: no window due, or a window that gave no poses; the stats tell which).

    ``Mapper.offer`` never waits for a running window (the mapper's locking), so the intake keeps
    pace with the camera whatever the backbone's latency. ``map_epoch`` counts new maps (reset,
    time jump; :meth:`new_map`, called by the owner under its publishing lock): a result whose
    epoch is older belongs to the previous map and must not be published. An exception in a
    stage goes to ``on_error(stage, exc)`` and the stage goes on (one bad message must never stop
    the mapping).
    """

    def __init__(self, queue: FrameQueue, intake: Callable[[object], bool], mapper, publish: Callable,
                 on_error: Callable[[str, Exception], None], poll_s: float = 0.1):
        self.queue, self.mapper = queue, mapper
        self._intake, self._publish, self._on_error, self._poll_s = intake, publish, on_error, poll_s
        self._keyframes_waiting = threading.Event()
        self._stop = threading.Event()
        self.map_epoch = 0
        self.inference_running = False  # a process_pending call (maybe a backbone run) is in progress
        self._threads = [threading.Thread(target=self._loop, args=(name, step), name=f"spark3r_mapping_{name}", daemon=True)
                         for name, step in (("intake", self._intake_step), ("inference", self._inference_step))]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop both stages (a running window is finished first) and wait for them."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def pending_capacity(self) -> int:
        """Keyframes that may wait for the backbone (``max_pending_keyframes``; 0 without a mapper)."""
        return self.mapper.config.window.max_pending_keyframes if self.mapper is not None else 0

    def new_map(self) -> None:
        self.map_epoch += 1

    def idle(self) -> bool:
        """Nothing queued, pending or being inferred (for tests and diagnostics)."""
        return (not len(self.queue) and not self.inference_running
                and (self.mapper is None or not self.mapper.backlog) and not self._keyframes_waiting.is_set())

    def _loop(self, name: str, step: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - reported, and the stage goes on
                if self._stop.is_set():
                    return  # shutting down: the owner's publishers may be gone
                self._on_error(name, exc)

    def _intake_step(self) -> None:
        msg = self.queue.get(timeout=self._poll_s)
        if msg is not None and self._intake(msg):
            self._keyframes_waiting.set()

    def _inference_step(self) -> None:
        if not self._keyframes_waiting.wait(self._poll_s) or self.mapper is None:
            return
        self._keyframes_waiting.clear()
        while not self._stop.is_set():
            epoch = self.map_epoch
            before = self.mapper.stats
            self.inference_running = True
            try:
                result = self.mapper.process_pending()
            finally:
                self.inference_running = False
            self._publish(epoch, before, self.mapper.stats, result)
            if result is None and not self.mapper.backlog:
                return


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
    sessions_loaded: int = 0               # ~/load_map (or load_directory at start-up) succeeded
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
    if values.get("tracking_state") == "LOST":
        return "warn", (f"tracking LOST for {values.get('tracking_lost_windows', 0)} window(s): not aligned to the map "
                        "or their output dropped" + ("; relocalizing (new windows run in a segment not yet linked to "
                                                     "the map)" if values.get("backend") else ""))
    text = f"{values['windows_mapped']} windows, {values['keyframes']} keyframes, {values['map_points']} map points"
    if values.get("backend"):
        text += (f", {values.get('loops_accepted', 0)} loops ({values.get('loops_rejected', 0)} rejected)"
                 + (", localization only" if values.get("localization_only") else ""))
    if values.get("tracking_state") == "RELOCALIZED":
        text = "RELOCALIZED: " + text
    return "ok", text


def mapper_diagnostics(mapper) -> dict:
    """The mapper's counters as flat diagnostic values (dict counters as ``name.key``). The
    mapper's tracking state is left out: the node reports the composer's, which adopts the back
    end's state after every mapped window and turns LOST on a window that gave no poses."""
    stats = mapper.stats.as_dict()
    stats.pop("tracking_state", None)
    values = {}
    for name, value in stats.items():
        if isinstance(value, dict):
            values.update({f"{name}.{k}": v for k, v in sorted(value.items())})
        else:
            values[name] = value
    values["trajectory_keyframes"] = len(mapper.trajectory)  # mapped keyframes of the current map
    values["backend"] = int(bool(getattr(mapper, "backend_enabled", False)))
    values["localization_only"] = int(bool(getattr(mapper, "localization_only", False)))
    # CPU threads the last window ran with (set in the inference thread)
    values["inference_threads"] = getattr(mapper.backbone, "threads_used", None) or 0
    return values


def camera_info_intrinsics(camera_info, image_shape) -> tuple[Optional["np.ndarray"], str]:
    """``(K, problem)`` for an image of ``image_shape`` from the last camera_info ``(K, width,
    height)``: K when it fits; else None and ``"none"`` (no camera_info yet) or the size mismatch
    in words (the backbone's intrinsics are used then)."""
    if camera_info is None:
        return None, "none"
    K, width, height = camera_info
    if (height, width) != tuple(image_shape[:2]):
        return None, (f"camera_info is for {width}x{height} but the image is {image_shape[1]}x{image_shape[0]}: "
                      "using the backbone's intrinsics")
    return K, ""


def static_extrinsic(static_tf, base_frame: str, camera_frame: str):
    """``(T_base_camera, None)`` from the /tf_static cache, or ``(None, (warning key, warning))``."""
    if not camera_frame:
        return None, ("no_frame_id", "image has an empty header.frame_id: cannot look up the camera extrinsic; "
                                     "assuming the camera at the base origin")
    T = static_tf.lookup(base_frame, camera_frame)
    if T is None:
        return None, ("no_extrinsic", f"no /tf_static path {base_frame} -> {camera_frame} (yet): assuming the camera "
                                      "optical frame at the base origin, looking along base x")
    return T, None


def save_map(mapper, directory) -> str:
    """``~/save_map``: ``map.ply`` and ``trajectory.tum`` in ``directory`` and, with the back end,
    the loadable session (atomic, versioned: :mod:`spark3r.mapping.session`) in
    ``directory/session``. Returns the message; OSError/ValueError name the folder."""
    directory = Path(os.path.expanduser(str(directory)))
    try:
        paths = mapper.save(directory)
        session = mapper.save_session(directory / SESSION_SUBDIR) if mapper.backend_enabled else None
    except (OSError, ValueError) as exc:
        raise type(exc)(f"could not save to {directory}: {exc}") from None
    return (f"saved {len(mapper.voxel_map)} points to {paths['map']} and {len(mapper.trajectory)} keyframe poses to "
            f"{paths['trajectory']}" + (f"; session in {session}" if session is not None else
                                         " (no session: pose_graph is off)"))


def load_map(mapper, directory, localization_only: bool) -> str:
    """``~/load_map``: replace the mapper's map with the session saved in ``directory`` (see
    :func:`session_directory`). Returns the message; ValueError/OSError name the folder."""
    if not directory:
        raise ValueError("parameter load_directory is empty: set it to a folder written by ~/save_map")
    path = session_directory(directory)
    try:
        loaded = mapper.load_session(path, localization_only=localization_only)
    except (OSError, ValueError) as exc:
        raise type(exc)(f"could not load a session from {path}: {exc}") from None
    mode = "localization only (the map is not extended)" if localization_only else "mapping (new keyframes extend it)"
    return f"loaded {loaded} keyframes from {path}; {mode}; relocalizing against it"


def session_directory(directory) -> Path:
    """The session folder of a map saved by ``~/save_map`` (``<dir>/session``) or ``directory``
    itself when it is one (holds ``session.json``)."""
    path = Path(os.path.expanduser(str(directory)))
    return path / SESSION_SUBDIR if (path / SESSION_SUBDIR / "session.json").is_file() else path


def diagnostic_text(value) -> str:
    """A diagnostic value as the string a ``KeyValue`` carries."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
