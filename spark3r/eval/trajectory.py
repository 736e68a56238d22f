"""Trajectory metrics: time association, SE(3)/Sim(3) alignment, ATE and RPE.

Conventions follow the TUM RGB-D benchmark (and evo): poses are camera-to-world 4x4; ATE is the
translation error of each associated pose after aligning the estimate to the ground truth with
one transform fitted on the positions (Umeyama; Sim(3) also fits the scale, which a monocular
estimate needs); RPE compares the relative motion over ``delta`` associated poses,
``E_i = (Q_i^-1 Q_{i+d})^-1 (P_i^-1 P_{i+d})``, with the estimate's translations scaled by the
alignment's scale. The alignment itself reuses :func:`spark3r.mapping.umeyama`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spark3r.mapping.alignment import Sim3, umeyama

ALIGNMENTS = ("sim3", "se3", "none")


def associate(est_stamps_ns, gt_stamps_ns, max_diff_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs ``(est_index, gt_index)`` of stamps closer than ``max_diff_ns``, closest
    pairs first (as TUM's associate.py), returned in estimate order."""
    est = np.asarray(est_stamps_ns, dtype=np.int64)
    gt = np.asarray(gt_stamps_ns, dtype=np.int64)
    if max_diff_ns < 0:
        raise ValueError(f"max_diff_ns must be >= 0, got {max_diff_ns}")
    if est.size == 0 or gt.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(gt, kind="stable")
    sorted_gt = gt[order]
    candidates = []
    for i, stamp in enumerate(est):
        # The nearest ground-truth stamps on either side are the only candidates worth keeping.
        k = int(np.searchsorted(sorted_gt, stamp))
        for j in (k - 1, k, k + 1):
            if 0 <= j < len(sorted_gt):
                diff = abs(int(sorted_gt[j]) - int(stamp))
                if diff <= max_diff_ns:
                    candidates.append((diff, i, int(order[j])))
    candidates.sort()
    used_est, used_gt, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_est and j not in used_gt:
            used_est.add(i)
            used_gt.add(j)
            pairs.append((i, j))
    pairs.sort()
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx = np.array(pairs, dtype=np.int64)
    return idx[:, 0], idx[:, 1]


def align(est_poses: np.ndarray, gt_poses: np.ndarray, method: str = "sim3") -> Sim3:
    """Transform taking the estimate's frame to the ground truth's, fitted on camera positions.
    ``"none"`` is the identity (for estimates already in the ground-truth frame)."""
    if method not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {method!r}")
    if method == "none":
        return Sim3()
    if len(est_poses) < 3:
        raise ValueError(f"{method} alignment needs at least 3 associated poses, got {len(est_poses)}")
    return umeyama(est_poses[:, :3, 3], gt_poses[:, :3, 3], with_scale=(method == "sim3"))


def _rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    # atan2(sin, cos) stays accurate near 0 and 180 degrees, where arccos(cos) loses half the digits.
    cos = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    skew = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], axis=-1)
    sin = np.linalg.norm(skew, axis=-1) / 2.0
    return np.degrees(np.arctan2(sin, cos))


def error_stats(errors: np.ndarray) -> dict:
    e = np.asarray(errors, dtype=np.float64)
    if e.size == 0:
        return {"count": 0}
    return {"count": int(e.size), "rmse": float(np.sqrt(np.mean(e**2))), "mean": float(e.mean()),
            "median": float(np.median(e)), "std": float(e.std()), "min": float(e.min()), "max": float(e.max())}


@dataclass
class TrajectoryResult:
    stamps_ns: np.ndarray        # associated estimate stamps [M]
    est_aligned: np.ndarray      # [M, 4, 4] estimate after alignment
    gt: np.ndarray               # [M, 4, 4] associated ground truth
    alignment: Sim3
    ate_errors: np.ndarray       # [M] translation error after alignment
    ate_rotation_deg: np.ndarray  # [M] rotation error after alignment
    rpe_translation: np.ndarray  # [M - delta]
    rpe_rotation_deg: np.ndarray  # [M - delta]
    rpe_delta: int
    unmatched_estimate: int
    unmatched_ground_truth: int

    def summary(self) -> dict:
        R = self.alignment.R
        return {
            "associated_poses": int(len(self.stamps_ns)),
            "unmatched_estimate_poses": self.unmatched_estimate,
            "unmatched_ground_truth_poses": self.unmatched_ground_truth,
            "alignment": {"scale": float(self.alignment.scale), "rotation": R.tolist(),
                          "translation": self.alignment.t.tolist()},
            "ate_m": error_stats(self.ate_errors),
            "ate_rotation_deg": error_stats(self.ate_rotation_deg),
            "rpe": {"delta_poses": self.rpe_delta, "translation_m": error_stats(self.rpe_translation),
                    "rotation_deg": error_stats(self.rpe_rotation_deg)},
        }


def relative_pose_errors(est: np.ndarray, gt: np.ndarray, delta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Translation and rotation (degrees) of ``(Q_i^-1 Q_{i+d})^-1 (P_i^-1 P_{i+d})``."""
    if delta < 1:
        raise ValueError(f"RPE delta must be >= 1 pose, got {delta}")
    if len(est) <= delta:
        return np.zeros(0), np.zeros(0)
    inv = np.linalg.inv
    rel_est = inv(est[:-delta]) @ est[delta:]
    rel_gt = inv(gt[:-delta]) @ gt[delta:]
    err = inv(rel_gt) @ rel_est
    return np.linalg.norm(err[:, :3, 3], axis=1), _rotation_angle_deg(err[:, :3, :3])


def evaluate_trajectory(est_stamps_ns, est_poses, gt_stamps_ns, gt_poses, alignment: str = "sim3",
                        max_diff_ns: int = 20_000_000, rpe_delta: int = 1) -> TrajectoryResult:
    """Associate, align and measure ATE + RPE of ``est`` against ``gt`` (camera-to-world poses)."""
    est_poses = np.asarray(est_poses, dtype=np.float64)
    gt_poses = np.asarray(gt_poses, dtype=np.float64)
    for name, poses, stamps in (("estimate", est_poses, est_stamps_ns), ("ground truth", gt_poses, gt_stamps_ns)):
        if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) != len(stamps):
            raise ValueError(f"{name} poses must be [N, 4, 4] with one stamp each, got {poses.shape} and {len(stamps)} stamps")
    ei, gi = associate(est_stamps_ns, gt_stamps_ns, max_diff_ns)
    if len(ei) == 0:
        raise ValueError(f"no estimate stamp is within {max_diff_ns / 1e6:g} ms of a ground-truth stamp "
                         "(wrong ground truth, or stamps in another clock?); if they are offset, raise the association "
                         "threshold (spark3r eval --max-diff SECONDS)")
    est, gt = est_poses[ei], gt_poses[gi]
    transform = align(est, gt, alignment)
    aligned = transform.apply_to_poses(est)
    ate = np.linalg.norm(aligned[:, :3, 3] - gt[:, :3, 3], axis=1)
    rot = _rotation_angle_deg(np.einsum("nji,njk->nik", aligned[:, :3, :3], gt[:, :3, :3]))
    rpe_t, rpe_r = relative_pose_errors(aligned, gt, rpe_delta)
    return TrajectoryResult(np.asarray(est_stamps_ns, dtype=np.int64)[ei], aligned, gt, transform, ate, rot, rpe_t,
                            rpe_r, rpe_delta, len(est_poses) - len(ei), len(gt_poses) - len(gi))
