"""Test doubles for the mapper. Nothing here is a real model.

:class:`GroundTruthBackbone` is a **test double**: it answers a window with the synthetic
sequence's ground truth for the keyframes' stamps, expressed in a fresh random similarity frame
per window (like a feed-forward model, whose world is its first view and whose unit is arbitrary),
optionally perturbed. It lets the mapper's stitching be checked against exact geometry.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .alignment import Sim3
from .backbone import Prediction
from .frames import Keyframe


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed proper rotation."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_similarity(rng: np.random.Generator, scale_range=(0.5, 2.0), translation_sigma: float = 5.0) -> Sim3:
    lo, hi = scale_range
    scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return Sim3(scale, random_rotation(rng), rng.normal(scale=translation_sigma, size=3))


class GroundTruthBackbone:
    """Test double: ground truth of a synthetic sequence, each window in its own random
    similarity frame.

    ``sequence``: anything with ``images [N,H,W,3]``, ``depth [N,H,W]``, ``K``, ``c2w [N,4,4]``,
    ``stamps_ns [N]`` (e.g. ``spark3r.data.synthetic.render_sequence``).
    ``depth_stride``: return every k-th depth cell (checks that the mapper maps a coarser depth
    grid back to image pixels correctly). Noise: ``rotation_noise_deg`` / ``translation_noise``
    (fraction of the scene's camera-depth median) per frame pose, ``depth_noise`` (relative,
    multiplicative). ``conf`` is ``1 + 4 * rng.random`` per cell so percentile filtering acts.
    """

    def __init__(self, sequence, seed: int = 0, scale_range=(0.5, 2.0), depth_stride: int = 1,
                 rotation_noise_deg: float = 0.0, translation_noise: float = 0.0, depth_noise: float = 0.0):
        if depth_stride < 1:
            raise ValueError(f"depth_stride must be >= 1, got {depth_stride}")
        self.seq = sequence
        self.rng = np.random.default_rng(seed)
        self.scale_range = scale_range
        self.depth_stride = int(depth_stride)
        self.rotation_noise_deg = float(rotation_noise_deg)
        self.translation_noise = float(translation_noise)
        self.depth_noise = float(depth_noise)
        self.frame_of_stamp = {int(s): i for i, s in enumerate(np.asarray(sequence.stamps_ns))}
        self.window_frames: list[list[int]] = []   # sequence indices per call (for tests)
        self.window_transforms: list[Sim3] = []     # ground-truth world -> window frame per call
        self.forgotten: list[int] = []

    def predict(self, window: Sequence[Keyframe]) -> Prediction:
        try:
            idx = [self.frame_of_stamp[int(kf.stamp_ns)] for kf in window]
        except KeyError as exc:
            raise ValueError(f"GroundTruthBackbone: stamp {exc.args[0]} is not a frame of the sequence") from None
        to_window = random_similarity(self.rng, self.scale_range)
        c2w = to_window.apply_to_poses(np.asarray(self.seq.c2w)[idx])
        k = self.depth_stride
        depth = np.asarray(self.seq.depth)[idx][:, ::k, ::k].astype(np.float64) * to_window.scale
        if self.rotation_noise_deg > 0 or self.translation_noise > 0:
            c2w = self._perturb(c2w, float(np.median(depth)))
        if self.depth_noise > 0:
            depth = depth * (1.0 + self.depth_noise * self.rng.normal(size=depth.shape))
        conf = (1.0 + 4.0 * self.rng.random(depth.shape)).astype(np.float32)
        H, W = np.asarray(self.seq.images).shape[1:3]
        h, w = depth.shape[1:]
        # Cell (r, c) samples pixel (k r, k c): a grid over a box shifted by -(k-1)/2 pixels.
        off = -(k - 1) / 2.0
        box = (off, off, off + w * k, off + h * k)
        K = np.repeat(np.asarray(self.seq.K, dtype=np.float64)[None], len(idx), axis=0)
        self.window_frames.append(idx)
        self.window_transforms.append(to_window)
        return Prediction(c2w=c2w, K=K, depth=depth.astype(np.float32), conf=conf, depth_box=box)

    def _perturb(self, c2w: np.ndarray, typical_depth: float) -> np.ndarray:
        out = c2w.copy()
        for pose in out:
            axis = self.rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            angle = np.radians(self.rotation_noise_deg) * self.rng.normal()
            Kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            dR = np.eye(3) + np.sin(angle) * Kx + (1 - np.cos(angle)) * Kx @ Kx
            pose[:3, :3] = dR @ pose[:3, :3]
            pose[:3, 3] += self.translation_noise * typical_depth * self.rng.normal(size=3)
        return out

    def forget(self, keyframe_ids) -> None:
        self.forgotten.extend(int(i) for i in keyframe_ids)

    def reset(self) -> None:
        pass
