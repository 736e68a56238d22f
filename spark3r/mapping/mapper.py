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

Back end (``config.backend.pose_graph``, on by default; see :mod:`.keyframe_store`,
:mod:`.pose_graph`, :mod:`.loop_closure`): every mapped keyframe goes into a keyframe store with
its local points and a Sim(3) node of a gtsam pose graph; each window adds relative constraints
between the keyframes it covers; loop candidates found by place recognition are verified by
re-running the backbone before a loop constraint is added; tracking loss starts a new graph
segment that a later verified link reconnects. Poses in ``trajectory``, ``save`` and the voxel
map (a cache rebuilt from the store) are always the optimised ones.

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
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..geometry import invert_rigid, is_rigid
from .alignment import Sim3, robust_sim3
from .backbone import Backbone, Prediction
from .config import MapperConfig
from .frames import Frame, Keyframe, usable_intrinsics
from .keyframe_store import KeyframePayload, KeyframeStore, StoredKeyframe, sim3_displacement_bound
from .keyframes import REJECT_TIME_BACKWARDS, KeyframeDecision, KeyframeGate
from .loop_closure import (REJECT_GRAPH, REJECT_PREDICTION, KeyframeGeometry, LoopCheck, depth_scale, graph_discrepancy,
                           verify_pair, window_node)
from .place_recognition import search_places
from .points import confident_mask, lookup_cells, sample_image, subsample_indices, unproject_cells
from .pose_graph import FACTOR_LOOP, FACTOR_WINDOW, FactorRecord, PoseGraph
from .tracking import TRACKING_INITIALIZING, TRACKING_LOST, TRACKING_OK, TRACKING_RELOCALIZED
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
    segment: int = 0        # graph segment (a new one starts when tracking is lost)


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
    tracking_state: str = TRACKING_INITIALIZING
    segments: int = 0                                      # graph segments started (tracking losses + 1)
    relocalizations: int = 0                               # lost segments re-linked (or loaded map found)
    loop_candidates: int = 0                               # place-recognition candidates verified
    loops_accepted: int = 0
    loops_rejected: int = 0
    loop_rejections: dict = field(default_factory=dict)    # reason -> count
    loop_verification_errors: int = 0                      # backbone failures on a verification window
    descriptors_dropped: int = 0                           # place descriptors unusable (zero, or not the store's dimension)
    graph_nodes: int = 0
    graph_factors: int = 0
    last_optimisation_s: float = 0.0
    max_optimisation_s: float = 0.0
    map_cache_moves: int = 0                               # keyframes re-inserted in the voxel map after their pose changed
    map_cache_stale: int = 0                               # keyframes whose map points still wait for their new pose
    store_keyframes: int = 0
    store_spilled: int = 0                                 # keyframes whose image and points live on disk

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _WindowSlot:
    keyframe: Keyframe
    pose: Optional[Sim3] = None               # local -> map (None until mapped); rigid without the back end
    depth: Optional[np.ndarray] = None        # local units (map units when it was mapped)
    conf: Optional[np.ndarray] = None
    K: Optional[np.ndarray] = None            # intrinsics its depth was unprojected with
    depth_box: Optional[tuple] = None

    @property
    def mapped(self) -> bool:
        return self.pose is not None


def rigid_matrix(T: Sim3) -> np.ndarray:
    """The rigid camera pose of a local -> map similarity (its scale only scales local points)."""
    M = np.eye(4)
    M[:3, :3] = T.R
    M[:3, 3] = T.t
    return M


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
        self._trajectory: "OrderedDict[int, MappedKeyframe]" = OrderedDict()
        self._window_index = 0
        self._last_attempt: tuple[int, ...] = ()
        self._stats = MapperStats()
        # Back end state (used when config.backend.pose_graph).
        self.store = KeyframeStore(config.backend.store_keyframes_in_memory)
        self.graph = PoseGraph()
        self._segment = -1
        self._last_loop_index = -(1 << 30)        # store index of the query of the last accepted loop
        # Localization-only mode (see load_session): the loaded map is frozen; live keyframes are
        # tracked in their own odometry frame and `_odom_to_map` (found by relocalization)
        # expresses them in the loaded map.
        self.localization_only = False
        self._odom_to_map: Optional[Sim3] = None
        self._live_since_reloc = 0
        self._live_odom: "OrderedDict[int, tuple[Sim3, MappedKeyframe]]" = OrderedDict()
        self._stale_cache: "OrderedDict[int, None]" = OrderedDict()   # keyframes whose map points lag their pose
        self._camera_to_base_cache: tuple = (None, None)

    @property
    def backend_enabled(self) -> bool:
        return self.config.backend.pose_graph

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
        self.store.clear()
        self.graph.clear()
        self._segment = -1
        self._last_loop_index = -(1 << 30)
        self.localization_only = False
        self._odom_to_map = None
        self._live_odom.clear()
        self._stale_cache.clear()
        with self._read_lock:
            self._trajectory.clear()
            self._stats.map_points = 0
            self._stats.last_scale = float("nan")  # scale drift is measured within one map
            self._stats.tracking_state = TRACKING_INITIALIZING
            self._sync_backend_stats()
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
        """Mapped keyframes, oldest first (a copy), with their current (optimised) poses. In
        localization-only mode: the live keyframes, in the loaded map once relocalized."""
        with self._read_lock:
            return list(self._trajectory.values())

    @property
    def stats(self) -> MapperStats:
        """A snapshot of the counters."""
        with self._gate_lock, self._read_lock:
            snap = replace(self._stats, decisions=dict(self._stats.decisions), loop_rejections=dict(self._stats.loop_rejections))
        return snap

    @property
    def tracking_state(self) -> str:
        with self._read_lock:
            return self._stats.tracking_state

    @property
    def map_started(self) -> bool:
        return any(s.mapped for s in self._window)

    def map_to_odom(self) -> np.ndarray:  # may wait for a running window (the worker lock)
        """Rigid 4x4 ``map <- odom`` correction at the newest keyframe: the map pose the back end
        gives it times the inverse of its odometry pose (the front end's chain of window
        alignments, never optimised and continuous across loop closures). Identity before the
        first loop; what a node publishes as ``map -> odom`` (REP-105)."""
        with self._work_lock:
            if self.localization_only:
                return rigid_matrix(self._odom_to_map) if self._odom_to_map is not None else np.eye(4)
            if not len(self.store):
                return np.eye(4)
            newest = self.store[self.store.id_at(len(self.store) - 1)]
            return newest.camera_to_map @ invert_rigid(newest.camera_to_odom, tol=1e-3)

    def pose_covariance(self, keyframe_id: Optional[int] = None) -> np.ndarray:
        """6x6 covariance (rotation rad^2 about x, y, z, then translation map-units^2; REP-103
        odometry order is the node's job) of a keyframe pose from the pose graph's marginal
        (default: the newest keyframe). Large (1e4 on the diagonal) while tracking is lost or
        when the graph cannot give one."""
        lost = np.diag(np.full(6, 1e4))
        with self._work_lock:
            if not self.backend_enabled or not len(self.store) or self._stats.tracking_state == TRACKING_LOST:
                return lost
            key = self.store.id_at(len(self.store) - 1) if keyframe_id is None else int(keyframe_id)
            if key not in self.graph:
                return lost
            cov = self.graph.marginal_covariance(key)
            if cov is None or not np.all(np.isfinite(cov)):
                return lost
            # gtsam's tangent is (rotation, translation / scale in the node's local frame, log-scale).
            T = self.graph.estimate(key)
            J = np.zeros((6, 7))
            J[:3, :3] = T.R
            J[3:, 3:6] = T.scale * T.R
            return J @ cov @ J.T

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
                self.refresh_map()
                return results

    @property
    def backlog(self) -> int:
        """Keyframes queued for the worker. A worker loop is
        ``while (r := m.process_pending()) is not None or m.backlog: ...`` (a dropped window
        returns None while keyframes may still be queued)."""
        with self._gate_lock:
            return len(self._pending)

    def _unmapped(self) -> int:
        return sum(1 for s in self._window if not s.mapped)

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
                if not old.mapped:
                    self._stats.keyframes_dropped_unmapped += 1
                self._forget([old.keyframe.id])
        ids = self._window_ids()
        if not self._due(force) or ids == self._last_attempt:
            return None
        self._last_attempt = ids
        return generation

    def _window_ids(self) -> tuple[int, ...]:
        return tuple(s.keyframe.id for s in self._window)

    def _predict_checked(self, window: list[Keyframe]) -> tuple[Optional[Prediction], str]:
        """Run the backbone; (prediction, "") or (None, why it is unusable). Counts nothing."""
        try:
            pred = self.backbone.predict(window)
        except Exception as exc:  # a model failure must not take the node down
            log.exception("backbone failed on a window of %d keyframes", len(window))
            return None, f"{type(exc).__name__}: {exc}"
        if not isinstance(pred, Prediction):
            return None, "backbone did not return a Prediction"
        problem = pred.shape_problem(len(window))
        return (None, problem) if problem is not None else (pred, "")

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
        return self._intrinsics_for([s.keyframe for s in self._window], pred)

    def _intrinsics_for(self, keyframes: list[Keyframe], pred: Prediction) -> np.ndarray:
        K = np.array(pred.K, dtype=np.float64, copy=True)
        if self.config.map.use_camera_info_intrinsics:
            for i, kf in enumerate(keyframes):
                if kf.K is not None:
                    K[i] = kf.K
        return K

    # ------------------------------------------------------------------ integration of a window

    def _integrate(self, pred: Prediction, K_used: np.ndarray, depth: np.ndarray, conf: np.ndarray,
                   latency: float) -> Optional[WindowResult]:
        c2w = np.asarray(pred.c2w, dtype=np.float64)
        base_to_camera = self.base_to_camera  # read once: another thread may swap it
        shared = [i for i, s in enumerate(self._window) if s.mapped]
        starts_map = not shared
        backend = self.backend_enabled and not self.localization_only
        new_segment = False
        if starts_map:
            if self._trajectory and backend:
                # Tracking lost: keep the map; the window starts a new graph segment placed at
                # the last known pose, until place recognition re-links it.
                self._stats.resets_tracking_lost += 1
                log.warning("no keyframe of this window is in the map any more: tracking lost, starting a new segment")
                to_map = self._segment_start_transform(c2w, depth, conf)
                new_segment = True
            else:
                if self._trajectory:  # the map existed but no keyframe of it is left in the window
                    self._stats.resets_tracking_lost += 1
                    self._stats.resets += 1
                    log.warning("no keyframe of this window is in the map any more: restarting the map")
                    if not self.localization_only:  # a loaded map is never dropped
                        self.voxel_map.clear()
                    with self._read_lock:
                        self._trajectory.clear()
                        self._stats.last_scale = float("nan")
                if self.localization_only:
                    self._odom_to_map = None
                    self._live_odom.clear()
                    with self._read_lock:
                        self._stats.tracking_state = TRACKING_LOST
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
        box = tuple(float(b) for b in pred.depth_box)
        poses = to_map.apply_to_poses(c2w)
        reference = self._window[shared[-1]] if shared else None
        new_idx = [i for i, s in enumerate(self._window) if not s.mapped]
        if backend and (starts_map or new_segment):
            self._segment += 1
            with self._read_lock:
                self._stats.segments += 1
                self._stats.tracking_state = TRACKING_LOST if new_segment else TRACKING_OK
        for i in new_idx:
            slot = self._window[i]
            slot.pose = Sim3(1.0, poses[i][:3, :3], poses[i][:3, 3])
            slot.depth = depth[i] * to_map.scale
            slot.conf = conf[i]
            slot.K = K_used[i]
            slot.depth_box = box
        if backend:
            xyz, rgb = self._store_new_keyframes(pred, new_idx, reference, new_segment or starts_map)
            self._add_window_factors(c2w, depth, box, to_map, residual, inlier_fraction)
            self._apply_estimates(self.graph.update(s.keyframe.id for s in self._window if s.keyframe.id in self.store))
        else:
            xyz_all, rgb_all = [], []
            for i in new_idx:
                x, c = self._keyframe_points(self._window[i], self.config.map.max_points_per_keyframe)
                xyz_all.append(self._window[i].pose.apply(x))
                rgb_all.append(c)
            xyz = np.concatenate(xyz_all).astype(np.float32) if xyz_all else np.zeros((0, 3), np.float32)
            rgb = np.concatenate(rgb_all).astype(np.uint8) if rgb_all else np.zeros((0, 3), np.uint8)
            if not self.localization_only:
                self.voxel_map.insert(xyz, rgb)
            elif self._odom_to_map is not None:  # the window's points, like its poses, in the loaded map
                xyz = self._odom_to_map.apply(xyz.astype(np.float64)).astype(np.float32)
        new_keyframes = []
        for i in new_idx:
            slot = self._window[i]
            mk = self._mapped_keyframe(slot.keyframe.id, slot.keyframe.stamp_ns, self._live_pose(slot), slot.K,
                                       self._window_index, max(self._segment, 0), base_to_camera)
            new_keyframes.append(mk)
        if self.localization_only:
            self._live_since_reloc += len(new_idx)
            for i, mk in zip(new_idx, new_keyframes):
                self._live_odom[mk.id] = (self._window[i].pose, mk)
            while len(self._live_odom) > self.config.map.max_trajectory_length:
                self._live_odom.popitem(last=False)
        with self._read_lock:
            for mk in new_keyframes:
                self._trajectory[mk.id] = mk
            while len(self._trajectory) > self.config.map.max_trajectory_length:
                self._trajectory.popitem(last=False)
            self._stats.windows_mapped += 1
            self._stats.map_points = len(self.voxel_map)
            if self._stats.tracking_state == TRACKING_RELOCALIZED:
                self._stats.tracking_state = TRACKING_OK
            elif self._stats.tracking_state == TRACKING_INITIALIZING and not self.localization_only:
                self._stats.tracking_state = TRACKING_OK
        if backend and self.config.backend.loop_closure and new_idx:
            self._try_loop_closure(self._window[new_idx[-1]].keyframe.id)
            # Poses of this window may have moved with a loop: report the current ones.
            new_keyframes = [self._trajectory.get(mk.id, mk) for mk in new_keyframes]
        elif self.localization_only and new_idx and self.config.backend.loop_closure:
            self._try_relocalization(new_idx[-1], None if pred.descriptors is None else pred.descriptors[new_idx[-1]])
            new_keyframes = [self._trajectory.get(mk.id, mk) for mk in new_keyframes]
        if backend:
            self._refresh_map_cache(self.config.backend.map_updates_per_window)
        with self._read_lock:
            self._stats.map_points = len(self.voxel_map)
            self._sync_backend_stats()
        return WindowResult(self._window_index, tuple(new_keyframes), xyz, rgb, to_map.scale, residual, inlier_fraction,
                            len(shared), latency, starts_map)

    def _live_pose(self, slot: _WindowSlot) -> Sim3:
        """A live keyframe's pose in the map (localization-only: through the relocalization)."""
        if self.localization_only and self._odom_to_map is not None:
            return self._odom_to_map @ slot.pose
        return slot.pose

    def _mapped_keyframe(self, kid: int, stamp: int, pose: Sim3, K: np.ndarray, window_index: int, segment: int,
                         base_to_camera: Optional[np.ndarray] = None) -> MappedKeyframe:
        cam = rigid_matrix(pose)
        b2c = self.base_to_camera if base_to_camera is None else base_to_camera
        cached_b2c, camera_to_base = self._camera_to_base_cache
        if cached_b2c is not b2c:
            camera_to_base = invert_rigid(b2c)
            self._camera_to_base_cache = (b2c, camera_to_base)
        return MappedKeyframe(kid, stamp, cam, cam @ camera_to_base, K, window_index, segment)

    def _segment_start_transform(self, c2w: np.ndarray, depth: np.ndarray, conf: np.ndarray) -> Sim3:
        """Window -> map guess for a window that cannot be aligned: its first keyframe where the
        newest mapped keyframe was, with the same median depth (the best guess until a link is found)."""
        last = next(reversed(self._trajectory.values()))
        ref_pose = self.store[last.id].pose if last.id in self.store else Sim3(1.0, last.camera_to_map[:3, :3], last.camera_to_map[:3, 3])
        ref_depth = self.store[last.id].median_depth * ref_pose.scale if last.id in self.store else 1.0
        valid = np.isfinite(depth[0]) & (depth[0] > 0)
        scale = ref_depth / float(np.median(depth[0][valid])) if np.any(valid) else 1.0
        cam = c2w[0]
        R = ref_pose.R @ cam[:3, :3].T
        t = ref_pose.t - scale * (R @ cam[:3, 3])
        return Sim3(scale, R, t)

    def _record_alignment(self, scale: float, residual: float, inlier_fraction: float) -> None:
        s = self._stats
        if math.isfinite(s.last_scale) and s.last_scale > 0 and scale > 0:
            s.scale_drift = abs(math.log(scale / s.last_scale))
            s.max_scale_drift = max(s.max_scale_drift, s.scale_drift)
        s.last_scale = scale
        s.last_residual = residual
        s.max_residual = max(s.max_residual, residual)
        s.last_inlier_fraction = inlier_fraction

    def _keyframe_points(self, slot: _WindowSlot, max_points: int) -> tuple[np.ndarray, np.ndarray]:
        """Confident points of a mapped slot in its own camera frame (local units) and colours."""
        cfg = self.config.map
        mask = confident_mask(slot.depth, slot.conf, cfg.conf_percentile, cfg.conf_min)
        idx = subsample_indices(mask, max_points)
        xyz, u, v = unproject_cells(slot.depth, idx, slot.depth_box, slot.K, np.eye(4))
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
            x_local, _, _ = unproject_cells(slot.depth, cell[ok], slot.depth_box, slot.K, np.eye(4))
            c_win = conf[i].reshape(-1)[idx[ok]]
            src.append(x_win[ok])
            dst.append(slot.pose.apply(x_local))
            weights.append(np.sqrt(np.maximum(c_win, 0) * c_map[ok]))
            map_depths.append(d_map[ok] * slot.pose.scale)
        centres_src = np.stack([c2w[i][:3, 3] for i in shared])
        centres_dst = np.stack([self._window[i].pose.t for i in shared])
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

    # ------------------------------------------------------------------ back end: store and graph

    def _store_new_keyframes(self, pred: Prediction, new_idx: list[int], reference: Optional[_WindowSlot],
                             anchor_first: bool) -> tuple[np.ndarray, np.ndarray]:
        """Store the window's new keyframes, add their graph nodes and put their points in the
        map cache. Returns the points added (map frame)."""
        cfg = self.config
        n_points = min(cfg.map.max_points_per_keyframe, cfg.backend.keyframe_points)
        # Odometry poses continue the chain of window alignments from the reference keyframe.
        if reference is not None and reference.keyframe.id in self.store:
            ref = self.store[reference.keyframe.id]
            to_odom = ref.odom_pose @ ref.pose.inverse()
        elif len(self.store):
            last = self.store[self.store.id_at(len(self.store) - 1)]
            to_odom = last.odom_pose @ last.pose.inverse()
        else:
            to_odom = Sim3()
        descriptors = pred.descriptors
        xyz_all, rgb_all = [], []
        for n, i in enumerate(new_idx):
            slot = self._window[i]
            local, rgb = self._keyframe_points(slot, n_points)
            valid = slot.depth[np.isfinite(slot.depth) & (slot.depth > 0)]
            median = float(np.median(valid)) if valid.size else 1.0
            descriptor = self._usable_descriptor(None if descriptors is None else descriptors[i])
            stored = StoredKeyframe(
                id=slot.keyframe.id, stamp_ns=slot.keyframe.stamp_ns, segment=self._segment, window_index=self._window_index,
                K=np.asarray(slot.K, np.float64), camera_info_K=slot.keyframe.K, pose=slot.pose, odom_pose=to_odom @ slot.pose,
                descriptor=descriptor, median_depth=median,
                radius=float(np.linalg.norm(local, axis=1).max()) if len(local) else 0.0, cached_pose=slot.pose)
            self.store.add(stored, KeyframePayload(slot.keyframe.image, local.astype(np.float32), rgb))
            self.graph.add_node(stored.id, slot.pose, self._segment, anchor=anchor_first and n == 0)
            xyz_all.append(slot.pose.apply(local))
            rgb_all.append(rgb)
        xyz = np.concatenate(xyz_all).astype(np.float32) if xyz_all else np.zeros((0, 3), np.float32)
        rgb = np.concatenate(rgb_all).astype(np.uint8) if rgb_all else np.zeros((0, 3), np.uint8)
        self.voxel_map.insert(xyz, rgb)
        return xyz, rgb

    def _usable_descriptor(self, descriptor) -> Optional[np.ndarray]:
        """The descriptor scaled to unit length, or None (counted) if it cannot be searched with
        the store's (another dimension, e.g. after a change of network width, or all zeros)."""
        if descriptor is None:
            return None
        d = np.asarray(descriptor, np.float32).reshape(-1)
        norm = float(np.linalg.norm(d))
        dim = self.store.descriptor_dim
        if norm <= 0 or (dim is not None and d.shape[0] != dim):
            with self._read_lock:
                self._stats.descriptors_dropped += 1
            return None
        return d / norm

    def _geometry(self, keyframe_id: int) -> KeyframeGeometry:
        f = self.store[keyframe_id]
        return KeyframeGeometry(self.store.payload(keyframe_id).xyz.astype(np.float64), f.K)

    def _relative_sigmas(self, median_depth: float, residual: float, inlier_fraction: float) -> np.ndarray:
        cfg = self.config
        inflate = 1.0 + residual / cfg.window.max_alignment_residual + 2.0 * (1.0 - inlier_fraction)
        b = cfg.backend
        return inflate * np.array([math.radians(b.graph_rotation_sigma_deg)] * 3
                                  + [b.graph_translation_sigma * max(median_depth, 1e-9)] * 3 + [b.graph_scale_sigma])

    def _add_window_factors(self, c2w: np.ndarray, depth: np.ndarray, box, to_map: Sim3, residual: float,
                            inlier_fraction: float) -> None:
        """Relative constraints between the window's keyframes as the window sees them: each
        keyframe's local -> window similarity is its predicted pose after scaling its stored
        points to the window's depth (new keyframes: exactly ``1 / scale``; shared ones: the
        median depth ratio over their stored points). A shared keyframe whose pose in this
        window disagrees with the map by more than 5 sigmas (the alignment outvoted it) adds no
        constraint."""
        map_scale = to_map.scale
        gate = 5.0 * self._relative_sigmas(1.0, residual, inlier_fraction)
        nodes = []
        for i, slot in enumerate(self._window):
            kid = slot.keyframe.id
            if kid not in self.store:
                continue
            f = self.store[kid]
            if f.window_index == self._window_index:
                sigma = 1.0 / map_scale
            else:
                sigma, share = depth_scale(self._geometry(kid), depth[i], box)
                if not np.isfinite(sigma) or share < 0.2:
                    sigma = f.pose.scale / map_scale  # what the alignment implies
                dt, angle = graph_discrepancy(f.pose, f.pose, f.pose.inverse() @ to_map @ window_node(c2w[i], sigma))
                if angle > gate[0] or dt > gate[3] * f.median_depth * f.pose.scale:
                    continue
            nodes.append((kid, window_node(c2w[i], sigma), f.median_depth))
        for a in range(len(nodes)):
            for b in (a + 1, a + 2):
                if b >= len(nodes):
                    continue
                (ka, Na, da), (kb, Nb, _) = nodes[a], nodes[b]
                self.graph.add_between(FactorRecord(ka, kb, Na.inverse() @ Nb, self._relative_sigmas(da, residual, inlier_fraction),
                                                    FACTOR_WINDOW))

    def _apply_estimates(self, estimates: dict) -> None:
        """New graph estimates -> store, window slots and trajectory; keyframes that moved more
        than ``map_update_threshold`` voxels are queued for the map cache (see
        :meth:`_refresh_map_cache`)."""
        if not estimates:
            return
        threshold = self.config.backend.map_update_threshold * self.voxel_map.voxel_size
        slots = {s.keyframe.id: s for s in self._window}
        updated = []
        for kid, pose in estimates.items():
            if kid not in self.store:
                continue
            f = self.store[kid]
            f.pose = pose
            if kid in slots:
                slots[kid].pose = pose
            if f.cached_pose is not None and sim3_displacement_bound(pose, f.cached_pose, f.radius) > threshold:
                self._stale_cache[kid] = None
            else:
                self._stale_cache.pop(kid, None)
            updated.append(f)
        with self._read_lock:
            for f in updated:
                old = self._trajectory.get(f.id)
                if old is not None:
                    self._trajectory[f.id] = self._mapped_keyframe(f.id, f.stamp_ns, f.pose, old.K, old.window_index,
                                                                   self.graph.segment(f.id))

    def _refresh_map_cache(self, budget: Optional[int]) -> None:
        """Move up to ``budget`` queued keyframes' points (oldest queued first; all if None) to
        their current poses in the voxel map, in one batched remove + insert: the cost per
        window stays bounded however many keyframes a loop moved."""
        if not self._stale_cache:
            return
        ids = list(self._stale_cache) if budget is None else list(self._stale_cache)[:budget]
        removed, added, colours = [], [], []
        for kid in ids:
            del self._stale_cache[kid]
            f = self.store[kid]
            payload = self.store.payload(kid)  # one read, even for a keyframe spilled to disk
            local = payload.xyz.astype(np.float64)
            removed.append(f.cached_pose.apply(local))
            added.append(f.pose.apply(local))
            colours.append(payload.rgb)
            f.cached_pose = f.pose
        rgb = np.concatenate(colours)
        self.voxel_map.remove(np.concatenate(removed), rgb)
        self.voxel_map.insert(np.concatenate(added), rgb)
        with self._read_lock:
            self._stats.map_cache_moves += len(ids)
            self._stats.map_points = len(self.voxel_map)

    def refresh_map(self) -> None:
        """Bring the whole voxel map up to the current poses now (``flush``, ``save`` and
        ``save_session`` do this; during streaming it catches up a bounded amount per window)."""
        with self._work_lock:
            if self.backend_enabled and not self.localization_only and len(self.graph):
                self._apply_estimates(self.graph.refresh())
            self._refresh_map_cache(None)
            with self._read_lock:
                self._sync_backend_stats()

    def _sync_backend_stats(self) -> None:
        s = self._stats
        s.graph_nodes = len(self.graph)
        s.graph_factors = self.graph.num_factors
        s.last_optimisation_s = self.graph.last_optimisation_s
        s.max_optimisation_s = max(s.max_optimisation_s, s.last_optimisation_s)
        s.store_keyframes = len(self.store)
        s.store_spilled = self.store.spilled
        s.map_cache_stale = len(self._stale_cache)

    # ------------------------------------------------------------------ back end: loops

    def _reject_loop(self, reason: str) -> None:
        with self._read_lock:
            self._stats.loops_rejected += 1
            self._stats.loop_rejections[reason] = self._stats.loop_rejections.get(reason, 0) + 1

    def _loop_candidates(self, query: np.ndarray, allowed: np.ndarray, ids: np.ndarray, descriptors: np.ndarray):
        return search_places(query, ids, descriptors, allowed, self.config.backend.loop_min_score, top_k=3,
                             suppress_radius=max(2, self.config.window.window_stride))

    def _try_loop_closure(self, query_id: int) -> bool:
        """Search the store for the place of keyframe ``query_id``; verify candidates best first;
        add the first verified loop, optimise and refresh everything. Returns True on a loop."""
        cfg = self.config.backend
        q = self.store[query_id]
        if q.descriptor is None:
            return False
        q_index = self.store.index_of(query_id)
        lost = self.graph.segment(query_id) != self.graph.segment(self.store.id_at(0))
        if not lost and q_index - self._last_loop_index < cfg.loop_cooldown_keyframes:
            return False
        ids, descriptors = self.store.descriptors()
        order, row_segment = self.store.descriptor_rows()
        q_segment = self.graph.segment(query_id)
        roots = self.graph.segment_roots(int(row_segment.max()) + 1 if len(row_segment) else 0)
        allowed = (roots[row_segment] != q_segment) | (order <= q_index - cfg.loop_min_keyframe_gap)
        if not np.any(allowed):
            return False
        for match in self._loop_candidates(q.descriptor, allowed, ids, descriptors):
            with self._read_lock:
                self._stats.loop_candidates += 1
            check = self._verify(match.keyframe_id, query_id, self._geometry(query_id))
            if not check.accepted:
                self._reject_loop(check.reason)
                continue
            c = self.store[match.keyframe_id]
            merging = self.graph.segment(match.keyframe_id) != q_segment
            if not merging and not self._plausible_drift(match.keyframe_id, query_id, check.relative):
                self._reject_loop(REJECT_GRAPH)
                continue
            sigmas = self._relative_sigmas(c.median_depth, 0.0, 1.0)  # one verified window, weighted like one
            self.graph.add_between(FactorRecord(match.keyframe_id, query_id, check.relative, sigmas, FACTOR_LOOP))
            if merging:
                self.graph.merge_segments(match.keyframe_id, query_id)
            if merging:
                self._apply_estimates(self.graph.optimise_all())
            else:  # the loop bends the graph between its ends; older nodes follow at refresh_map
                span = range(max(0, self.store.index_of(match.keyframe_id) - self.config.window.window_size), len(self.store))
                self._apply_estimates(self.graph.update_after_loop(self.store.id_at(i) for i in span))
            self._last_loop_index = q_index
            with self._read_lock:
                self._stats.loops_accepted += 1
                if merging:
                    self._stats.relocalizations += 1
                    if self.graph.segment(query_id) == self.graph.segment(self.store.id_at(0)):
                        self._stats.tracking_state = TRACKING_RELOCALIZED
            log.info("loop closed: keyframe %d <-> %d (score %.3f, overlap %.2f)", match.keyframe_id, query_id, match.score,
                     check.overlap)
            return True
        return False

    def _verification_window(self, candidate_id: int, query_keyframe: Keyframe, query_neighbour: Optional[Keyframe]):
        frames = [self.store.keyframe(candidate_id)]
        successor = self.store.id_at(self.store.index_of(candidate_id) + 1)
        taken = {query_keyframe.id} | ({query_neighbour.id} if query_neighbour is not None else set())
        if successor is not None and successor not in taken:
            frames.append(self.store.keyframe(successor))
        if query_neighbour is not None:
            frames.append(query_neighbour)
        frames.append(query_keyframe)
        return frames

    def _verify(self, candidate_id: int, query_id: int, query_geometry: KeyframeGeometry,
                query_keyframe: Optional[Keyframe] = None, query_neighbour: Optional[Keyframe] = None):
        """Run the backbone on [candidate, its successor, the query's predecessor, query] and
        check the pair geometrically (:func:`~spark3r.mapping.loop_closure.verify_pair`)."""
        if query_keyframe is None:
            query_keyframe = self.store.keyframe(query_id)
            previous = self.store.id_at(self.store.index_of(query_id) - 1)
            query_neighbour = self.store.keyframe(previous) if previous is not None and previous != candidate_id else None
        frames = self._verification_window(candidate_id, query_keyframe, query_neighbour)
        pred, problem = self._predict_checked(frames)
        if pred is None:
            log.warning("loop verification window dropped: %s", problem)
            with self._read_lock:
                self._stats.loop_verification_errors += 1
            return LoopCheck(False, REJECT_PREDICTION)
        K = self._intrinsics_for(frames, pred)
        if not np.all(pred.finite_frames(K)):
            return LoopCheck(False, REJECT_PREDICTION)
        depth = np.where(np.isfinite(pred.depth), pred.depth, np.nan).astype(np.float64)
        c_geom = self._geometry(candidate_id)
        return verify_pair(np.asarray(pred.c2w, np.float64), depth, tuple(float(b) for b in pred.depth_box), 0, len(frames) - 1,
                           c_geom, query_geometry, self.config.backend.loop_min_inlier_fraction)

    def _plausible_drift(self, candidate_id: int, query_id: int, relative: Sim3) -> bool:
        """Is the correction a loop asks for within what drift between the two could explain?"""
        c, q = self.store[candidate_id], self.store[query_id]
        dt, angle = graph_discrepancy(c.pose, q.pose, relative)
        a, b = self.store.index_of(candidate_id), self.store.index_of(query_id)
        centres = np.stack([self.store[self.store.id_at(k)].pose.t for k in range(a, b + 1)])
        path = float(np.linalg.norm(np.diff(centres, axis=0), axis=1).sum())
        scene = max(q.median_depth * q.pose.scale, 1e-9)
        limit = self.config.backend.loop_max_drift
        return dt <= limit * path and angle <= max(0.3, limit * path / scene)

    # ------------------------------------------------------------------ localization-only mode

    def _try_relocalization(self, slot_index: int, descriptor: Optional[np.ndarray]) -> bool:
        """Localization-only: find the loaded map's keyframe for the newest live keyframe, verify
        it with the backbone and set ``odom -> map``. Tried on every window until localized,
        then every ``loop_cooldown_keyframes`` keyframes, so the correction follows the odometry's drift."""
        cfg = self.config.backend
        if descriptor is None or not len(self.store):
            return False
        if self._odom_to_map is not None and self._live_since_reloc < cfg.loop_cooldown_keyframes:
            return False
        descriptor = self._usable_descriptor(descriptor)
        if descriptor is None:
            return False
        slot = self._window[slot_index]
        local, _ = self._keyframe_points(slot, min(self.config.map.max_points_per_keyframe, cfg.keyframe_points))
        geometry = KeyframeGeometry(local, np.asarray(slot.K, np.float64))
        neighbour = self._window[slot_index - 1].keyframe if slot_index >= 1 else None
        ids, descriptors = self.store.descriptors()
        for match in self._loop_candidates(descriptor, np.ones(len(ids), bool), ids, descriptors):
            with self._read_lock:
                self._stats.loop_candidates += 1
            check = self._verify(match.keyframe_id, slot.keyframe.id, geometry, slot.keyframe, neighbour)
            if not check.accepted:
                self._reject_loop(check.reason)
                continue
            self._odom_to_map = self.store[match.keyframe_id].pose @ check.relative @ slot.pose.inverse()
            self._live_since_reloc = 0
            with self._read_lock:
                self._stats.relocalizations += 1
                self._stats.loops_accepted += 1
                self._stats.tracking_state = TRACKING_RELOCALIZED
                for kid, (odom_pose, mk) in self._live_odom.items():
                    self._trajectory[kid] = self._mapped_keyframe(kid, mk.stamp_ns, self._odom_to_map @ odom_pose, mk.K,
                                                                  mk.window_index, mk.segment)
            log.info("relocalized in the loaded map at keyframe %d (score %.3f)", match.keyframe_id, match.score)
            return True
        return False

    # ------------------------------------------------------------------ persistence

    def save(self, directory) -> dict[str, Path]:
        """Write ``map.ply`` (voxel map, map frame) and ``trajectory.tum`` (keyframe camera poses
        in the map frame, TUM format; the current optimised poses) into ``directory`` (created
        if needed), atomically."""
        from ..data.io import write_ply, write_tum_trajectory

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.refresh_map()
        xyz, rgb = self.voxel_map.points()
        traj = self.trajectory
        stamps = np.array([k.stamp_ns for k in traj], dtype=np.int64)
        poses = np.stack([k.camera_to_map for k in traj]) if traj else np.zeros((0, 4, 4))
        paths = {"map": out / "map.ply", "trajectory": out / "trajectory.tum"}
        write_ply(paths["map"], xyz, rgb)
        write_tum_trajectory(paths["trajectory"], stamps, poses)
        return paths

    def save_session(self, directory) -> Path:
        """Write a loadable session (keyframes, poses, graph, descriptors, points, images) to
        ``directory`` atomically; see :mod:`spark3r.mapping.session`."""
        from .session import write_session

        with self._work_lock:
            if not self.backend_enabled:
                raise ValueError("sessions need the back end (pose_graph=true): without it no keyframe is stored")
            self.refresh_map()
            return write_session(directory, self.store, self.graph, self.config, self._window_index)

    def load_session(self, directory, localization_only: bool = False) -> int:
        """Replace the map with a saved session; returns the number of keyframes loaded.

        Mapping mode: new windows start a new graph segment that loop closure links to the
        loaded map (tracking is LOST until then). ``localization_only``: the loaded map is
        frozen (no keyframe, factor or map point is added); live keyframes are tracked by the
        front end and expressed in the loaded map once relocalized against it."""
        from .session import read_session

        if not self.backend_enabled:
            raise ValueError("sessions need the back end (pose_graph=true)")
        # Read first: a folder that is not a loadable session leaves the current map as it is.
        store, graph, window_index = read_session(directory, self.config.backend.store_keyframes_in_memory)
        with self._gate_lock:
            self._request_reset_locked()
        with self._work_lock:
            self._apply_reset_if_requested()
            self.store, self.graph = store, graph
            with self._gate_lock:  # live keyframes must never reuse a loaded keyframe's id
                self._next_id = max(self._next_id, max(store.ids(), default=-1) + 1)
            self._window_index = window_index
            self._segment = max((f.segment for f in store.values()), default=-1)
            self.localization_only = bool(localization_only)
            self._odom_to_map = None
            self._live_since_reloc = 0
            for f in store.values():
                f.cached_pose = f.pose
                xyz, rgb = store.map_points(f.id)
                self.voxel_map.insert(xyz, rgb)
            with self._read_lock:
                if not self.localization_only:
                    for f in store.values():
                        self._trajectory[f.id] = self._mapped_keyframe(f.id, f.stamp_ns, f.pose, f.K, f.window_index,
                                                                       graph.segment(f.id))
                self._stats.map_points = len(self.voxel_map)
                self._stats.tracking_state = TRACKING_LOST if len(store) else TRACKING_INITIALIZING
                self._sync_backend_stats()
            return len(store)
