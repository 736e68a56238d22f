"""Tracking state and pose uncertainty of the mapper's outputs, without ROS.

Tracking state (the node reports it on ``/diagnostics`` as ``tracking_state``):

* ``INITIALIZING``: no map yet (start-up, after ``~/reset`` or a stamp going backwards).
* ``OK``: the last window the backbone ran on was mapped (aligned to the map, or starting it).
* ``LOST``: the map exists but the last window(s) gave no poses: the alignment was rejected
  (too few shared keyframes, residual or inliers out of bounds) or the backbone's output was
  dropped (non-finite, invalid, an exception). It stays ``LOST`` until a window is mapped again
  (aligned once more, or restarting the map when no keyframe of the map is left in the window).
* ``RELOCALIZED`` (SLAM back end, ``MapperStats.tracking_state``): the last window re-linked a
  lost graph segment to the map (or, localization-only, found the loaded map); ``OK`` again
  after the next mapped window.

With the back end on (``backend.pose_graph``), ``LOST`` also means a window that could not be
linked to the map started a new graph segment that runs unlinked until relocalization. These
constants are the only spelling of the states (the mapper and the composer import them).

Pose covariance of a mapped keyframe (6x6, ROS order x, y, z, rotation about x, y, z; isotropic,
so the same in any frame). A window's poses are as good as its alignment to the map:

    e       = sqrt(residual^2 + ERROR_FLOOR^2) / sqrt(max(inlier_fraction, MIN_INLIER_SHARE))
    sigma_t = e * D        (map units)      sigma_r = e        (rad)

``residual`` is the alignment's RMS of inliers over the median depth (a relative error, 0 for
the window that starts a map), ``inlier_fraction`` the share of the alignment's weight it kept
(fewer inliers: a less certain fit, as a standard error grows with 1/sqrt(n)), ``ERROR_FLOOR``
the relative error a window has even when it fits perfectly (the model's own error), and ``D``
the window's typical depth in map units (median distance of its new points from the nearest new
keyframe camera: the window's depth times its scale into the map). A relative point error ``e``
at depth ``D`` moves the camera by ``e D`` or turns it by ``e`` rad. This is the uncertainty of
each keyframe relative to the map keyframes its window was aligned to, not the accumulated drift.
The twist is the difference of two keyframe poses ``dt`` apart, so its covariance is
``2 / dt^2`` times the pose covariance; it is ``LOST_VARIANCE`` when there is no earlier pose
(the twist is then unknown, published as zero).

While tracking is lost the Odometry holds the last known pose with ``LOST_VARIANCE`` on the
whole diagonal (as rtabmap does), so a fusing filter ignores it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRACKING_INITIALIZING = "INITIALIZING"
TRACKING_OK = "OK"
TRACKING_LOST = "LOST"
TRACKING_RELOCALIZED = "RELOCALIZED"

LOST_VARIANCE = 9999.0      # rtabmap's value for an unknown pose
ERROR_FLOOR = 0.01          # relative error of a perfectly aligned window (1% of the depth)
MIN_INLIER_SHARE = 0.05     # bounds 1/sqrt(inlier_fraction)
DEPTH_SAMPLE_POINTS = 4096  # points enough for a median depth


def lost_covariance() -> np.ndarray:
    """The 6x6 covariance of an unknown pose or twist."""
    return np.diag(np.full(6, LOST_VARIANCE))


def alignment_error(residual: float, inlier_fraction: float) -> float:
    """Relative error ``e`` of a window's poses (see the module docstring)."""
    residual = float(residual) if math.isfinite(residual) and residual >= 0 else 1.0
    share = float(inlier_fraction) if math.isfinite(inlier_fraction) else 0.0
    return math.sqrt(residual ** 2 + ERROR_FLOOR ** 2) / math.sqrt(max(share, MIN_INLIER_SHARE))


def typical_depth(points_xyz: np.ndarray, camera_centres: np.ndarray) -> float:
    """Median distance of ``points_xyz`` [N, 3] from the nearest of ``camera_centres`` [K, 3];
    1.0 (one map unit) without points."""
    points = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    centres = np.asarray(camera_centres, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0 or len(centres) == 0:
        return 1.0
    points = points[::max(1, len(points) // DEPTH_SAMPLE_POINTS)]
    nearest = np.min(np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=2), axis=1)
    depth = float(np.median(nearest))
    return depth if math.isfinite(depth) and depth > 0 else 1.0


def pose_covariance(error: float, depth: float) -> np.ndarray:
    """Isotropic 6x6 pose covariance for relative error ``error`` at depth ``depth``."""
    sigma_t, sigma_r = error * depth, error
    return np.diag([sigma_t ** 2] * 3 + [sigma_r ** 2] * 3)


def twist_covariance(pose_cov: np.ndarray, dt_s: float) -> np.ndarray:
    """Covariance of a finite-difference twist between two poses with covariance ``pose_cov``."""
    if not (dt_s > 0 and math.isfinite(dt_s)):
        return lost_covariance()
    return np.asarray(pose_cov, dtype=np.float64) * (2.0 / dt_s ** 2)


def ros_pose_covariance(cov_rotation_first: np.ndarray) -> np.ndarray:
    """A pose-graph marginal in tangent order (rotation about x, y, z, then translation;
    ``Mapper.pose_covariance``) in ROS order (x, y, z, then rotation about x, y, z).
    ``LOST_VARIANCE`` on the diagonal when it is unusable (non-finite, or already that large)."""
    cov = np.asarray(cov_rotation_first, dtype=np.float64)
    if cov.shape != (6, 6) or not np.all(np.isfinite(cov)) or np.max(np.diag(cov)) >= LOST_VARIANCE:
        return lost_covariance()
    order = [3, 4, 5, 0, 1, 2]
    return cov[np.ix_(order, order)]


def rotate_covariance(cov: np.ndarray, R: np.ndarray) -> np.ndarray:
    """A 6x6 (translation, rotation) covariance expressed in a frame rotated by ``R``
    (``R`` maps the old frame's axes into the new one); an unknown (lost) one stays as it is."""
    cov = np.asarray(cov, dtype=np.float64)
    if np.max(np.diag(cov)) >= LOST_VARIANCE:
        return cov
    J = np.zeros((6, 6))
    J[:3, :3] = J[3:, 3:] = np.asarray(R, dtype=np.float64)
    return J @ cov @ J.T


def poses_moved(before, after) -> bool:
    """True when, between two ``MapperStats`` snapshots, the back end moved poses it had already
    given (an accepted loop closure or a relocalization that re-linked a segment)."""
    return (getattr(after, "loops_accepted", 0) > getattr(before, "loops_accepted", 0)
            or getattr(after, "relocalizations", 0) > getattr(before, "relocalizations", 0))


def window_failed(before, after, result) -> bool:
    """True when, between two ``MapperStats`` snapshots around one ``process_pending`` call, the
    backbone ran on a window that gave no poses (not one discarded because of a reset)."""
    return (result is None and after.windows > before.windows
            and after.windows_discarded_after_reset == before.windows_discarded_after_reset)


@dataclass
class TrackingMonitor:
    """The tracking state machine (module docstring): fed with mapped and failed windows."""

    state: str = TRACKING_INITIALIZING
    lost_windows: int = 0     # windows without poses since the last mapped one
    losses: int = 0           # times tracking went from OK to LOST

    def reset(self) -> None:
        """A new map: nothing to track against yet (the counter of losses is kept)."""
        self.state, self.lost_windows = TRACKING_INITIALIZING, 0

    def mapped(self) -> None:
        self.state, self.lost_windows = TRACKING_OK, 0

    def adopt(self, state: str) -> None:
        """The SLAM back end's state after a mapped window (it may be ``LOST``: a new segment
        runs unlinked, or ``RELOCALIZED``)."""
        if state == TRACKING_LOST:
            if self.state != TRACKING_LOST:
                self.losses += 1
            self.lost_windows += 1
        else:
            self.lost_windows = 0
        self.state = state

    def failed(self) -> bool:
        """A window gave no poses; True if that means tracking is lost (a map exists)."""
        if self.state == TRACKING_INITIALIZING:
            return False
        if self.state != TRACKING_LOST:
            self.losses += 1
        self.state = TRACKING_LOST
        self.lost_windows += 1
        return True

    def as_dict(self) -> dict:
        return {"tracking_state": self.state, "tracking_lost_windows": self.lost_windows, "tracking_losses": self.losses}
