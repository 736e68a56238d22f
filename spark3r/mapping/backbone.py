"""The seam between the mapper and any reconstruction model: :class:`Backbone` -> :class:`Prediction`.

Whatever a model's own convention, a backbone returns ONE convention:

* ``c2w [S, 4, 4]`` float64: rigid camera-to-window-world poses, OpenCV camera axes (x right,
  y down, z forward). The window world is arbitrary (any rotation, translation and unit); the
  mapper aligns it to the map.
* ``K [S, 3, 3]`` float64: intrinsics in the pixels of the **keyframe image** as given to the
  backbone (OpenCV pixel convention: the centre of pixel column j, row i is at (j, i)).
* ``depth [S, h, w]`` float32: z-depth along the optical axis, in window-world units, on a grid
  of any resolution that covers ``depth_box`` of the keyframe image.
* ``conf [S, h, w]`` float32: confidence, larger is better (any positive scale).
* ``depth_box = (x0, y0, x1, y1)``: the region of the keyframe image (pixel *edge* coordinates,
  so the full image is ``(0, 0, W, H)``) that the depth grid spans; a centre-cropping
  preprocessor reports its crop here. Depth cell (r, c) looks at image point
  ``(x0 + (c + 0.5) (x1 - x0) / w - 0.5, y0 + (r + 0.5) (y1 - y0) / h - 0.5)``.
* ``descriptors [S, D]`` float32, optional: a unit-length place descriptor per frame (see
  :func:`spark3r.mapping.place_recognition.place_descriptor`); None when the backbone has none
  (then the mapper does no loop closure).

Frames come back in the order of the window passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .frames import Keyframe


@dataclass
class Prediction:
    c2w: np.ndarray
    K: np.ndarray
    depth: np.ndarray
    conf: np.ndarray
    depth_box: tuple[float, float, float, float]
    descriptors: Optional[np.ndarray] = None

    @property
    def num_frames(self) -> int:
        return int(self.c2w.shape[0])

    def shape_problem(self, num_frames: int) -> Optional[str]:
        """None if shapes/types are as documented for ``num_frames`` frames, else what is wrong."""
        S = num_frames
        for name, arr, tail in (("c2w", self.c2w, (4, 4)), ("K", self.K, (3, 3))):
            if not isinstance(arr, np.ndarray) or arr.shape != (S, *tail):
                return f"Prediction.{name} must be an array of shape {(S, *tail)}, got {getattr(arr, 'shape', type(arr).__name__)}"
        if not isinstance(self.depth, np.ndarray) or self.depth.ndim != 3 or self.depth.shape[0] != S or min(self.depth.shape[1:]) < 1:
            return f"Prediction.depth must be [S={S}, h, w], got {getattr(self.depth, 'shape', type(self.depth).__name__)}"
        if not isinstance(self.conf, np.ndarray) or self.conf.shape != self.depth.shape:
            return f"Prediction.conf must match depth {self.depth.shape}, got {getattr(self.conf, 'shape', type(self.conf).__name__)}"
        box = self.depth_box
        if len(box) != 4 or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            return f"Prediction.depth_box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}"
        d = self.descriptors
        if d is not None and (not isinstance(d, np.ndarray) or d.ndim != 2 or d.shape[0] != S or d.shape[1] < 1
                              or not np.all(np.isfinite(d))):
            return f"Prediction.descriptors must be None or a finite array [S={S}, D], got {getattr(d, 'shape', type(d).__name__)}"
        return None

    def finite_frames(self, K: Optional[np.ndarray] = None) -> np.ndarray:
        """bool ``[S]``: frames whose pose and intrinsics are finite and usable (positive focal
        lengths, a proper rotation). ``K`` replaces the predicted intrinsics in the check when
        the caller unprojects with other ones (camera_info)."""
        K = self.K if K is None else K
        ok = np.all(np.isfinite(self.c2w.reshape(len(self.c2w), -1)), axis=1)
        ok &= np.all(np.isfinite(K.reshape(len(K), -1)), axis=1)
        ok &= (K[:, 0, 0] > 0) & (K[:, 1, 1] > 0)
        R = np.where(ok[:, None, None], self.c2w[:, :3, :3], np.eye(3))
        ortho = np.abs(np.einsum("sji,sjk->sik", R, R) - np.eye(3)).max(axis=(1, 2)) < 1e-3
        ok &= ortho & (np.linalg.det(R) > 0)
        return ok


@runtime_checkable
class Backbone(Protocol):
    """Anything that turns a window of keyframes into a :class:`Prediction`.

    ``predict`` is called from one worker thread at a time. ``forget`` tells the backbone that
    keyframe ids will not be asked for again (cache eviction hint); ``reset`` drops all state.
    """

    def predict(self, window: Sequence[Keyframe]) -> Prediction: ...

    def forget(self, keyframe_ids: Sequence[int]) -> None: ...

    def reset(self) -> None: ...


def depth_cell_image_coords(h: int, w: int, depth_box: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Image pixel coordinates (OpenCV convention) of the depth-grid cell centres:
    ``u [w]`` (columns) and ``v [h]`` (rows)."""
    x0, y0, x1, y1 = (float(b) for b in depth_box)
    u = x0 + (np.arange(w) + 0.5) * (x1 - x0) / w - 0.5
    v = y0 + (np.arange(h) + 0.5) * (y1 - y0) / h - 0.5
    return u, v
