"""The output composer: what a mapping result becomes on the wire, without ROS.

A :class:`~spark3r.mapping.mapper.WindowResult` (and later a pose update from a back end)
becomes plain records: TF transforms, Odometry (with a body-frame twist), the keyframe Path and
point clouds. The live node (``spark3r_ros.mapping_node``) turns them into ROS messages with
``spark3r_ros.conversions``; the offline writer (``spark3r.offline.map_bag``) serialises the same
records into ``mapping.bag``. So both publish the same thing by construction.

Frames (REP-105, :class:`~spark3r.mapping.config.OutputConfig`): ``map -> odom -> base_link``.
With ``publish_odom_to_base_tf`` the mapper owns odometry: ``odom -> base_link`` is the mapped base
pose, ``map -> odom`` the identity and Odometry is given in ``odom``. Without it another node owns
``odom -> base_link``: ``map -> odom = T_map_base * T_odom_base^-1`` with ``T_odom_base`` at the
keyframe stamp (from the caller's lookup) and Odometry is given in ``map``. ``map -> odom`` is
future-dated by ``transform_tolerance``; everything else carries its keyframe's stamp. TF never
carries scale: the mapper's poses are rigid.

Odometry carries a pose and twist covariance derived from the window's alignment, and the
composer keeps the tracking state (:mod:`spark3r.mapping.tracking`, formula there): a window that
the mapper could not map while a map exists (:meth:`OutputComposer.compose_lost`) makes the state
``LOST`` and gives an Odometry record holding the last pose with a very large covariance.

With the SLAM back end (:func:`backend_poses` of a mapper whose ``backend.pose_graph`` is on),
the graph moves poses after they were first published (every window's optimisation, a loop
closure, a relocalization). REP-105 then splits the pose: ``map -> odom`` is the back end's
correction (``Mapper.map_to_odom``: it jumps at a loop) and, when the mapper owns odometry,
``odom -> base_link`` and the Odometry pose are ``map_to_odom^-1 * T_map_base`` — the front end's
never-optimised chain of window alignments, continuous across loop closures. The Path is rebuilt
from the mapper's current (optimised) trajectory every window, the covariance comes from the
graph's marginal (:func:`~spark3r.mapping.tracking.ros_pose_covariance`) and the tracking state
from the mapper (``OK``/``LOST``/``RELOCALIZED``). After a loop closure or relocalization
(:func:`~spark3r.mapping.tracking.poses_moved`) :meth:`OutputComposer.compose_poses_updated`
gives the corrected Path and the rebuilt map cloud, which the node republishes on ``~/path`` and
``~/map`` and the offline writer appends to ``mapping.bag``.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from scipy.spatial.transform import Rotation

from spark3r.geometry import invert_rigid

from .config import OutputConfig
from .tracking import (TRACKING_LOST, TrackingMonitor, alignment_error, lost_covariance, pose_covariance,
                       ros_pose_covariance, rotate_covariance, twist_covariance, typical_depth)


@dataclass(frozen=True)
class TransformRecord:
    stamp_ns: int
    parent: str
    child: str
    T: np.ndarray  # rigid 4x4, T_parent_child


@dataclass(frozen=True)
class OdometryRecord:
    stamp_ns: int
    frame_id: str
    child_frame_id: str
    pose: np.ndarray     # rigid 4x4, pose of child in frame_id
    linear: np.ndarray   # [3] m/s (map units/s) in the child (body) frame
    angular: np.ndarray  # [3] rad/s in the child (body) frame
    pose_covariance: np.ndarray = field(default_factory=lambda: lost_covariance())   # 6x6, x y z rx ry rz
    twist_covariance: np.ndarray = field(default_factory=lambda: lost_covariance())  # 6x6, body frame


@dataclass(frozen=True)
class PoseRecord:
    stamp_ns: int
    frame_id: str
    pose: np.ndarray  # rigid 4x4


@dataclass(frozen=True)
class PathRecord:
    stamp_ns: int
    frame_id: str
    poses: tuple[PoseRecord, ...]


@dataclass(frozen=True)
class CloudRecord:
    stamp_ns: int
    frame_id: str
    xyz: np.ndarray  # float32 [N, 3]
    rgb: np.ndarray  # uint8 [N, 3]


@dataclass(frozen=True)
class KeyframeOutputs:
    odometry: OdometryRecord
    transforms: tuple[TransformRecord, ...]  # odom -> base (own odometry), map -> odom (if published and known)


@dataclass(frozen=True)
class WindowOutputs:
    keyframes: tuple[KeyframeOutputs, ...]
    path: PathRecord
    cloud: CloudRecord                          # the points this window added
    missing_odometry: tuple[int, ...] = ()      # keyframe stamps without external odom -> base (map -> odom skipped)

    @property
    def transforms(self) -> list[TransformRecord]:
        return [t for kf in self.keyframes for t in kf.transforms]


@dataclass(frozen=True)
class PosesUpdate:
    """Records after the back end moved published poses (a loop closure, a relocalization, a
    loaded session): the whole Path with the current poses and the rebuilt map."""

    path: PathRecord
    map: CloudRecord


@dataclass(frozen=True)
class BackendPoses:
    """What the SLAM back end says after a window (see :func:`backend_poses`)."""

    map_to_odom: np.ndarray                   # rigid 4x4 T_map_odom, the back end's correction
    trajectory: tuple                         # MappedKeyframe, oldest first, current (optimised) poses
    tracking_state: str                       # OK / LOST / RELOCALIZED / INITIALIZING
    pose_covariance: Optional[np.ndarray]     # 6x6 ROS order in the map frame; None: use the alignment's


def backend_poses(mapper) -> Optional[BackendPoses]:
    """The back end's view of the newest poses, or None when the mapper runs without it (then
    the composer uses the alignment alone). Call from the thread that runs the mapper's windows
    (``map_to_odom`` and ``pose_covariance`` take its worker lock)."""
    if not getattr(mapper, "backend_enabled", False):
        return None
    state = mapper.tracking_state
    if state == TRACKING_LOST:
        cov = lost_covariance()
    elif mapper.localization_only:
        cov = None  # the graph is the frozen loaded map: a live keyframe's uncertainty is its alignment's
    else:
        cov = ros_pose_covariance(mapper.pose_covariance())
    return BackendPoses(np.asarray(mapper.map_to_odom(), np.float64), tuple(mapper.trajectory), state, cov)


OdomLookup = Callable[[int], Optional[np.ndarray]]


def body_twist(T_previous: np.ndarray, T_current: np.ndarray, dt_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame (linear, angular) velocity that moves ``T_previous`` to ``T_current`` in
    ``dt_s`` (keyframes are sparse: a coarse estimate)."""
    delta = invert_rigid(T_previous, tol=1e-4) @ T_current
    return delta[:3, 3] / dt_s, Rotation.from_matrix(delta[:3, :3]).as_rotvec() / dt_s


class OutputComposer:
    """Turns mapping results into records; keeps the path and the last pose (for the twist)."""

    def __init__(self, config: OutputConfig = OutputConfig()):
        self.config = config
        self._path: deque[PoseRecord] = deque(maxlen=config.path_max_size)
        self._last_base_pose: Optional[tuple[int, np.ndarray]] = None
        self.latest_stamp_ns = 0
        self.tracking = TrackingMonitor()
        self.last_pose_covariance: Optional[np.ndarray] = None
        self._path_records: dict = {}   # id(MappedKeyframe) -> (keyframe, its PoseRecord)

    @property
    def owns_odometry(self) -> bool:
        return self.config.publish_odom_to_base_tf

    @property
    def needs_external_odometry(self) -> bool:
        """True when ``map -> odom`` needs another node's ``odom -> base_link``."""
        return self.config.publish_map_to_odom_tf and not self.config.publish_odom_to_base_tf

    def reset(self) -> None:
        """A new map: no path, no velocity history, nothing tracked."""
        self._path.clear()
        self._path_records = {}
        self._last_base_pose = None
        self.tracking.reset()
        self.last_pose_covariance = None

    def compose_window(self, result, odom_to_base: Optional[OdomLookup] = None,
                       backend: Optional[BackendPoses] = None) -> WindowOutputs:
        """Records for one window (``result.keyframes`` non-empty). ``odom_to_base(stamp_ns)``
        gives the external ``T_odom_base`` (None = unknown) when another node owns odometry.
        ``backend``: the back end's poses after this window (:func:`backend_poses`; module
        docstring), None without a back end."""
        if result.starts_map:  # first window, or the mapper lost tracking: no velocity history
            if backend is None:
                self.reset()  # without a back end the map restarts
            self._last_base_pose = None
        cfg = self.config
        keyframes, missing = [], []
        if backend is None:
            self.tracking.mapped()
        else:
            self.tracking.adopt(backend.tracking_state)
        if backend is not None and backend.pose_covariance is not None:
            pose_cov = backend.pose_covariance
        else:
            depth = typical_depth(result.points_xyz, [kf.camera_to_map[:3, 3] for kf in result.keyframes])
            pose_cov = pose_covariance(alignment_error(result.residual, result.inlier_fraction), depth)
            if self.tracking.state == TRACKING_LOST:
                pose_cov = lost_covariance()
        self.last_pose_covariance = pose_cov
        T_map_odom_own = backend.map_to_odom if backend is not None else np.eye(4)
        T_odom_map_own = invert_rigid(T_map_odom_own, tol=1e-3)
        for kf in result.keyframes:
            stamp, T_map_base = kf.stamp_ns, kf.base_to_map
            if backend is None:
                self._path.append(PoseRecord(stamp, cfg.map_frame, T_map_base))
            transforms = []
            odom_pose, odom_cov = T_map_base, pose_cov
            if self.owns_odometry:
                odom_pose = T_odom_map_own @ T_map_base
                odom_cov = rotate_covariance(pose_cov, T_odom_map_own[:3, :3])
                transforms.append(TransformRecord(stamp, cfg.odom_frame, cfg.base_frame, odom_pose))
            if cfg.publish_map_to_odom_tf:
                T_map_odom = T_map_odom_own if self.owns_odometry else self._map_to_odom(stamp, T_map_base, odom_to_base)
                if T_map_odom is None:
                    missing.append(stamp)
                else:
                    transforms.append(TransformRecord(stamp + cfg.transform_tolerance_ns, cfg.map_frame,
                                                      cfg.odom_frame, T_map_odom))
            keyframes.append(KeyframeOutputs(self._odometry(stamp, odom_pose, odom_cov), tuple(transforms)))
        latest = result.keyframes[-1].stamp_ns
        self.latest_stamp_ns = latest
        if backend is not None:
            self._set_path(backend.trajectory)
        return WindowOutputs(tuple(keyframes), self.path(latest),
                             CloudRecord(latest, cfg.map_frame, result.points_xyz, result.points_rgb), tuple(missing))

    def compose_poses_updated(self, trajectory, map_xyz, map_rgb) -> PosesUpdate:
        """The Path rebuilt from ``trajectory`` (MappedKeyframes with their current poses, oldest
        first) and the map cloud ``map_xyz``/``map_rgb`` (rebuilt at those poses), stamped with
        the newest keyframe: what to republish after the back end moved published poses."""
        self._set_path(trajectory)
        if self._path:
            self.latest_stamp_ns = max(self.latest_stamp_ns, self._path[-1].stamp_ns)
        return PosesUpdate(self.path(), self.map_cloud(map_xyz, map_rgb))

    def _set_path(self, trajectory) -> None:
        # The mapper replaces a MappedKeyframe only when its pose changes: an unchanged keyframe
        # keeps its PoseRecord, so the node converts only moved poses (PathConverter's cache).
        keep = self.config.path_max_size
        newest = list(trajectory)[-keep:] if keep else list(trajectory)
        records, cache = [], {}
        for kf in newest:
            hit = self._path_records.get(id(kf))
            record = hit[1] if hit is not None and hit[0] is kf else PoseRecord(kf.stamp_ns, self.config.map_frame,
                                                                                kf.base_to_map)
            cache[id(kf)] = (kf, record)  # holding kf keeps its id from being reused
            records.append(record)
        self._path_records = cache
        self._path.clear()
        self._path.extend(records)

    def _map_to_odom(self, stamp_ns: int, T_map_base: np.ndarray, odom_to_base: Optional[OdomLookup]):
        T_odom_base = odom_to_base(stamp_ns) if odom_to_base is not None else None
        return None if T_odom_base is None else T_map_base @ invert_rigid(T_odom_base, tol=1e-4)

    def tracking_values(self) -> dict:
        """Tracking state, its counters and the last published position standard deviation."""
        cov = self.last_pose_covariance
        return {**self.tracking.as_dict(), "position_stddev": math.sqrt(cov[0, 0]) if cov is not None else float("nan")}

    def compose_lost(self, stamp_ns: int) -> Optional[OdometryRecord]:
        """A window up to ``stamp_ns`` gave no poses. With a map, tracking is now lost: returns the
        Odometry record to publish (the last pose, zero twist, ``LOST_VARIANCE`` covariances);
        before any map, None (still initialising)."""
        if not self.tracking.failed() or self._last_base_pose is None:
            return None
        stamp = max(int(stamp_ns), self._last_base_pose[0])
        self.last_pose_covariance = lost_covariance()
        return OdometryRecord(stamp, self._odometry_frame, self.config.base_frame, self._last_base_pose[1],
                              np.zeros(3), np.zeros(3), lost_covariance(), lost_covariance())

    @property
    def _odometry_frame(self) -> str:
        # Without own odometry the pose is only known in the map frame.
        return self.config.odom_frame if self.owns_odometry else self.config.map_frame

    def _odometry(self, stamp_ns: int, T_map_base: np.ndarray, pose_cov: np.ndarray) -> OdometryRecord:
        linear, angular, twist_cov = np.zeros(3), np.zeros(3), lost_covariance()
        previous = self._last_base_pose
        if previous is not None and stamp_ns > previous[0]:
            dt = (stamp_ns - previous[0]) * 1e-9
            linear, angular = body_twist(previous[1], T_map_base, dt)
            twist_cov = twist_covariance(pose_cov, dt)
        self._last_base_pose = (stamp_ns, T_map_base)
        return OdometryRecord(stamp_ns, self._odometry_frame, self.config.base_frame, T_map_base, linear, angular,
                              pose_cov, twist_cov)

    def path(self, stamp_ns: Optional[int] = None) -> PathRecord:
        """The keyframe path so far (empty after :meth:`reset`)."""
        stamp = self.latest_stamp_ns if stamp_ns is None else stamp_ns
        return PathRecord(stamp, self.config.map_frame, tuple(self._path))

    def map_cloud(self, xyz, rgb, stamp_ns: Optional[int] = None) -> CloudRecord:
        """The whole voxel map, stamped with the latest keyframe."""
        stamp = self.latest_stamp_ns if stamp_ns is None else stamp_ns
        return CloudRecord(stamp, self.config.map_frame, np.asarray(xyz, np.float32), np.asarray(rgb, np.uint8))

    def empty_map_cloud(self) -> CloudRecord:
        return self.map_cloud(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))

    def static_transform(self, stamp_ns: int, base_to_camera: np.ndarray, camera_frame: str) -> TransformRecord:
        """The camera's pose in the base frame (``/tf_static``; the offline bag writes it)."""
        return TransformRecord(stamp_ns, self.config.base_frame, camera_frame, np.asarray(base_to_camera, np.float64))
