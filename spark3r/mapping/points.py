"""Depth grid -> 3-D points: confidence masks, unprojection through ``depth_box``, colours."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .backbone import depth_cell_image_coords


def confident_mask(depth: np.ndarray, conf: np.ndarray, percentile: float, conf_min: float) -> np.ndarray:
    """bool ``[h, w]``: finite positive depth with confidence at or above both the frame's
    ``percentile`` (over its valid cells) and ``conf_min``."""
    valid = np.isfinite(depth) & (depth > 0) & np.isfinite(conf)
    if not np.any(valid):
        return valid
    threshold = max(float(np.percentile(conf[valid], percentile)) if percentile > 0 else -np.inf, conf_min)
    return valid & (conf >= threshold)


def subsample_indices(mask: np.ndarray, max_count: int) -> np.ndarray:
    """Flat indices of up to ``max_count`` True cells of ``mask``, evenly spread in raster order."""
    flat = np.flatnonzero(mask.reshape(-1))
    if len(flat) > max_count:
        flat = flat[np.linspace(0, len(flat) - 1, max_count).round().astype(np.int64)]
    return flat


def cell_rays(flat_idx: np.ndarray, shape: tuple[int, int], depth_box: Sequence[float], K: np.ndarray):
    """For flat depth-cell indices: image pixel coords ``u, v`` and camera rays with z = 1 ``[N, 3]``."""
    h, w = shape
    us, vs = depth_cell_image_coords(h, w, depth_box)
    u = us[flat_idx % w]
    v = vs[flat_idx // w]
    rays = np.stack([(u - K[0, 2] - K[0, 1] * (v - K[1, 2]) / K[1, 1]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=1)
    return u, v, rays


def unproject_cells(depth: np.ndarray, flat_idx: np.ndarray, depth_box, K: np.ndarray, c2w: np.ndarray):
    """World points ``[N, 3]`` of the given depth cells, plus their image coords ``u, v``."""
    u, v, rays = cell_rays(flat_idx, depth.shape, depth_box, K)
    cam = rays * depth.reshape(-1)[flat_idx][:, None]
    return cam @ c2w[:3, :3].T + c2w[:3, 3], u, v


def sample_image(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest-pixel colours ``uint8 [N, 3]`` at image coords (clamped to the image)."""
    H, W = image.shape[:2]
    cols = np.clip(np.round(u).astype(np.int64), 0, W - 1)
    rows = np.clip(np.round(v).astype(np.int64), 0, H - 1)
    return image[rows, cols]


def lookup_cells(u: np.ndarray, v: np.ndarray, shape: tuple[int, int], depth_box) -> tuple[np.ndarray, np.ndarray]:
    """Flat index of the depth cell (of a grid of ``shape`` over ``depth_box``) containing image
    coords ``u, v``, and whether the point lies inside the grid at all."""
    h, w = shape
    x0, y0, x1, y1 = (float(b) for b in depth_box)
    col = np.floor((u + 0.5 - x0) * w / (x1 - x0)).astype(np.int64)
    row = np.floor((v + 0.5 - y0) * h / (y1 - y0)).astype(np.int64)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return np.where(inside, row * w + col, 0), inside
