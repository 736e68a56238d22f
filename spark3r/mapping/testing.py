"""Test doubles for the mapper. Nothing here is a real model.

:class:`GroundTruthBackbone` is a **test double**: it answers a window with the synthetic
sequence's ground truth for the keyframes' stamps, expressed in a fresh random similarity frame
per window (like a feed-forward model, whose world is its first view and whose unit is arbitrary),
optionally perturbed. It lets the mapper's stitching be checked against exact geometry.
"""
from __future__ import annotations

from typing import Optional, Sequence

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


def _rotation_about_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class DriftingBackbone(GroundTruthBackbone):
    """Test double with the systematic errors of a real feed-forward model, so that stitching
    windows drifts the way it does with real weights (nothing here is a real model).

    Per window, before the random similarity frame of :class:`GroundTruthBackbone`:

    * translation-scale bias: frame ``k`` of the window comes out ``(1 + scale_bias) ** k``
      times too large (its camera centre's offset from the window's first camera and its depth),
      so the scale a window hands to the next creeps and the map's unit drifts window by window;
    * rotation bias: frame ``k`` of the window is turned by ``k * rotation_bias_deg`` about the
      world's vertical through the first camera (heading creeps);
    * depth noise: multiplicative, ``depth_noise`` relative standard deviation.

    ``descriptors``: each frame gets :func:`~spark3r.mapping.place_recognition.place_descriptor`
    of its image's colour patches (what the real backbone derives from its tokens).
    ``descriptor_source``: optional ``{frame index: other frame index}`` — the frame *looks
    like* the other one (a scene with repeated structure: place recognition is fooled, the
    geometry is not).
    """

    def __init__(self, sequence, seed: int = 0, scale_bias: float = 0.005, rotation_bias_deg: float = 0.4,
                 depth_noise: float = 0.005, descriptors: bool = True, descriptor_source: Optional[dict] = None,
                 scale_range=(0.5, 2.0)):
        super().__init__(sequence, seed=seed, scale_range=scale_range)
        self.scale_bias = float(scale_bias)
        self.rotation_bias_deg = float(rotation_bias_deg)
        self.drift_depth_noise = float(depth_noise)
        self.with_descriptors = bool(descriptors)
        self.descriptor_source = dict(descriptor_source or {})
        self._descriptor_cache: dict[int, np.ndarray] = {}

    def descriptor(self, index: int) -> np.ndarray:
        from .place_recognition import image_tokens, place_descriptor

        source = self.descriptor_source.get(index, index)
        if source not in self._descriptor_cache:
            self._descriptor_cache[source] = place_descriptor(image_tokens(np.asarray(self.seq.images)[source]))
        return self._descriptor_cache[source]

    def predict(self, window: Sequence[Keyframe]) -> Prediction:
        try:
            idx = [self.frame_of_stamp[int(kf.stamp_ns)] for kf in window]
        except KeyError as exc:
            raise ValueError(f"DriftingBackbone: stamp {exc.args[0]} is not a frame of the sequence") from None
        gt = np.asarray(self.seq.c2w)[idx].copy()
        origin = gt[0, :3, 3].copy()
        creep = (1.0 + self.scale_bias) ** np.arange(len(idx))
        for k, pose in enumerate(gt):
            Rz = _rotation_about_z(np.radians(self.rotation_bias_deg) * k)
            centre = origin + creep[k] * (pose[:3, 3] - origin)
            pose[:3, 3] = origin + Rz @ (centre - origin)
            pose[:3, :3] = Rz @ pose[:3, :3]
        to_window = random_similarity(self.rng, self.scale_range)
        c2w = to_window.apply_to_poses(gt)
        depth = np.asarray(self.seq.depth)[idx].astype(np.float64) * (to_window.scale * creep)[:, None, None]
        if self.drift_depth_noise > 0:
            depth = depth * (1.0 + self.drift_depth_noise * self.rng.normal(size=depth.shape))
        conf = (1.0 + 4.0 * self.rng.random(depth.shape)).astype(np.float32)
        H, W = np.asarray(self.seq.images).shape[1:3]
        K = np.repeat(np.asarray(self.seq.K, dtype=np.float64)[None], len(idx), axis=0)
        descriptors = np.stack([self.descriptor(i) for i in idx]) if self.with_descriptors else None
        self.window_frames.append(idx)
        self.window_transforms.append(to_window)
        return Prediction(c2w=c2w, K=K, depth=depth.astype(np.float32), conf=conf, depth_box=(0.0, 0.0, float(W), float(H)),
                          descriptors=descriptors)


def loop_sequence(num_frames: int = 80, frames_per_lap: float = 60.37, height: int = 48, width: int = 64, seed: int = 0,
                  radius: float = 1.8, fps: float = 10.0, laps_offset: float = 0.0):
    """A synthetic sequence on a closed loop: an orbit around the room's centre whose view is a
    function of the orbit angle only, so after ``frames_per_lap`` frames the camera is back at
    its start (a fractional period: revisits fall between the first lap's frames, as in real
    life). ``laps_offset``: start this fraction of a lap later. Same conventions as
    :func:`spark3r.data.synthetic.render_sequence` (whose scene it renders)."""
    from spark3r.data.synthetic import (SyntheticSequence, base_to_camera_transform, frame_stamps_ns, intrinsics_from_fov,
                                        look_at, render_view, ROOM_MAX, ROOM_MIN)
    from spark3r.geometry import invert_rigid

    K = intrinsics_from_fov(height, width, 70.0)
    poses = []
    for k in range(num_frames):
        a = 2 * np.pi * (k / frames_per_lap + laps_offset)
        eye = np.array([radius * np.cos(a), radius * np.sin(a), 1.5 + 0.08 * np.sin(2 * a)])
        target = np.array([0.3 * np.cos(a + 0.6), 0.3 * np.sin(a + 0.6), 0.8])
        poses.append(look_at(eye, target))
    c2w = np.stack(poses)
    images = np.empty((num_frames, height, width, 3), np.uint8)
    depth = np.empty((num_frames, height, width), np.float32)
    for k in range(num_frames):
        images[k], depth[k] = render_view(c2w[k], K, height, width, seed=seed)
    b2c = base_to_camera_transform()
    return SyntheticSequence(images=images, depth=depth, K=K, c2w=c2w, stamps_ns=frame_stamps_ns(num_frames, fps),
                             scene_extent=float(np.linalg.norm(ROOM_MAX - ROOM_MIN)),
                             scene_bounds=np.stack([ROOM_MIN, ROOM_MAX]).astype(np.float64), base_to_camera=b2c,
                             base_c2w=c2w @ invert_rigid(b2c), fps=float(fps), trajectory="loop", seed=int(seed))
