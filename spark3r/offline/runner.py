"""``spark3r map``: run the node's streaming mapper over a recorded input and write its outputs.

Output directory (appears atomically; ``report.json`` says whether the run was complete):

* ``trajectory.tum``   keyframe camera (optical frame) poses in the map frame, source stamps
* ``map.ply``          the voxel map (map frame, coloured)
* ``keyframes/<stamp>_depth.png`` 16-bit depth (map units = value * ``depth_scale``, 0 = none),
  ``keyframes/<stamp>_conf.png`` 16-bit confidence (value * ``conf_scale``); ``keyframes.json``
  lists them with scales, intrinsics and the depth grid's image box
* ``mapping.bag/``     rosbag2 mcap with /tf, /tf_static, odometry, path, clouds, named as the
  live node publishes them (see map_bag.py; after a loop closure or relocalization, the corrected
  path and the rebuilt map, as the node republishes them)
* ``report.json``      input, timings, drops, scales, alignment residuals, ``"complete"`` and
  ``"interrupted"`` flags

Everything is written into a hidden staging directory beside the output and renamed into place
at the end. Ctrl-C (SIGINT) or SIGTERM (``timeout``, systemd, ``docker stop``; it does not wait
for the window in flight) stops reading input, finishes the outputs for what was mapped so far
and marks the report ``"interrupted": true, "complete": false`` with the signal's name in
``"stopped_by"``; an error removes the staging directory, so no output that looks complete is
ever left behind. A run that mapped no keyframe still writes everything, with
``"mapped_nothing": true``.

``report.json`` is strict JSON (``null`` for a value that does not exist, never ``NaN``). Every
backbone run is timed, also those whose window was then dropped or rejected
(``"window_attempts"``), so a run that mapped nothing can still be timed.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, TextIO

import numpy as np

from spark3r.data import strict_json
from spark3r.data.io import temp_sibling, atomic_write, format_stamp_ns
from spark3r.mapping import Frame, Mapper, MapperConfig, WindowResult
from spark3r.mapping.config import OutputConfig
from spark3r.mapping.outputs import OutputComposer, backend_poses
from spark3r.mapping.tracking import poses_moved
from spark3r.offline.inputs import OfflineInput
from spark3r.offline.map_bag import MapBagWriter

log = logging.getLogger(__name__)

PNG_MAX = 65535


class RecordingBackbone:
    """Wraps a backbone and keeps its recent predictions, so per-keyframe depth and confidence
    can be saved for the keyframes each window maps (the mapper keeps them private). The back
    end also runs the backbone on loop-verification windows; :meth:`covering` picks the mapping
    window among them."""

    def __init__(self, backbone):
        self.inner = backbone
        self._recent: deque = deque(maxlen=8)   # (window ids, prediction), newest last
        self.calls = 0
        self.last_latency_s: Optional[float] = None  # wall time of the last call, also a failed one

    def predict(self, window):
        self.calls += 1
        self.last_latency_s = None
        t0 = time.monotonic()
        try:
            prediction = self.inner.predict(window)
        finally:
            self.last_latency_s = time.monotonic() - t0
        self._recent.append((tuple(kf.id for kf in window), prediction))
        return prediction

    def covering(self, keyframe_ids) -> tuple[tuple[int, ...], object]:
        """The newest prediction whose window holds all of ``keyframe_ids``: ``(ids, prediction)``
        or ``((), None)``."""
        wanted = set(keyframe_ids)
        for ids, prediction in reversed(self._recent):
            if wanted <= set(ids):
                return ids, prediction
        return (), None

    def forget(self, keyframe_ids) -> None:
        forget = getattr(self.inner, "forget", None)
        if callable(forget):
            forget(keyframe_ids)

    def reset(self) -> None:
        reset = getattr(self.inner, "reset", None)
        if callable(reset):
            reset()


class Progress:
    """Progress of a run (frames, keyframes, windows, last latency, map size) on ``stream``.

    ``live=True`` (a terminal): one status line redrawn in place at most 5 times a second.
    ``live=False`` (a log file, CI, a pipe): a plain line at most every ``interval_s`` seconds,
    so a long run under a logger is not silent yet does not flood it.
    """

    def __init__(self, stream: Optional[TextIO], total: Optional[int], live: bool = True, interval_s: float = 30.0):
        if not (np.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"progress interval must be a positive number of seconds, got {interval_s!r}")
        self.stream, self.total, self.live = stream, total, live
        self.interval_s = 0.2 if live else float(interval_s)
        self._last = time.monotonic() if not live else 0.0  # plain mode: the first line after one interval
        self._on_line = False  # a live line is drawn and not yet ended

    def update(self, frames: int, mapper: Mapper, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        st = mapper.stats
        total = f"/{self.total}" if self.total else ""
        latency = f"{st.last_latency_s:.2f} s" if np.isfinite(st.last_latency_s) else "-"
        text = (f"frames {frames}{total} | keyframes {st.keyframes} | windows {st.windows_mapped}/{st.windows}"
                f" | latency {latency} | map {st.map_points} pts")
        if self.live:
            bar = ""
            if self.total:
                filled = int(24 * min(frames, self.total) / self.total)
                bar = "[" + "#" * filled + "." * (24 - filled) + "] "
            self.stream.write(f"\r{bar}{text}   ")
            self._on_line = True
        else:
            self.stream.write(f"spark3r map: progress: {text}\n")
        self.stream.flush()

    def clear_line(self) -> None:
        """Blank the live line so that a log message gets a line of its own (the next update
        redraws the status)."""
        if self.stream is not None and self._on_line:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._on_line = False

    def close(self) -> None:
        if self.stream is not None and self._on_line:
            self.stream.write("\n")
            self.stream.flush()
            self._on_line = False


class _ClearLiveLine(logging.Filter):
    """Attached to the log handlers that write to the progress stream while a live progress
    line is shown: before a record is written, the line is blanked, so a WARNING never lands in
    the middle of the status line. It filters nothing out."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear_line()
        return True


@contextmanager
def _logs_beside(progress: Progress) -> Iterator[None]:
    handlers = []
    if progress.live and progress.stream is not None:
        handlers = [h for h in logging.getLogger().handlers
                    if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is progress.stream]
    guard = _ClearLiveLine(progress)
    for h in handlers:
        h.addFilter(guard)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(guard)


def _png16(path: Path, values: np.ndarray) -> float:
    """Write non-negative ``values`` as a 16-bit PNG with a scale so the maximum uses the full
    range; non-finite and non-positive values become 0. Returns the scale (units per count)."""
    import cv2

    finite = np.isfinite(values) & (values > 0)
    peak = float(values[finite].max()) if np.any(finite) else 0.0
    scale = peak / PNG_MAX if peak > 0 else 1.0
    counts = np.where(finite, np.round(np.where(finite, values, 0) / scale), 0).astype(np.uint16)
    ok, buf = cv2.imencode(".png", counts)
    if not ok:
        raise ValueError(f"PNG encoding failed for {path}")
    with atomic_write(path) as fh:
        fh.write(buf.tobytes())
    return scale


@dataclass
class _Run:
    staging: Path
    bag: MapBagWriter
    composer: OutputComposer
    recorder: RecordingBackbone
    keyframes: list = field(default_factory=list)
    windows: list = field(default_factory=list)

    def save_window(self, result: WindowResult, backend=None) -> None:
        ids, pred = self.recorder.covering([kf.id for kf in result.keyframes])
        if result.keyframes:
            self.bag.write_window(self.composer.compose_window(result, backend=backend))
        for kf in result.keyframes:
            entry = {"id": kf.id, "stamp": format_stamp_ns(kf.stamp_ns), "stamp_ns": kf.stamp_ns,
                     "window": result.window_index, "K": np.asarray(kf.K).tolist()}
            if pred is not None and kf.id in ids:
                i = ids.index(kf.id)
                name = format_stamp_ns(kf.stamp_ns)
                depth = np.asarray(pred.depth[i], dtype=np.float64) * result.scale
                entry.update(depth_png=f"keyframes/{name}_depth.png",
                             depth_scale=_png16(self.staging / "keyframes" / f"{name}_depth.png", depth),
                             conf_png=f"keyframes/{name}_conf.png",
                             conf_scale=_png16(self.staging / "keyframes" / f"{name}_conf.png", np.asarray(pred.conf[i], np.float64)),
                             depth_box=[float(b) for b in pred.depth_box])
            self.keyframes.append(entry)
        self.windows.append({"window": result.window_index, "keyframes": len(result.keyframes),
                             "latency_s": result.latency_s, "scale": result.scale, "residual": result.residual,
                             "inlier_fraction": result.inlier_fraction, "shared_keyframes": result.shared_keyframes,
                             "starts_map": result.starts_map, "points": int(len(result.points_xyz))})


class _StopFlag:
    requested = False
    signal_name: Optional[str] = None  # "SIGINT" / "SIGTERM": what stopped the run
    finishing = False  # the outputs are being written: a SIGTERM no longer interrupts


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _graceful_interrupt() -> Iterator[_StopFlag]:
    """Stop signals end the run with valid partial outputs for what was mapped.

    Ctrl-C (SIGINT): the first asks the loop to stop after the current frame (so no message or
    file is cut in half); a second one raises KeyboardInterrupt at once (e.g. inside a long
    window): the loop still writes partial outputs, but one that lands while the outputs are
    being finished aborts the run and leaves nothing.

    SIGTERM (``timeout``, systemd, ``docker stop``): a process manager waits only seconds before
    SIGKILL, so it stops at once, like a second Ctrl-C (the window in flight is abandoned), but
    once the outputs are being written it is ignored so that they are finished.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        terminate = signum == signal.SIGTERM
        if terminate and flag.finishing:
            return
        first = not flag.requested
        if first:
            flag.requested = True
            flag.signal_name = signal.Signals(signum).name
        if first and not terminate:
            log.warning("Ctrl-C: finishing the current frame, then writing partial outputs "
                        "(Ctrl-C again: stop without waiting for the running window)")
            return
        if terminate:
            log.warning("SIGTERM: stopping now and writing partial outputs")
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)), "max": float(a.max()),
            "min": float(a.min())}


def run_map(source: OfflineInput, out_dir, config: MapperConfig, backbone, *, backbone_info: Optional[dict] = None,
            overwrite: bool = False, progress: Optional[TextIO] = None, max_frames: Optional[int] = None,
            live_progress: bool = True, progress_interval_s: float = 30.0,
            load_session=None, localization_only: bool = False, save_session=None) -> dict:
    """Map every frame of ``source`` with ``Mapper(config, backbone)`` and write the outputs to
    ``out_dir`` (see the module docstring). Returns the report. Ctrl-C / SIGTERM
    (KeyboardInterrupt) ends the run early with valid partial outputs; other errors leave nothing
    at ``out_dir``. ``progress``: stream for progress (None: none), a live line when
    ``live_progress`` else a plain line every ``progress_interval_s`` seconds.

    Sessions (:mod:`spark3r.mapping.session`): ``load_session`` starts from a saved map (and,
    with ``localization_only``, only localizes in it); ``save_session`` writes the session
    at the end (its own atomic directory)."""
    if localization_only and load_session is None:
        raise ValueError("localization-only mode needs a session to localize in (--load-session)")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot create {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {out}: directory {out.parent} is not writable")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    reporter = Progress(progress, source.expected_frames if max_frames is None else max_frames, live=live_progress,
                        interval_s=progress_interval_s)
    staging = temp_sibling(out)
    try:
        staging.mkdir()
    except OSError as exc:  # name the user's folder, not the hidden staging one
        raise type(exc)(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        with _graceful_interrupt() as stop, _logs_beside(reporter):
            report = _map_into(source, staging, config, backbone, backbone_info, reporter, max_frames, stop,
                               load_session, localization_only, save_session)
            if out.exists():
                old = temp_sibling(out)
                os.replace(out, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        written = _inside(exc.filename, staging)
        if written is None:  # not one of our outputs (e.g. reading the input)
            raise
        # A full disk or a revoked permission while writing: name the output the user asked for.
        raise type(exc)(f"cannot write {out / written}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _inside(filename, folder: Path) -> Optional[Path]:
    """``filename`` relative to ``folder`` if it lies in it, else None."""
    if not filename:
        return None
    try:
        return Path(os.fsdecode(filename)).relative_to(folder)
    except ValueError:
        return None


# MapperStats counters -> outcome of a window whose backbone run gave no WindowResult.
_DROP_COUNTERS = {"backbone_errors": "backbone_error", "windows_dropped_invalid": "dropped_invalid",
                  "windows_dropped_nonfinite": "dropped_nonfinite", "windows_rejected_alignment": "rejected_alignment",
                  "windows_discarded_after_reset": "discarded_after_reset"}


def _drop_counts(mapper: Mapper) -> dict:
    stats = mapper.stats
    return {name: getattr(stats, name) for name in _DROP_COUNTERS}


def _map_into(source: OfflineInput, staging: Path, config: MapperConfig, backbone, backbone_info, progress: Progress,
              max_frames, stop: _StopFlag, load_session=None, localization_only: bool = False,
              save_session=None) -> dict:
    recorder = RecordingBackbone(backbone)
    mapper = Mapper(config, recorder, base_to_camera=source.base_to_camera)
    if load_session is not None:
        mapper.load_session(load_session, localization_only=localization_only)
    (staging / "keyframes").mkdir()
    # The live node's default frames and TF policy (it owns odometry), with the input's base frame.
    try:
        composer = OutputComposer(OutputConfig(base_frame=source.base_frame))
    except ValueError as exc:
        raise ValueError(f"the input's base frame {source.base_frame!r} (root of its /tf_static) cannot be the "
                         f"outputs' base_link: {exc}") from None
    bag = MapBagWriter(staging / "mapping.bag")
    run = _Run(staging, bag, composer, recorder)
    attempts: list[dict] = []  # every backbone run: its outcome and latency

    def step(force: bool) -> Optional[WindowResult]:
        calls, before, stats_before = recorder.calls, _drop_counts(mapper), mapper.stats
        result = mapper.process_pending(force=force)
        if recorder.calls == calls:
            return result
        if result is not None:
            outcome = "mapped"
            run.save_window(result, backend_poses(mapper))
            if poses_moved(stats_before, mapper.stats):  # a loop or relocalization: what the node republishes
                mapper.refresh_map()
                bag.write_poses_update(composer.compose_poses_updated(mapper.trajectory, *mapper.voxel_map.points()))
        else:
            after = _drop_counts(mapper)
            outcome = next((_DROP_COUNTERS[k] for k in _DROP_COUNTERS if after[k] > before[k]), "dropped")
            if outcome != "discarded_after_reset":  # a window that gave no poses: tracking lost, as in the node
                lost = composer.compose_lost(mapper.stats.last_window_stamp_ns)
                if lost is not None:
                    bag.write_odometry(lost)
        attempts.append({"attempt": len(attempts) + 1, "outcome": outcome, "latency_s": recorder.last_latency_s,
                         "window": result.window_index if result is not None else None})
        return result

    interrupted = False
    t_start = time.monotonic()
    first_stamp = last_stamp = None
    frames = 0
    try:
        try:
            for frame in source.frames():
                if first_stamp is None:
                    bag.write_static(composer.static_transform(frame.stamp_ns, mapper.base_to_camera, source.camera_frame))
                    first_stamp = frame.stamp_ns
                last_stamp = frame.stamp_ns
                mapper.offer(Frame(frame.image, frame.stamp_ns, source.K))
                frames += 1
                while step(force=False) is not None or mapper.backlog:
                    pass
                progress.update(frames, mapper)
                if max_frames is not None and frames >= max_frames:
                    break
                if stop.requested:
                    raise KeyboardInterrupt
            if frames == 0:
                raise ValueError(f"{source.path}: no decodable frames (read {source.corrupt_frames} corrupt ones); "
                                 "nothing to map")
            while step(force=True) is not None or mapper.backlog:  # what Mapper.flush does, each run timed
                pass
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: writing the outputs of the %d keyframes mapped so far", len(mapper.trajectory))
        stop.finishing = True
        progress.update(frames, mapper, force=True)
        progress.close()
        mapper.refresh_map()  # the back end's map cache at the final poses
        xyz, rgb = mapper.voxel_map.points()
        if first_stamp is not None:
            bag.write_map(composer.map_cloud(xyz, rgb, last_stamp))
        bag.close()
    except BaseException:
        bag.abort()
        raise
    mapper.save(staging)
    if save_session is not None:
        mapper.save_session(save_session)
    with atomic_write(staging / "keyframes.json", "w") as fh:
        strict_json.dump({"frame": "map", "depth_units": "map units (= metres only for a metric backbone)",
                          "keyframes": run.keyframes}, fh, indent=1)
    stats = mapper.stats
    wall = time.monotonic() - t_start
    dropped = [a for a in attempts if a["outcome"] != "mapped"]
    report = {
        "complete": not interrupted,
        "interrupted": interrupted,
        "stopped_by": (stop.signal_name or "KeyboardInterrupt") if interrupted else None,
        "mapped_nothing": len(mapper.trajectory) == 0,
        "input": source.summary(),
        "backbone": backbone_info or {"type": type(backbone).__name__},
        "mapper_config": _config_dict(config),
        "frames": frames,
        "keyframes_mapped": len(mapper.trajectory),
        "map_points": int(len(xyz)),
        "timings": {"wall_s": wall, "frames_per_s": frames / wall if wall > 0 else None,
                    "window_latency_s": _summary([w["latency_s"] for w in run.windows]),
                    "dropped_window_latency_s": _summary([a["latency_s"] for a in dropped if a["latency_s"] is not None]),
                    "all_window_latency_s": _summary([a["latency_s"] for a in attempts if a["latency_s"] is not None]),
                    # CPU threads the model ran with (spark3r.threads; None for a test double)
                    "inference_threads": getattr(backbone, "threads_used", None)},
        "drops": {"corrupt_frames": source.corrupt_frames,
                  "keyframes_dropped_backlog": stats.keyframes_dropped_backlog,
                  "keyframes_dropped_unmapped": stats.keyframes_dropped_unmapped,
                  "windows_rejected_alignment": stats.windows_rejected_alignment,
                  "windows_dropped_nonfinite": stats.windows_dropped_nonfinite,
                  "windows_dropped_invalid": stats.windows_dropped_invalid,
                  "backbone_errors": stats.backbone_errors, "last_backbone_error": stats.last_backbone_error or None,
                  "resets": stats.resets},
        "scale": {"per_window": [w["scale"] for w in run.windows], "max_drift": stats.max_scale_drift},
        "alignment_residuals": _summary([w["residual"] for w in run.windows if not w["starts_map"]]),
        "windows": run.windows,
        "window_attempts": attempts,
        "mapper_stats": stats.as_dict(),
        "stamps": {"first": format_stamp_ns(first_stamp) if first_stamp is not None else None,
                   "last": format_stamp_ns(last_stamp) if last_stamp is not None else None},
        "outputs": {"trajectory": "trajectory.tum", "map": "map.ply", "keyframes": "keyframes.json",
                    "bag": "mapping.bag", "report": "report.json"},
    }
    report = strict_json.to_strict(report)
    with atomic_write(staging / "report.json", "w") as fh:
        strict_json.dump(report, fh, indent=1)
    return report


def _config_dict(config: MapperConfig) -> dict:
    from dataclasses import asdict

    return asdict(config)
