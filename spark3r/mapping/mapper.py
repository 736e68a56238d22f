"""The streaming keyframe mapper: frames in, map poses + a voxel map out. No ROS, no torch.

Data path: ``offer(frame)`` (keyframe gate, cheap) -> pending keyframes -> ``process_pending()``
(sliding window; the backbone runs every ``window_stride`` new keyframes) -> Prediction in the
window's own similarity frame -> robust Sim(3) to the map through the keyframes the window
shares with it -> new keyframes get map poses, their confident depth becomes map points.

Map frame (REP-103, z up): the first keyframe's ``base_link`` is the origin when the
base->camera extrinsic is known; otherwise the first camera's optical frame re-expressed with the
standard optical->body rotation (x forward, y left, z up). The map's unit is the first window's
unit (metres only if the backbone is metric); later windows are scaled into it. The extrinsic's
translation is used as given, so it is only exact when the backbone is metric.

Threading: ``offer`` may be called from the image callback while one worker thread runs
``process_pending`` in a loop (see :attr:`Mapper.backlog`). ``offer`` never waits for inference:
it only takes a small lock that the worker holds for microseconds. ``process_pending``,
``flush`` and ``reset`` are serialised among themselves (``reset`` may wait for a running
window). ``trajectory``, ``voxel_map.points()``, ``stats``, ``backlog``, ``save`` and
``set_base_to_camera`` are safe from any thread; readers get copies.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..geometry import invert_rigid, is_rigid
from .alignment import Sim3, robust_sim3
from .backbone import Backbone, Prediction
from .config import MapperConfig
from .frames import Frame, Keyframe, usable_intrinsics
from .keyframes import REJECT_TIME_BACKWARDS, KeyframeDecision, KeyframeGate
from .points import confident_mask, lookup_cells, sample_image, subsample_indices, unproject_cells
from .voxel_map import VoxelMap

log = logging.getLogger(__name__)

# Pose of a camera optical frame (x right, y down, z forward) in a REP-103 body frame
# (x forward, y left, z up): the rotation used when no base->camera extrinsic is known.
OPTICAL_IN_BODY = np.array(
    [[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


@dataclass(frozen=True)
class MappedKeyframe:
    """A keyframe with its map pose. ``camera_to_map``/``base_to_map`` are rigid 4x4
    (``p_map = T @ p_local``); ``K`` is the intrinsics used for its points (image pixels)."""

    id: int
    stamp_ns: int
    camera_to_map: np.ndarray
    base_to_map: np.ndarray
    K: np.ndarray
    window_index: int


@dataclass(frozen=True)
class WindowResult:
    """What one backbone run added to the map (what the node publishes)."""

    window_index: int
    keyframes: tuple[MappedKeyframe, ...]   # newly mapped keyframes, oldest first
    points_xyz: np.ndarray                  # float32 [N, 3], map frame
    points_rgb: np.ndarray                  # uint8 [N, 3]
    scale: float                            # window units -> map units (1 for the first window)
    residual: float                         # alignment RMS of inliers / median depth (0 for the first window)
    inlier_fraction: float                  # alignment inlier share of the weight (1 for the first window)
    shared_keyframes: int                   # keyframes the alignment used
    latency_s: float                        # backbone wall time for this window
    starts_map: bool                        # True if this window (re)started the map

    @property
    def latest_stamp_ns(self) -> int:
        return self.keyframes[-1].stamp_ns if self.keyframes else 0


@dataclass
class MapperStats:
    frames_offered: int = 0
    keyframes: int = 0
    decisions: dict = field(default_factory=dict)          # reason -> count, accepted and rejected
    keyframes_dropped_backlog: int = 0                     # pending queue overflow
    keyframes_dropped_unmapped: int = 0                    # left the window without ever being mapped
    frames_missing_intrinsics: int = 0                     # K absent/invalid: backbone's intrinsics used
    windows: int = 0                                       # backbone runs
    last_window_stamp_ns: int = 0                          # newest keyframe stamp of the last backbone run
    windows_mapped: int = 0
    windows_dropped_nonfinite: int = 0                     # NaN/inf poses or intrinsics in the output
    windows_dropped_invalid: int = 0                       # wrong shapes from the backbone
    windows_rejected_alignment: int = 0
    windows_discarded_after_reset: int = 0
    backbone_errors: int = 0
    last_backbone_error: str = ""
    nonfinite_depth_pixels: int = 0                        # masked out, not mapped
    resets: int = 0
    resets_time_backwards: int = 0
    resets_tracking_lost: int = 0
    last_latency_s: float = float("nan")
    last_scale: float = float("nan")
    scale_drift: float = float("nan")                      # |log(scale / previous window's scale)|
    max_scale_drift: float = 0.0
    last_residual: float = float("nan")
    max_residual: float = 0.0
    last_inlier_fraction: float = float("nan")
    map_points: int = 0
    pending_keyframes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _WindowSlot:
    keyframe: Keyframe
    camera_to_map: Optional[np.ndarray] = None
    depth: Optional[np.ndarray] = None        # map units
    conf: Optional[np.ndarray] = None
    K: Optional[np.ndarray] = None            # intrinsics its depth was unprojected with
    depth_box: Optional[tuple] = None


class Mapper:
    def __init__(self, config: MapperConfig, backbone: Backbone, base_to_camera: Optional[np.ndarray] = None):
        if not isinstance(config, MapperConfig):
            raise TypeError(f"config must be a MapperConfig, got {type(config).__name__}")
        if not callable(getattr(backbone, "predict", None)):
            raise TypeError(f"backbone must have a predict(window) method, got {type(backbone).__name__}")
        self.config = config
        self.backbone = backbone
        self.base_to_camera = self._checked_extrinsic(base_to_camera)
        self.voxel_map = VoxelMap(config.map.voxel_size, config.map.max_map_points)
        self._gate = KeyframeGate(config.keyframe)
        self._gate_lock = threading.Lock()     # gate, pending queue, id counter, generation
        self._work_lock = threading.RLock()    # one window at a time; map state
        self._read_lock = threading.Lock()     # trajectory + stats copies
        self._pending: deque[Keyframe] = deque()
        self._next_id = 0
        self._generation = 0
        self._applied_generation = 0
        self._window: list[_WindowSlot] = []
        self._trajectory: deque[MappedKeyframe] = deque(maxlen=config.map.max_trajectory_length)
        self._window_index = 0
        self._last_attempt: tuple[int, ...] = ()
        self._stats = MapperStats()

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def _checked_extrinsic(base_to_camera) -> np.ndarray:
        if base_to_camera is None:
            return OPTICAL_IN_BODY.copy()
        T = np.asarray(base_to_camera, dtype=np.float64)
        if T.shape != (4, 4) or not is_rigid(T):
            raise ValueError("base_to_camera must be a rigid 4x4 transform (pose of the camera optical frame in base_link)")
        return T

    def set_base_to_camera(self, base_to_camera: Optional[np.ndarray]) -> None:
        """Set the extrinsic (e.g. once /tf_static arrives); never blocks. Base poses of keyframes
        mapped from the next window on use it; the map origin (first base_link) is fixed when the
        map starts, so a change of the origin takes effect at the next (re)start of the map."""
        self.base_to_camera = self._checked_extrinsic(base_to_camera)  # one atomic attribute swap

    # ------------------------------------------------------------------ input side

    def offer(self, frame: Frame) -> KeyframeDecision:
        """Run the keyframe gate on ``frame``; accepted frames queue for the next window.

        Cheap (a few ms) and thread-safe; never raises on bad frame content (it is rejected and
        counted). A stamp earlier than the previous frame's (bag loop, restarted driver) resets
        the mapper and the frame starts a new map.
        """
        if not isinstance(frame, Frame):
            raise TypeError(f"offer expects a spark3r.mapping.Frame, got {type(frame).__name__}")
        with self._gate_lock:
            self._stats.frames_offered += 1
            decision = self._gate.decide(frame)
            if decision.reason == REJECT_TIME_BACKWARDS:
                self._count(decision.reason)
                self._request_reset_locked()
                self._stats.resets_time_backwards += 1
                decision = self._gate.decide(frame)
            self._count(decision.reason)
            if not decision.accepted:
                return decision
            K = usable_intrinsics(frame.K)
            if K is None:
                self._stats.frames_missing_intrinsics += 1
            kf = Keyframe(self._next_id, int(frame.stamp_ns), np.array(frame.image, copy=True), K)
            self._next_id += 1
            self._stats.keyframes += 1
            self._pending.append(kf)
            while len(self._pending) > self.config.window.max_pending_keyframes:
                self._pending.popleft()
                self._stats.keyframes_dropped_backlog += 1
            self._stats.pending_keyframes = len(self._pending)
            return replace(decision, keyframe_id=kf.id)

    def _count(self, reason: str) -> None:
        self._stats.decisions[reason] = self._stats.decisions.get(reason, 0) + 1

    # ------------------------------------------------------------------ reset

    def _request_reset_locked(self) -> None:
        self._gate.reset()
        self._pending.clear()
        self._generation += 1
        self._stats.resets += 1
        self._stats.pending_keyframes = 0

    def reset(self) -> None:
        """Forget the map, the trajectory, the window and the queue (statistics are kept)."""
        with self._gate_lock:
            self._request_reset_locked()
        with self._work_lock:
            self._apply_reset_if_requested()

    def _apply_reset_if_requested(self) -> None:
        with self._gate_lock:
            generation = self._generation
        if generation == self._applied_generation:
            return
        self._clear_map()
        self._applied_generation = generation

    def _clear_map(self) -> None:
        self._forget([s.keyframe.id for s in self._window])
        self._window = []
        self._last_attempt = ()
        self.voxel_map.clear()
        with self._read_lock:
            self._trajectory.clear()
            self._stats.map_points = 0
            self._stats.last_scale = float("nan")  # scale drift is measured within one map
        reset_backbone = getattr(self.backbone, "reset", None)
        if callable(reset_backbone):
            reset_backbone()

    def _forget(self, ids) -> None:
        forget = getattr(self.backbone, "forget", None)
        if ids and callable(forget):
            forget(list(ids))

    # ------------------------------------------------------------------ output side

    @property
    def trajectory(self) -> list[MappedKeyframe]:
        """Mapped keyframes, oldest first (a copy)."""
        with self._read_lock:
            return list(self._trajectory)

    @property
    def stats(self) -> MapperStats:
        """A snapshot of the counters."""
        with self._gate_lock, self._read_lock:
            snap = replace(self._stats, decisions=dict(self._stats.decisions))
        return snap

    @property
    def map_started(self) -> bool:
        return any(s.camera_to_map is not None for s in self._window)

    # ------------------------------------------------------------------ the worker

    def process_pending(self, force: bool = False) -> Optional[WindowResult]:
        """Move queued keyframes into the window and, when a window is due, run the backbone and
        extend the map. Returns None when no window was due or the window was dropped (see
        ``stats``). Call repeatedly (a worker loop) until it returns None to drain a backlog.

        ``force``: run even if fewer than ``window_stride`` new keyframes (or, before the map
        exists, fewer than ``window_size``) are waiting, e.g. at the end of a recording.
        """
        with self._work_lock:
            self._apply_reset_if_requested()
            generation = self._fill_window(force)
            if generation is None:
                return None
            return self._run_window(generation)

    def flush(self) -> list[WindowResult]:
        """Map everything still queued (end of stream)."""
        results = []
        while True:
            result = self.process_pending(force=True)
            if result is not None:
                results.append(result)
            elif not self.backlog:
                return results

    @property
    def backlog(self) -> int:
        """Keyframes queued for the worker. A worker loop is
        ``while (r := m.process_pending()) is not None or m.backlog: ...`` (a dropped window
        returns None while keyframes may still be queued)."""
        with self._gate_lock:
            return len(self._pending)

    def _unmapped(self) -> int:
        return sum(1 for s in self._window if s.camera_to_map is None)

    def _due(self, force: bool) -> bool:
        cfg = self.config.window
        if not self.map_started:
            return len(self._window) >= cfg.window_size or (force and len(self._window) >= 1)
        unmapped = self._unmapped()
        return unmapped >= cfg.window_stride or (force and unmapped >= 1)

    def _fill_window(self, force: bool) -> Optional[int]:
        """Pull pending keyframes until a window is due; returns the generation it belongs to,
        or None if not due. The window keeps the newest ``window_size`` keyframes."""
        size = self.config.window.window_size
        while True:
            with self._gate_lock:
                generation = self._generation
                # A window that already failed is not retried until a keyframe is added to it.
                due_now = self._due(force=False) and self._window_ids() != self._last_attempt
                if due_now or not self._pending:
                    self._stats.pending_keyframes = len(self._pending)
                    break
                kf = self._pending.popleft()
                self._stats.pending_keyframes = len(self._pending)
            self._window.append(_WindowSlot(kf))
            if len(self._window) > size:
                old = self._window.pop(0)
                if old.camera_to_map is None:
                    self._stats.keyframes_dropped_unmapped += 1
                self._forget([old.keyframe.id])
        ids = self._window_ids()
        if not self._due(force) or ids == self._last_attempt:
            return None
        self._last_attempt = ids
        return generation

    def _window_ids(self) -> tuple[int, ...]:
        return tuple(s.keyframe.id for s in self._window)

    def _run_window(self, generation: int) -> Optional[WindowResult]:
        window = [s.keyframe for s in self._window]
        self._stats.windows += 1
        self._stats.last_window_stamp_ns = window[-1].stamp_ns
        t0 = time.monotonic()
        try:
            pred = self.backbone.predict(window)
        except Exception as exc:  # a model failure must not take the node down
            self._stats.backbone_errors += 1
            self._stats.last_backbone_error = f"{type(exc).__name__}: {exc}"
            log.exception("backbone failed on a window of %d keyframes", len(window))
            return None
        latency = time.monotonic() - t0
        self._stats.last_latency_s = latency
        problem = pred.shape_problem(len(window)) if isinstance(pred, Prediction) else "backbone did not return a Prediction"
        if problem is not None:
            self._stats.windows_dropped_invalid += 1
            self._stats.last_backbone_error = problem
            log.warning("dropping window: %s", problem)
            return None
        K_used = self._unprojection_intrinsics(pred)
        if not np.all(pred.finite_frames(K_used)):
            self._stats.windows_dropped_nonfinite += 1
            log.warning("dropping window: non-finite pose or intrinsics in the backbone output")
            return None
        depth = np.asarray(pred.depth, dtype=np.float32)
        conf = np.asarray(pred.conf, dtype=np.float32)
        bad = ~(np.isfinite(depth) & np.isfinite(conf))
        if np.any(bad):
            self._stats.nonfinite_depth_pixels += int(bad.sum())
            depth = np.where(bad, np.nan, depth)
            conf = np.where(bad, 0.0, conf).astype(np.float32)
        with self._gate_lock:
            stale = generation != self._generation
        if stale:
            self._stats.windows_discarded_after_reset += 1
            return None
        return self._integrate(pred, K_used, depth, conf, latency)

    def _unprojection_intrinsics(self, pred: Prediction) -> np.ndarray:
        """Per window frame, the intrinsics its depth is unprojected with: the keyframe's own K
        (camera_info) when configured and present, else the backbone's prediction. A frame with a
        calibrated K therefore survives a backbone whose predicted focal length is unusable."""
        K = np.array(pred.K, dtype=np.float64, copy=True)
        if self.config.map.use_camera_info_intrinsics:
            for i, slot in enumerate(self._window):
                if slot.keyframe.K is not None:
                    K[i] = slot.keyframe.K
        return K

    def _integrate(self, pred: Prediction, K_used: np.ndarray, depth: np.ndarray, conf: np.ndarray,
                   latency: float) -> Optional[WindowResult]:
        c2w = np.asarray(pred.c2w, dtype=np.float64)
        base_to_camera = self.base_to_camera  # read once: another thread may swap it
        shared = [i for i, s in enumerate(self._window) if s.camera_to_map is not None]
        starts_map = not shared
        if starts_map:
            if self._trajectory:  # the map existed but no keyframe of it is left in the window
                self._stats.resets_tracking_lost += 1
                self._stats.resets += 1
                log.warning("no keyframe of this window is in the map any more: restarting the map")
                self.voxel_map.clear()
                with self._read_lock:
                    self._trajectory.clear()
                    self._stats.last_scale = float("nan")
            rigid = base_to_camera @ invert_rigid(c2w[0], tol=1e-3)
            to_map = Sim3(1.0, rigid[:3, :3], rigid[:3, 3])
            residual, inlier_fraction = 0.0, 1.0
        else:
            fit = self._align(shared, c2w, pred.depth_box, K_used, depth, conf)
            if fit is None:
                self._stats.windows_rejected_alignment += 1
                return None
            to_map, residual, inlier_fraction = fit
            cfg = self.config.window
            if not (residual <= cfg.max_alignment_residual and inlier_fraction >= cfg.min_inlier_fraction):
                self._stats.windows_rejected_alignment += 1
                log.warning("window rejected: alignment residual %.4f, inliers %.2f", residual, inlier_fraction)
                self._record_alignment(to_map.scale, residual, inlier_fraction)
                return None
        self._record_alignment(to_map.scale, residual, inlier_fraction)
        self._window_index += 1
        poses = to_map.apply_to_poses(c2w)
        new_keyframes, xyz_all, rgb_all = [], [], []
        for i, slot in enumerate(self._window):
            if slot.camera_to_map is not None:
                continue
            slot.camera_to_map = poses[i]
            slot.depth = depth[i] * to_map.scale
            slot.conf = conf[i]
            slot.K = K_used[i]
            slot.depth_box = tuple(float(b) for b in pred.depth_box)
            xyz, rgb = self._keyframe_points(slot)
            xyz_all.append(xyz)
            rgb_all.append(rgb)
            base_to_map = poses[i] @ invert_rigid(base_to_camera)
            new_keyframes.append(MappedKeyframe(slot.keyframe.id, slot.keyframe.stamp_ns, poses[i], base_to_map, slot.K, self._window_index))
        xyz = np.concatenate(xyz_all).astype(np.float32) if xyz_all else np.zeros((0, 3), np.float32)
        rgb = np.concatenate(rgb_all).astype(np.uint8) if rgb_all else np.zeros((0, 3), np.uint8)
        self.voxel_map.insert(xyz, rgb)
        with self._read_lock:
            self._trajectory.extend(new_keyframes)
            self._stats.windows_mapped += 1
            self._stats.map_points = len(self.voxel_map)
        return WindowResult(self._window_index, tuple(new_keyframes), xyz, rgb, to_map.scale, residual, inlier_fraction,
                            len(shared), latency, starts_map)

    def _record_alignment(self, scale: float, residual: float, inlier_fraction: float) -> None:
        s = self._stats
        if math.isfinite(s.last_scale) and s.last_scale > 0 and scale > 0:
            s.scale_drift = abs(math.log(scale / s.last_scale))
            s.max_scale_drift = max(s.max_scale_drift, s.scale_drift)
        s.last_scale = scale
        s.last_residual = residual
        s.max_residual = max(s.max_residual, residual)
        s.last_inlier_fraction = inlier_fraction

    def _keyframe_points(self, slot: _WindowSlot) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config.map
        mask = confident_mask(slot.depth, slot.conf, cfg.conf_percentile, cfg.conf_min)
        idx = subsample_indices(mask, cfg.max_points_per_keyframe)
        xyz, u, v = unproject_cells(slot.depth, idx, slot.depth_box, slot.K, slot.camera_to_map)
        return xyz, sample_image(slot.keyframe.image, u, v)

    def _align(self, shared: list[int], c2w: np.ndarray, depth_box, K_used: np.ndarray, depth: np.ndarray, conf: np.ndarray):
        """Robust Sim(3) window -> map from the shared keyframes' camera centres and depth points.
        Returns (transform, relative residual, inlier fraction) or None if underdetermined."""
        cfg_w, cfg_m = self.config.window, self.config.map
        if len(shared) < cfg_w.min_shared_keyframes:
            return None
        src, dst, weights, map_depths = [], [], [], []
        box = tuple(float(b) for b in depth_box)
        for i in shared:
            slot = self._window[i]
            K_win = K_used[i]
            mask = confident_mask(depth[i], conf[i], cfg_m.conf_percentile, cfg_m.conf_min)
            idx = subsample_indices(mask, cfg_w.alignment_points_per_frame)
            if len(idx) == 0:
                continue
            x_win, u, v = unproject_cells(depth[i], idx, box, K_win, c2w[i])
            cell, inside = lookup_cells(u, v, slot.depth.shape, slot.depth_box)
            d_map = slot.depth.reshape(-1)[cell]
            c_map = slot.conf.reshape(-1)[cell]
            ok = inside & np.isfinite(d_map) & (d_map > 0) & (c_map > 0)
            if not np.any(ok):
                continue
            x_map, _, _ = unproject_cells(slot.depth, cell[ok], slot.depth_box, slot.K, slot.camera_to_map)
            c_win = conf[i].reshape(-1)[idx[ok]]
            src.append(x_win[ok])
            dst.append(x_map)
            weights.append(np.sqrt(np.maximum(c_win, 0) * c_map[ok]))
            map_depths.append(d_map[ok])
        centres_src = np.stack([c2w[i][:3, 3] for i in shared])
        centres_dst = np.stack([self._window[i].camera_to_map[:3, 3] for i in shared])
        if src:
            pts_w = np.concatenate(weights)
            pts_w = pts_w / pts_w.sum()
            share = cfg_w.camera_center_weight
            centre_w = np.full(len(shared), share / len(shared)) if share > 0 else np.zeros(len(shared))
            all_w = np.concatenate([pts_w * (1.0 - share), centre_w])
            src_all = np.concatenate(src + [centres_src])
            dst_all = np.concatenate(dst + [centres_dst])
            median_depth = float(np.median(np.concatenate(map_depths)))
        else:
            if len(shared) < 3:
                return None
            all_w, src_all, dst_all = np.ones(len(shared)), centres_src, centres_dst
            median_depth = float(np.linalg.norm(centres_dst - centres_dst.mean(0), axis=1).mean()) or 1.0
        try:
            fit = robust_sim3(src_all, dst_all, all_w)
        except ValueError as exc:
            log.warning("window alignment failed: %s", exc)
            return None
        return fit.transform, fit.residual_rms / max(median_depth, 1e-12), fit.inlier_fraction

    # ------------------------------------------------------------------ persistence

    def save(self, directory) -> dict[str, Path]:
        """Write ``map.ply`` (voxel map, map frame) and ``trajectory.tum`` (keyframe camera poses
        in the map frame, TUM format) into ``directory`` (created if needed), atomically."""
        from ..data.io import write_ply, write_tum_trajectory

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        xyz, rgb = self.voxel_map.points()
        traj = self.trajectory
        stamps = np.array([k.stamp_ns for k in traj], dtype=np.int64)
        poses = np.stack([k.camera_to_map for k in traj]) if traj else np.zeros((0, 4, 4))
        paths = {"map": out / "map.ply", "trajectory": out / "trajectory.tum"}
        write_ply(paths["map"], xyz, rgb)
        write_tum_trajectory(paths["trajectory"], stamps, poses)
        return paths
