"""Keyframe gate: decides, cheaply, whether a frame is worth a place in the backbone window.

Checks, in order: image usable, stamp increasing (a jump backwards means the source restarted,
e.g. a bag loop: the caller resets), same image size as the map so far, minimum time gap, blur
(variance of the Laplacian), maximum time gap, and parallax (median sparse optical flow from the
last keyframe, measured on a downscaled grey image and reported in input-image pixels).
Cost: one resize + Laplacian + pyramidal Lucas-Kanade on ~320 px images, a few milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .config import KeyframeConfig
from .frames import Frame, frame_problem

# Reasons a decision can carry (the counters in MapperStats.decisions use the same strings).
ACCEPT_FIRST = "first"
ACCEPT_PARALLAX = "parallax"
ACCEPT_MAX_TIME_GAP = "max_time_gap"
ACCEPT_TRACKING_WEAK = "tracking_weak"
REJECT_BAD_IMAGE = "bad_image"
REJECT_IMAGE_SIZE = "image_size_changed"
REJECT_STAMP_REPEATED = "stamp_not_increasing"
REJECT_TIME_BACKWARDS = "time_backwards"
REJECT_TOO_SOON = "min_time_gap"
REJECT_BLURRY = "blurry"
REJECT_LOW_PARALLAX = "low_parallax"
ACCEPT_REASONS = (ACCEPT_FIRST, ACCEPT_PARALLAX, ACCEPT_MAX_TIME_GAP, ACCEPT_TRACKING_WEAK)
REJECT_REASONS = (REJECT_BAD_IMAGE, REJECT_IMAGE_SIZE, REJECT_STAMP_REPEATED, REJECT_TIME_BACKWARDS,
                  REJECT_TOO_SOON, REJECT_BLURRY, REJECT_LOW_PARALLAX)


@dataclass(frozen=True)
class KeyframeDecision:
    accepted: bool
    reason: str                      # one of ACCEPT_REASONS / REJECT_REASONS
    stamp_ns: int
    parallax_px: float = float("nan")  # median flow since the last keyframe (input pixels), if measured
    sharpness: float = float("nan")    # variance of the Laplacian, if measured
    keyframe_id: Optional[int] = None  # set when accepted
    detail: str = ""                   # human-readable explanation for rejections of bad input


@dataclass
class _Reference:
    stamp_ns: int
    shape: tuple[int, int]
    gray: np.ndarray          # downscaled grey image of the last keyframe
    corners: np.ndarray       # float32 [N, 1, 2] corners in `gray`
    scale: float              # input pixels per downscaled pixel


class KeyframeGate:
    """Stateful gate; not thread-safe by itself (the Mapper serialises calls)."""

    def __init__(self, config: KeyframeConfig):
        self.config = config
        self._ref: Optional[_Reference] = None
        self._last_stamp: Optional[int] = None

    def reset(self) -> None:
        self._ref = None
        self._last_stamp = None

    @property
    def image_shape(self) -> Optional[tuple[int, int]]:
        return None if self._ref is None else self._ref.shape

    def decide(self, frame: Frame) -> KeyframeDecision:
        """Decide on ``frame``; an accepted frame becomes the new parallax reference."""
        problem = frame_problem(frame)
        stamp = int(frame.stamp_ns) if isinstance(frame.stamp_ns, (int, np.integer)) else -1
        if problem is not None:
            return KeyframeDecision(False, REJECT_BAD_IMAGE, stamp, detail=problem)
        if self._last_stamp is not None and stamp < self._last_stamp:
            return KeyframeDecision(False, REJECT_TIME_BACKWARDS, stamp,
                                    detail=f"stamp {stamp} is before the previous frame's {self._last_stamp}")
        if self._last_stamp is not None and stamp == self._last_stamp:
            return KeyframeDecision(False, REJECT_STAMP_REPEATED, stamp, detail="same stamp as the previous frame")
        self._last_stamp = stamp
        shape = (int(frame.image.shape[0]), int(frame.image.shape[1]))
        cfg = self.config
        ref = self._ref
        if ref is not None and shape != ref.shape:
            return KeyframeDecision(False, REJECT_IMAGE_SIZE, stamp,
                                    detail=f"image is {shape[1]}x{shape[0]}, the map was started with {ref.shape[1]}x{ref.shape[0]}")
        if ref is not None and (stamp - ref.stamp_ns) * 1e-9 < cfg.min_time_gap_s:
            return KeyframeDecision(False, REJECT_TOO_SOON, stamp)
        gray, scale = downscaled_gray(frame.image, cfg.flow_image_width)
        sharp = sharpness(gray)
        if cfg.blur_threshold > 0 and sharp < cfg.blur_threshold:
            return KeyframeDecision(False, REJECT_BLURRY, stamp, sharpness=sharp)
        if ref is None:
            return self._accept(ACCEPT_FIRST, stamp, shape, gray, scale, sharp, float("nan"))
        if cfg.max_time_gap_s > 0 and (stamp - ref.stamp_ns) * 1e-9 >= cfg.max_time_gap_s:
            return self._accept(ACCEPT_MAX_TIME_GAP, stamp, shape, gray, scale, sharp, float("nan"))
        parallax, tracked = median_flow(ref.gray, gray, ref.corners)
        parallax *= ref.scale
        if tracked < cfg.min_tracked_fraction:
            return self._accept(ACCEPT_TRACKING_WEAK, stamp, shape, gray, scale, sharp, parallax)
        if parallax >= cfg.min_parallax_px:
            return self._accept(ACCEPT_PARALLAX, stamp, shape, gray, scale, sharp, parallax)
        return KeyframeDecision(False, REJECT_LOW_PARALLAX, stamp, parallax_px=parallax, sharpness=sharp)

    def _accept(self, reason, stamp, shape, gray, scale, sharp, parallax) -> KeyframeDecision:
        corners = cv2.goodFeaturesToTrack(gray, maxCorners=self.config.flow_max_corners, qualityLevel=0.01,
                                          minDistance=max(3, gray.shape[1] // 40), blockSize=5)
        if corners is None:
            corners = np.zeros((0, 1, 2), np.float32)
        self._ref = _Reference(stamp, shape, gray, corners.astype(np.float32), scale)
        return KeyframeDecision(True, reason, stamp, parallax_px=parallax, sharpness=sharp)


def downscaled_gray(image: np.ndarray, max_width: int) -> tuple[np.ndarray, float]:
    """Grey image no wider than ``max_width`` and the input-pixels-per-output-pixel factor."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    w = gray.shape[1]
    if w <= max_width:
        return gray, 1.0
    scale = w / max_width
    h = max(1, int(round(gray.shape[0] / scale)))
    return cv2.resize(gray, (max_width, h), interpolation=cv2.INTER_AREA), scale


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian: low for blurred or featureless images."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def median_flow(prev_gray: np.ndarray, gray: np.ndarray, corners: np.ndarray) -> tuple[float, float]:
    """Median displacement (pixels of these images) of ``corners`` tracked from ``prev_gray`` to
    ``gray`` with forward-backward checked Lucas-Kanade, and the fraction tracked (0 if none)."""
    if len(corners) == 0:
        return float("nan"), 0.0
    lk = dict(winSize=(15, 15), maxLevel=3, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
    fwd, st1, _ = cv2.calcOpticalFlowPyrLK(prev_gray, gray, corners, None, **lk)
    back, st2, _ = cv2.calcOpticalFlowPyrLK(gray, prev_gray, fwd, None, **lk)
    fb_error = np.linalg.norm((back - corners).reshape(-1, 2), axis=1)
    good = (st1.reshape(-1) == 1) & (st2.reshape(-1) == 1) & (fb_error < 1.0)
    if not np.any(good):
        return float("nan"), 0.0
    flow = np.linalg.norm((fwd - corners).reshape(-1, 2)[good], axis=1)
    return float(np.median(flow)), float(good.mean())
