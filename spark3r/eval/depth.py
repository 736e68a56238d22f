"""Depth metrics against ground-truth depth: AbsRel and the delta < 1.25 inlier ratio.

A prediction is compared on the pixels where both are valid (finite, > 0, ground truth within
``max_depth``). Scale: ``"median"`` rescales each frame by median(gt) / median(pred) (the usual
protocol for scale-ambiguous monocular depth), ``"none"`` compares as is, a number multiplies
every prediction (e.g. the Sim(3) scale of the trajectory alignment).
"""
from __future__ import annotations

import numpy as np

DELTA_THRESHOLD = 1.25


def frame_depth_metrics(pred, gt, scale="median", max_depth: float = np.inf) -> dict:
    """Metrics of one frame (``pred`` and ``gt`` of the same shape)."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"predicted and ground-truth depth must be 2-D of the same shape, got {pred.shape} and {gt.shape}")
    valid = np.isfinite(pred) & (pred > 0) & np.isfinite(gt) & (gt > 0) & (gt <= max_depth)
    if not np.any(valid):
        return {"valid_pixels": 0}
    p, g = pred[valid], gt[valid]
    if isinstance(scale, str):
        if scale == "median":
            factor = float(np.median(g) / np.median(p))
        elif scale == "none":
            factor = 1.0
        else:
            raise ValueError(f"depth scale must be 'median', 'none' or a positive number, got {scale!r}")
    else:
        factor = float(scale)
        if not (np.isfinite(factor) and factor > 0):
            raise ValueError(f"depth scale must be a positive finite number, got {scale!r}")
    p = p * factor
    ratio = np.maximum(p / g, g / p)
    return {"valid_pixels": int(valid.sum()), "scale": factor, "abs_rel": float(np.mean(np.abs(p - g) / g)),
            "delta1": float(np.mean(ratio < DELTA_THRESHOLD)), "rmse": float(np.sqrt(np.mean((p - g) ** 2)))}


def sample_at_cells(image: np.ndarray, grid_hw: tuple[int, int], box) -> np.ndarray:
    """Values of a full-resolution ``image [H, W]`` at the cell centres of a ``grid_hw`` depth grid
    covering ``box = (x0, y0, x1, y1)`` (pixel-edge coordinates; see spark3r.mapping.backbone),
    nearest pixel. Cells that fall outside the image get NaN."""
    from spark3r.mapping.backbone import depth_cell_image_coords

    h, w = grid_hw
    u, v = depth_cell_image_coords(h, w, box)
    cols, rows = np.round(u).astype(int), np.round(v).astype(int)
    H, W = image.shape[:2]
    out = np.full((h, w), np.nan)
    ok_c, ok_r = (cols >= 0) & (cols < W), (rows >= 0) & (rows < H)
    sub = image[np.ix_(rows[ok_r], cols[ok_c])]
    out[np.ix_(ok_r, ok_c)] = sub
    return out


def aggregate(per_frame: list[dict]) -> dict:
    """Means over the frames that had valid pixels."""
    used = [m for m in per_frame if m.get("valid_pixels", 0) > 0]
    if not used:
        return {"frames": 0}
    return {"frames": len(used), "abs_rel": float(np.mean([m["abs_rel"] for m in used])),
            "delta1": float(np.mean([m["delta1"] for m in used])), "rmse": float(np.mean([m["rmse"] for m in used])),
            "scale_median": float(np.median([m["scale"] for m in used]))}
