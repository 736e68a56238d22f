"""The keyframe store: what the back end keeps of every mapped keyframe.

Each keyframe owns its geometry in its own camera frame ("local" coordinates, in the unit the map
had when it was first mapped) and a Sim(3) pose ``local -> map`` that the pose graph may change at
any time; the voxel map is only a cache of ``pose.apply(points)`` over the store.

Per keyframe: id, stamp, segment (graph component, see :mod:`.pose_graph`), intrinsics of its
points, the image (to re-run the backbone for loop verification), a subsample of confident
points (``xyz`` local, ``rgb``), a place descriptor, its current pose and its odometry pose
(the pose the front end gave it, never optimised: ``map -> odom`` is their difference).

Memory: poses, descriptors and small per-keyframe numbers stay in memory (a few hundred bytes
plus the descriptor); the heavy payload (image + points) of all but the newest
``keep_in_memory`` keyframes is spilled to a temporary directory and read back on demand.
Not thread-safe: the Mapper's worker lock serialises access.
"""
from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .alignment import Sim3
from .frames import Keyframe


@dataclass
class KeyframePayload:
    """The heavy part of a stored keyframe (may live on disk)."""

    image: np.ndarray        # uint8 [H, W, 3], as given to the backbone
    xyz: np.ndarray          # float32 [n, 3] confident points in the keyframe's camera frame (local units)
    rgb: np.ndarray          # uint8 [n, 3]


@dataclass
class StoredKeyframe:
    id: int
    stamp_ns: int
    segment: int
    window_index: int
    K: np.ndarray                      # float64 [3, 3] intrinsics of its points (image pixels)
    camera_info_K: Optional[np.ndarray]  # the frame's own K (None if it had none), for re-running the backbone
    pose: Sim3                         # local -> map (current estimate)
    odom_pose: Sim3                    # local -> odom (front-end estimate, never optimised)
    descriptor: Optional[np.ndarray]   # float32 [D], unit length, or None
    median_depth: float                # local units
    radius: float                      # largest norm of its local points (bounds how far a pose change moves them)
    cached_pose: Optional[Sim3] = None  # pose its points currently have in the map cache

    @property
    def camera_to_map(self) -> np.ndarray:
        """Rigid 4x4 camera pose in the map (the Sim(3) scale only scales the local points)."""
        T = np.eye(4)
        T[:3, :3] = self.pose.R
        T[:3, 3] = self.pose.t
        return T

    @property
    def camera_to_odom(self) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = self.odom_pose.R
        T[:3, 3] = self.odom_pose.t
        return T


def sim3_displacement_bound(a: Sim3, b: Sim3, radius: float) -> float:
    """Upper bound of ``|a(x) - b(x)|`` over local points with ``|x| <= radius``."""
    return float(np.linalg.norm(a.t - b.t) + np.linalg.norm(a.scale * a.R - b.scale * b.R) * radius)


class KeyframeStore:
    def __init__(self, keep_in_memory: int = 0):
        if keep_in_memory < 0:
            raise ValueError(f"keep_in_memory must be >= 0 (0 = never spill), got {keep_in_memory}")
        self.keep_in_memory = int(keep_in_memory)
        self._frames: "OrderedDict[int, StoredKeyframe]" = OrderedDict()
        self._payloads: "OrderedDict[int, KeyframePayload]" = OrderedDict()   # in memory, oldest first
        self._spill_dir: Optional[Path] = None
        self._spilled: set[int] = set()
        self._order: dict[int, int] = {}       # id -> insertion index (for keyframe gaps)
        self._ids: list[int] = []              # insertion index -> id
        self._next_index = 0
        # Descriptor matrix for place recognition, grown by doubling.
        self._desc = np.zeros((0, 0), np.float32)
        self._desc_ids = np.zeros(0, np.int64)
        self._desc_index = np.zeros(0, np.int64)     # insertion index per row
        self._desc_segment = np.zeros(0, np.int64)   # segment per row
        self._desc_count = 0

    # ------------------------------------------------------------------ contents

    def __len__(self) -> int:
        return len(self._frames)

    def __contains__(self, keyframe_id: int) -> bool:
        return keyframe_id in self._frames

    def __getitem__(self, keyframe_id: int) -> StoredKeyframe:
        return self._frames[keyframe_id]

    def ids(self) -> list[int]:
        return list(self._frames)

    def values(self) -> Iterable[StoredKeyframe]:
        return self._frames.values()

    def index_of(self, keyframe_id: int) -> int:
        """Insertion order of a keyframe (keyframe gaps are counted in it)."""
        return self._order[keyframe_id]

    def id_at(self, index: int) -> Optional[int]:
        """The keyframe inserted ``index``-th, or None outside the store."""
        return self._ids[index] if 0 <= index < len(self._ids) else None

    @property
    def spilled(self) -> int:
        return len(self._spilled)

    def add(self, frame: StoredKeyframe, payload: KeyframePayload) -> None:
        if frame.id in self._frames:
            raise ValueError(f"keyframe {frame.id} is already in the store")
        self._frames[frame.id] = frame
        self._order[frame.id] = self._next_index
        self._ids.append(frame.id)
        self._next_index += 1
        self._payloads[frame.id] = payload
        if frame.descriptor is not None:
            self._add_descriptor(frame.id, frame.descriptor, self._next_index - 1, frame.segment)
        self._spill_beyond_capacity()

    def payload(self, keyframe_id: int) -> KeyframePayload:
        if keyframe_id in self._payloads:
            return self._payloads[keyframe_id]
        if keyframe_id not in self._spilled:
            raise KeyError(f"keyframe {keyframe_id} is not in the store")
        with np.load(self._spill_path(keyframe_id)) as z:
            return KeyframePayload(z["image"], z["xyz"], z["rgb"])

    def keyframe(self, keyframe_id: int) -> Keyframe:
        """The keyframe as the backbone wants it (to re-run it on a verification window)."""
        f = self._frames[keyframe_id]
        return Keyframe(f.id, f.stamp_ns, self.payload(keyframe_id).image, f.camera_info_K)

    def map_points(self, keyframe_id: int, pose: Optional[Sim3] = None) -> tuple[np.ndarray, np.ndarray]:
        """The keyframe's points in the map at ``pose`` (default: its current pose)."""
        f = self._frames[keyframe_id]
        p = self.payload(keyframe_id)
        return (pose or f.pose).apply(p.xyz.astype(np.float64)), p.rgb

    def clear(self) -> None:
        self._frames.clear()
        self._payloads.clear()
        self._order.clear()
        self._ids.clear()
        self._spilled.clear()
        self._next_index = 0
        self._desc = np.zeros((0, 0), np.float32)
        self._desc_ids = np.zeros(0, np.int64)
        self._desc_index = np.zeros(0, np.int64)
        self._desc_segment = np.zeros(0, np.int64)
        self._desc_count = 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def close(self) -> None:
        self.clear()

    def __del__(self):  # the spill directory is a temporary; never leave it behind
        try:
            if self._spill_dir is not None:
                shutil.rmtree(self._spill_dir, ignore_errors=True)
        except Exception:
            pass

    # ------------------------------------------------------------------ descriptors

    def _add_descriptor(self, keyframe_id: int, descriptor: np.ndarray, index: int, segment: int) -> None:
        d = np.asarray(descriptor, np.float32).reshape(-1)
        if self._desc_count and d.shape[0] != self._desc.shape[1]:
            raise ValueError(f"descriptor of keyframe {keyframe_id} has {d.shape[0]} dimensions, the store holds {self._desc.shape[1]}")
        if self._desc_count == len(self._desc):
            grown = np.zeros((max(16, 2 * len(self._desc)), d.shape[0]), np.float32)
            if self._desc_count:
                grown[: self._desc_count] = self._desc[: self._desc_count]
            def grow(a):
                out = np.zeros(len(grown), np.int64)
                out[: self._desc_count] = a[: self._desc_count]
                return out

            self._desc = grown
            self._desc_ids, self._desc_index, self._desc_segment = grow(self._desc_ids), grow(self._desc_index), grow(self._desc_segment)
        self._desc[self._desc_count] = d
        self._desc_ids[self._desc_count] = keyframe_id
        self._desc_index[self._desc_count] = index
        self._desc_segment[self._desc_count] = segment
        self._desc_count += 1

    @property
    def descriptor_dim(self) -> Optional[int]:
        """Dimension of the stored descriptors (None while there is none)."""
        return int(self._desc.shape[1]) if self._desc_count else None

    def descriptors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids ``[M]``, descriptors ``[M, D]``) of every keyframe that has one, oldest first
        (views, not copies)."""
        return self._desc_ids[: self._desc_count], self._desc[: self._desc_count]

    def descriptor_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row of :meth:`descriptors`: insertion index and segment (at insertion; merges
        are the graph's business)."""
        return self._desc_index[: self._desc_count], self._desc_segment[: self._desc_count]

    # ------------------------------------------------------------------ spilling

    def _spill_path(self, keyframe_id: int) -> Path:
        return self._spill_dir / f"{keyframe_id}.npz"

    def _spill_beyond_capacity(self) -> None:
        if self.keep_in_memory <= 0:
            return
        while len(self._payloads) > self.keep_in_memory:
            kid, payload = self._payloads.popitem(last=False)
            if self._spill_dir is None:
                self._spill_dir = Path(tempfile.mkdtemp(prefix="spark3r-keyframes-"))
            np.savez(self._spill_path(kid), image=payload.image, xyz=payload.xyz, rgb=payload.rgb)
            self._spilled.add(kid)
