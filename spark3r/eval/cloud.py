"""Point-cloud accuracy / completeness (Chamfer) against a reference cloud.

Accuracy: distance from each estimated point to the nearest reference point (how close the map
is to true surfaces). Completeness: from each reference point to the nearest estimated point (how
much of the surface the map covers). Chamfer = mean of the two means. Precision / recall /
F-score count distances below ``threshold``. Both clouds must be in the same frame and unit
(apply the trajectory alignment to the map first).
"""
from __future__ import annotations

import numpy as np


def _check(name: str, xyz) -> np.ndarray:
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"{name} must be [N, 3] points, got shape {xyz.shape}")
    xyz = xyz[np.all(np.isfinite(xyz), axis=1)]
    if len(xyz) == 0:
        raise ValueError(f"{name} has no finite points")
    return xyz


def subsample(xyz: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    if len(xyz) <= max_points:
        return xyz
    return xyz[np.random.default_rng(seed).choice(len(xyz), max_points, replace=False)]


def cloud_metrics(estimate, reference, threshold: float = 0.05, max_points: int = 200_000) -> dict:
    """Accuracy, completeness, Chamfer, precision/recall/F-score at ``threshold`` (cloud units).
    Clouds larger than ``max_points`` are randomly subsampled (fixed seed)."""
    from scipy.spatial import cKDTree

    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive distance, got {threshold!r}")
    est = subsample(_check("estimate", estimate), max_points)
    ref = subsample(_check("reference", reference), max_points)
    acc, _ = cKDTree(ref).query(est)
    comp, _ = cKDTree(est).query(ref)
    precision, recall = float(np.mean(acc < threshold)), float(np.mean(comp < threshold))
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"estimate_points": int(len(est)), "reference_points": int(len(ref)),
            "accuracy_mean": float(acc.mean()), "accuracy_median": float(np.median(acc)),
            "completeness_mean": float(comp.mean()), "completeness_median": float(np.median(comp)),
            "chamfer": float((acc.mean() + comp.mean()) / 2), "threshold": float(threshold),
            "precision": precision, "recall": recall, "fscore": float(fscore)}
