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
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy.spatial.transform import Rotation

from spark3r.geometry import invert_rigid

from .config import OutputConfig


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

    @property
    def owns_odometry(self) -> bool:
        return self.config.publish_odom_to_base_tf

    @property
    def needs_external_odometry(self) -> bool:
        """True when ``map -> odom`` needs another node's ``odom -> base_link``."""
        return self.config.publish_map_to_odom_tf and not self.config.publish_odom_to_base_tf

    def reset(self) -> None:
        """A new map: no path, no velocity history."""
        self._path.clear()
        self._last_base_pose = None

    def compose_window(self, result, odom_to_base: Optional[OdomLookup] = None) -> WindowOutputs:
        """Records for one window (``result.keyframes`` non-empty). ``odom_to_base(stamp_ns)``
        gives the external ``T_odom_base`` (None = unknown) when another node owns odometry."""
        if result.starts_map:  # first window, or the mapper lost tracking: no history
            self.reset()
        cfg = self.config
        keyframes, missing = [], []
        for kf in result.keyframes:
            stamp, T_map_base = kf.stamp_ns, kf.base_to_map
            self._path.append(PoseRecord(stamp, cfg.map_frame, T_map_base))
            transforms = []
            if self.owns_odometry:
                transforms.append(TransformRecord(stamp, cfg.odom_frame, cfg.base_frame, T_map_base))
            if cfg.publish_map_to_odom_tf:
                T_map_odom = self._map_to_odom(stamp, T_map_base, odom_to_base)
                if T_map_odom is None:
                    missing.append(stamp)
                else:
                    transforms.append(TransformRecord(stamp + cfg.transform_tolerance_ns, cfg.map_frame,
                                                      cfg.odom_frame, T_map_odom))
            keyframes.append(KeyframeOutputs(self._odometry(stamp, T_map_base), tuple(transforms)))
        latest = result.keyframes[-1].stamp_ns
        self.latest_stamp_ns = latest
        return WindowOutputs(tuple(keyframes), self.path(latest),
                             CloudRecord(latest, cfg.map_frame, result.points_xyz, result.points_rgb), tuple(missing))

    def _map_to_odom(self, stamp_ns: int, T_map_base: np.ndarray, odom_to_base: Optional[OdomLookup]):
        if self.owns_odometry:
            return np.eye(4)
        T_odom_base = odom_to_base(stamp_ns) if odom_to_base is not None else None
        return None if T_odom_base is None else T_map_base @ invert_rigid(T_odom_base, tol=1e-4)

    def _odometry(self, stamp_ns: int, T_map_base: np.ndarray) -> OdometryRecord:
        linear, angular = np.zeros(3), np.zeros(3)
        previous = self._last_base_pose
        if previous is not None and stamp_ns > previous[0]:
            linear, angular = body_twist(previous[1], T_map_base, (stamp_ns - previous[0]) * 1e-9)
        self._last_base_pose = (stamp_ns, T_map_base)
        # Without own odometry the pose is only known in the map frame.
        frame = self.config.odom_frame if self.owns_odometry else self.config.map_frame
        return OdometryRecord(stamp_ns, frame, self.config.base_frame, T_map_base, linear, angular)

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
