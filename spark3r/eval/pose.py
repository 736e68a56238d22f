"""Relative-pose accuracy of a set of cameras: pairwise errors and the AUC@30 of VGGT-style
evaluations (no alignment needed: relative poses do not depend on the world frame or scale).

For every frame pair (i < j) the error of the relative rotation (degrees) and of the direction of
the relative translation (degrees, sign-ambiguous: ``min(e, 180 - e)``). A pair's error is the
larger of the two; AUC@T = mean over thresholds 1..T degrees of the share of pairs below it.
Pairs whose ground-truth baseline is under ``min_baseline`` (a camera turning on the spot) have
no defined direction and are scored on rotation only; a predicted zero translation counts as 90
degrees.
"""
from __future__ import annotations

import numpy as np


def _angle_deg(r: np.ndarray) -> np.ndarray:
    cos = (np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def pairwise_pose_errors(pred_c2w, gt_c2w, min_baseline: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``(rotation_error, translation_direction_error)`` in degrees per pair (i < j) of
    camera-to-world poses ``[S, 4, 4]``; the second is NaN where the ground-truth baseline is
    below ``min_baseline`` (ground-truth units)."""
    pred, gt = np.asarray(pred_c2w, dtype=np.float64), np.asarray(gt_c2w, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[1:] != (4, 4):
        raise ValueError(f"poses must be two [S, 4, 4] arrays of the same shape, got {pred.shape} and {gt.shape}")
    i, j = np.triu_indices(len(gt), k=1)

    def relative(c2w):  # camera j in camera i
        return np.linalg.inv(c2w[i]) @ c2w[j]

    rp, rg = relative(pred), relative(gt)
    r_err = _angle_deg(np.swapaxes(rp[:, :3, :3], -1, -2) @ rg[:, :3, :3])
    tp, tg = rp[:, :3, 3], rg[:, :3, 3]
    norm_p, norm_g = np.linalg.norm(tp, axis=-1), np.linalg.norm(tg, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ij,ij->i", tp, tg) / (norm_p * norm_g)
    t_err = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    t_err = np.minimum(t_err, 180.0 - t_err)
    t_err = np.where(norm_p > 1e-9, t_err, 90.0)
    return r_err, np.where(norm_g >= min_baseline, t_err, np.nan)


def pose_auc(r_err: np.ndarray, t_err: np.ndarray, max_threshold: int = 30) -> float:
    """AUC over thresholds 1..``max_threshold`` degrees of the pairs' errors (see the module
    docstring); NaN when there are no pairs."""
    r_err, t_err = np.asarray(r_err, dtype=np.float64), np.asarray(t_err, dtype=np.float64)
    err = np.where(np.isnan(t_err), r_err, np.maximum(r_err, np.nan_to_num(t_err, nan=0.0)))
    if err.size == 0:
        return float("nan")
    thresholds = np.arange(1, max_threshold + 1)
    return float(np.mean([(err < t).mean() for t in thresholds]))
