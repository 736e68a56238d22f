"""Geometric verification of a loop candidate with the backbone's own prediction.

The backbone is run on a small window made of the candidate keyframe ``c`` and the current one
``q`` (plus a neighbour of each). From that prediction:

* per keyframe, the depth scale of the window relative to the keyframe's stored local points
  (median ratio over its points; the share of points agreeing with the median is a first
  inlier test: the window must see the same surfaces the keyframe stored);
* the relative Sim(3) ``Z_cq`` (q-local -> c-local) that the window implies;
* the overlap: q's stored points moved into c's camera by ``Z_cq`` must land inside c's image
  on c's predicted depth (two views of different places that merely look alike do not).

Consistency with the graph (is the correction plausible for the drift accumulated between
them?) is checked by the Mapper, which owns the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .alignment import Sim3
from .points import lookup_cells

DEPTH_RATIO_TOLERANCE = 0.05   # |log ratio - median log ratio| of an inlier point (5 %)
OVERLAP_DEPTH_TOLERANCE = 0.05  # relative depth difference of an overlapping point
REJECT_PREDICTION = "prediction_unusable"
REJECT_DEPTH_SCALE = "depth_scale_inconsistent"
REJECT_OVERLAP = "no_overlap"
REJECT_GRAPH = "inconsistent_with_graph"
ACCEPTED = "accepted"


@dataclass(frozen=True)
class KeyframeGeometry:
    """What verification needs of a mapped keyframe: its confident points in its own camera
    frame (local units) and the intrinsics to project them."""

    points: np.ndarray   # float [n, 3], z > 0
    K: np.ndarray        # [3, 3]


@dataclass(frozen=True)
class LoopCheck:
    accepted: bool
    reason: str
    relative: Optional[Sim3] = None          # q-local -> c-local
    scale_inliers: float = 0.0               # min over c and q of the depth-ratio inlier share
    overlap: float = 0.0                     # share of q's points on c's surfaces


def project(points: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image coordinates ``u, v`` and depth ``z`` of camera-frame points."""
    z = points[:, 2]
    safe = np.where(z > 1e-12, z, 1.0)
    x, y = points[:, 0] / safe, points[:, 1] / safe
    return K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2], z


def depth_scale(geometry: KeyframeGeometry, depth: np.ndarray, depth_box) -> tuple[float, float]:
    """Window depth units per local unit for a keyframe (median ratio of the window's depth to
    its stored points, looked up at the points' pixels) and the share of points whose ratio is
    within :data:`DEPTH_RATIO_TOLERANCE` of it. ``(nan, 0)`` without usable points."""
    u, v, z = project(geometry.points, geometry.K)
    cell, inside = lookup_cells(u, v, depth.shape, depth_box)
    d = depth.reshape(-1)[cell]
    ok = inside & (z > 0) & np.isfinite(d) & (d > 0)
    if np.count_nonzero(ok) < 8:
        return float("nan"), 0.0
    log_r = np.log(d[ok] / z[ok])
    med = float(np.median(log_r))
    return float(np.exp(med)), float(np.count_nonzero(np.abs(log_r - med) < DEPTH_RATIO_TOLERANCE) / len(geometry.points))


def window_node(c2w: np.ndarray, scale: float) -> Sim3:
    """A keyframe's local -> window-world similarity: its predicted pose after scaling local
    points by ``scale`` (window units per local unit)."""
    return Sim3(float(scale), np.asarray(c2w[:3, :3], dtype=np.float64), np.asarray(c2w[:3, 3], dtype=np.float64))


def overlap_fraction(points_q: np.ndarray, q_to_c: Sim3, K_c: np.ndarray, depth_c: np.ndarray, depth_box) -> float:
    """Share of ``points_q`` (q-local) that, moved into c's camera, project inside c's depth grid
    onto a depth within :data:`OVERLAP_DEPTH_TOLERANCE` of ``depth_c`` (c-local units)."""
    if len(points_q) == 0:
        return 0.0
    u, v, z = project(q_to_c.apply(points_q), K_c)
    cell, inside = lookup_cells(u, v, depth_c.shape, depth_box)
    d = depth_c.reshape(-1)[cell]
    ok = inside & (z > 0) & np.isfinite(d) & (d > 0)
    ok &= np.abs(z - np.where(ok, d, 0.0)) <= OVERLAP_DEPTH_TOLERANCE * np.where(ok, d, 1.0)
    return float(np.count_nonzero(ok) / len(points_q))


def verify_pair(c2w: np.ndarray, depth: np.ndarray, depth_box, index_c: int, index_q: int,
                c: KeyframeGeometry, q: KeyframeGeometry, min_inlier_fraction: float) -> LoopCheck:
    """Check a verification window's prediction (``c2w [S, 4, 4]``, ``depth [S, h, w]``) for the
    pair at ``index_c``/``index_q``; returns the relative similarity if it passes."""
    if not (np.all(np.isfinite(c2w[[index_c, index_q]])) and depth.ndim == 3):
        return LoopCheck(False, REJECT_PREDICTION)
    s_c, in_c = depth_scale(c, depth[index_c], depth_box)
    s_q, in_q = depth_scale(q, depth[index_q], depth_box)
    scale_inliers = min(in_c, in_q)
    if not (np.isfinite(s_c) and np.isfinite(s_q)) or scale_inliers < min_inlier_fraction:
        return LoopCheck(False, REJECT_DEPTH_SCALE, scale_inliers=scale_inliers)
    relative = window_node(c2w[index_c], s_c).inverse() @ window_node(c2w[index_q], s_q)
    overlap = overlap_fraction(q.points, relative, c.K, depth[index_c] / s_c, depth_box)
    if overlap < min_inlier_fraction:
        return LoopCheck(False, REJECT_OVERLAP, relative, scale_inliers, overlap)
    return LoopCheck(True, ACCEPTED, relative, scale_inliers, overlap)


def graph_discrepancy(pose_c: Sim3, pose_q: Sim3, relative: Sim3) -> tuple[float, float]:
    """How far the loop moves q relative to c: translation (map units) and rotation (radians)
    between where the graph has q and where ``pose_c @ relative`` puts it."""
    proposed = pose_c @ relative
    dt = float(np.linalg.norm(proposed.t - pose_q.t))
    cos = (np.trace(proposed.R.T @ pose_q.R) - 1.0) / 2.0
    return dt, float(np.arccos(np.clip(cos, -1.0, 1.0)))
