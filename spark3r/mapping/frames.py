"""What enters the mapper: a :class:`Frame` per image, and the :class:`Keyframe` it may become."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

MIN_IMAGE_SIDE = 16  # smaller images carry no usable geometry (and break the flow pyramid)


@dataclass(frozen=True)
class Frame:
    """One camera image.

    ``image``: ``uint8 [H, W, 3]`` RGB. ``stamp_ns``: source image stamp (nanoseconds, the ROS
    header time; must increase). ``K``: optional ``[3, 3]`` pinhole intrinsics in this image's
    pixels (from camera_info, for a rectified image); None = use the backbone's.
    """

    image: np.ndarray
    stamp_ns: int
    K: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Keyframe:
    """A frame accepted by the gate. ``id`` is unique for the lifetime of a Mapper (it keeps
    counting across resets), so caches can key on it."""

    id: int
    stamp_ns: int
    image: np.ndarray
    K: Optional[np.ndarray] = None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def frame_problem(frame: Frame) -> Optional[str]:
    """None if the frame is usable, else a sentence saying what is wrong and what is expected."""
    img = frame.image
    if not isinstance(img, np.ndarray):
        return f"image must be a numpy array, got {type(img).__name__}"
    if img.ndim != 3 or img.shape[2] != 3:
        return f"image must be [H, W, 3] RGB, got shape {img.shape}"
    if img.dtype != np.uint8:
        return f"image must be uint8, got {img.dtype}"
    if min(img.shape[0], img.shape[1]) < MIN_IMAGE_SIDE:
        return f"image {img.shape[1]}x{img.shape[0]} is smaller than {MIN_IMAGE_SIDE} pixels on a side"
    if not isinstance(frame.stamp_ns, (int, np.integer)) or isinstance(frame.stamp_ns, bool):
        return f"stamp_ns must be an integer (nanoseconds), got {type(frame.stamp_ns).__name__}"
    return None


def usable_intrinsics(K) -> Optional[np.ndarray]:
    """``K`` as float64 ``[3, 3]`` if it is a plausible pinhole matrix, else None (an all-zero
    camera_info K, the usual "uncalibrated" marker, counts as missing)."""
    if K is None:
        return None
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        return None
    return K
