"""Bounded voxel-grid point map: one point per occupied voxel, the mean position and colour of
everything that fell into it.

Storage is a sorted int64 key array plus per-voxel sums, so an insert of M points costs
O((M + V) log) in numpy with no per-point Python. When more than ``max_points`` voxels are
occupied, the least recently updated ones are evicted (the map keeps the area the camera has
seen most recently). Thread-safe: every public method holds an internal lock, and readers get
copies.
"""
from __future__ import annotations

import threading

import numpy as np

_BITS = 21                     # bits per axis in the packed key
_OFFSET = 1 << (_BITS - 1)     # voxel indices in [-2^20, 2^20) per axis
_MASK = (1 << _BITS) - 1


class VoxelMap:
    def __init__(self, voxel_size: float, max_points: int):
        if not (np.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(f"voxel_size must be a finite number > 0, got {voxel_size!r}")
        if int(max_points) < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points!r}")
        self.voxel_size = float(voxel_size)
        self.max_points = int(max_points)
        self._lock = threading.Lock()
        self._clear()
        self.points_out_of_range = 0   # points dropped because their voxel index does not fit the key
        self.evicted = 0               # voxels evicted to respect max_points

    def _clear(self) -> None:
        self._keys = np.zeros(0, np.int64)
        self._xyz_sum = np.zeros((0, 3), np.float64)
        self._rgb_sum = np.zeros((0, 3), np.float64)
        self._count = np.zeros(0, np.int64)
        self._updated = np.zeros(0, np.int64)
        self._tick = 0

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def __len__(self) -> int:
        with self._lock:
            return int(len(self._keys))

    def _voxelise(self, xyz, rgb, caller: str):
        """Finite points ``xyz`` with float colours, their voxel indices and which indices the
        key packing can hold."""
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        rgb = np.asarray(rgb).reshape(-1, 3)
        if len(rgb) != len(xyz):
            raise ValueError(f"VoxelMap.{caller}: {len(xyz)} points but {len(rgb)} colours")
        finite = np.all(np.isfinite(xyz), axis=1)
        xyz, rgb = xyz[finite], rgb[finite].astype(np.float64)
        idx = np.floor(xyz / self.voxel_size).astype(np.int64)
        in_range = np.all((idx >= -_OFFSET) & (idx < _OFFSET), axis=1)
        return xyz, rgb, idx, in_range

    def insert(self, xyz: np.ndarray, rgb: np.ndarray) -> int:
        """Add points ``xyz [N, 3]`` (map units) with colours ``rgb [N, 3] uint8``; non-finite
        points are skipped. Returns the number of voxels after the insert."""
        xyz, rgb, idx, in_range = self._voxelise(xyz, rgb, "insert")
        with self._lock:
            self.points_out_of_range += int(np.count_nonzero(~in_range))
            if not np.any(in_range):
                return len(self._keys)
            xyz, rgb, idx = xyz[in_range], rgb[in_range], idx[in_range]
            keys = _pack(idx)
            new_keys, inverse = np.unique(keys, return_inverse=True)
            n = len(new_keys)
            xyz_sum = np.stack([np.bincount(inverse, weights=xyz[:, a], minlength=n) for a in range(3)], axis=1)
            rgb_sum = np.stack([np.bincount(inverse, weights=rgb[:, a], minlength=n) for a in range(3)], axis=1)
            count = np.bincount(inverse, minlength=n).astype(np.int64)
            self._tick += 1
            if len(self._keys):
                pos_c = np.minimum(np.searchsorted(self._keys, new_keys), len(self._keys) - 1)
                hit = self._keys[pos_c] == new_keys
            else:
                pos_c, hit = np.zeros(n, np.int64), np.zeros(n, bool)
            where = pos_c[hit]
            self._xyz_sum[where] += xyz_sum[hit]
            self._rgb_sum[where] += rgb_sum[hit]
            self._count[where] += count[hit]
            self._updated[where] = self._tick
            miss = ~hit
            if np.any(miss):
                keys_all = np.concatenate([self._keys, new_keys[miss]])
                order = np.argsort(keys_all, kind="stable")
                self._keys = keys_all[order]
                self._xyz_sum = np.concatenate([self._xyz_sum, xyz_sum[miss]])[order]
                self._rgb_sum = np.concatenate([self._rgb_sum, rgb_sum[miss]])[order]
                self._count = np.concatenate([self._count, count[miss]])[order]
                self._updated = np.concatenate([self._updated, np.full(int(miss.sum()), self._tick)])[order]
            self._evict_beyond_capacity()
            return len(self._keys)

    def remove(self, xyz: np.ndarray, rgb: np.ndarray) -> int:
        """Take back points added earlier by :meth:`insert` (the same ``xyz``/``rgb``), e.g. a
        keyframe's points at the pose it had before an optimisation moved it. Voxels left with
        no observation disappear; points whose voxel was evicted meanwhile are ignored. Returns
        the number of voxels after the removal."""
        xyz, rgb, idx, in_range = self._voxelise(xyz, rgb, "remove")
        with self._lock:
            if not np.any(in_range) or not len(self._keys):
                return len(self._keys)
            xyz, rgb = xyz[in_range], rgb[in_range]
            keys = _pack(idx[in_range])
            pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            hit = self._keys[pos] == keys
            pos, xyz, rgb = pos[hit], xyz[hit], rgb[hit]
            n = len(self._keys)
            for a in range(3):
                self._xyz_sum[:, a] -= np.bincount(pos, weights=xyz[:, a], minlength=n)
                self._rgb_sum[:, a] -= np.bincount(pos, weights=rgb[:, a], minlength=n)
            self._count -= np.bincount(pos, minlength=n)
            keep = self._count > 0
            if not np.all(keep):
                self._keys, self._xyz_sum, self._rgb_sum = self._keys[keep], self._xyz_sum[keep], self._rgb_sum[keep]
                self._count, self._updated = self._count[keep], self._updated[keep]
            return len(self._keys)

    def _evict_beyond_capacity(self) -> None:
        excess = len(self._keys) - self.max_points
        if excess <= 0:
            return
        # Oldest update first; among equals, fewer observations first.
        order = np.lexsort((self._count, self._updated))
        keep = np.ones(len(self._keys), bool)
        keep[order[:excess]] = False
        self._keys, self._xyz_sum, self._rgb_sum = self._keys[keep], self._xyz_sum[keep], self._rgb_sum[keep]
        self._count, self._updated = self._count[keep], self._updated[keep]
        self.evicted += excess

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """Copy of the map: ``xyz float32 [V, 3]`` (voxel means) and ``rgb uint8 [V, 3]``."""
        with self._lock:
            c = np.maximum(self._count, 1)[:, None]
            xyz = (self._xyz_sum / c).astype(np.float32)
            rgb = np.clip(np.round(self._rgb_sum / c), 0, 255).astype(np.uint8)
        return xyz, rgb


def _pack(idx: np.ndarray) -> np.ndarray:
    shifted = idx + _OFFSET
    return (shifted[:, 0] << (2 * _BITS)) | (shifted[:, 1] << _BITS) | shifted[:, 2]
