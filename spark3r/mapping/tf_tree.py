"""Static transforms as a tree, with chained lookups (the maths of ``/tf_static``).

``lookup(target, source)`` returns ``T_target_source`` (tf2's convention: maps points expressed
in ``source`` into ``target``, i.e. the pose of ``source`` in ``target``). Every frame has at
most one parent; a newer transform for the same child replaces the older one. A leading ``/``
in a frame id is ignored, as tf2 does. The ROS node feeds it from ``/tf_static`` messages
(``spark3r_ros.static_tf``), the offline reader from a bag's ``/tf_static``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from spark3r.geometry import invert_rigid


def frame_id(name: str) -> str:
    """A frame id as tf2 compares it (a ROS 1 habit: drivers and URDFs still write ``/frame``)."""
    return name[1:] if name.startswith("/") else name


class TransformTree:
    """Static transforms by child frame (see module docstring)."""

    def __init__(self) -> None:
        self._edges: dict[str, tuple[str, np.ndarray]] = {}  # child -> (parent, T_parent_child)

    def set(self, parent: str, child: str, T_parent_child) -> None:
        parent, child = frame_id(parent), frame_id(child)
        if not parent or not child or parent == child:
            raise ValueError(f"invalid static transform {parent!r} -> {child!r}: frame ids must be non-empty and differ")
        T = np.asarray(T_parent_child, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"static transform {parent!r} -> {child!r} must be a finite 4x4 matrix")
        self._edges[child] = (parent, T)

    def clear(self) -> None:
        self._edges.clear()

    def frames(self) -> set[str]:
        return set(self._edges) | {parent for parent, _ in self._edges.values()}

    def parent_of(self, frame: str) -> Optional[str]:
        edge = self._edges.get(frame_id(frame))
        return edge[0] if edge else None

    def __contains__(self, frame: str) -> bool:
        return frame_id(frame) in self.frames()

    def __len__(self) -> int:
        return len(self._edges)

    def chain_to_root(self, frame: str) -> list[tuple[str, np.ndarray]]:
        """``[(frame, I), (parent, T_parent_frame), (grandparent, T_grand_frame), ...]``; the
        last entry is the root and the pose of ``frame`` in it."""
        frame = frame_id(frame)
        chain = [(frame, np.eye(4))]
        seen = {frame}
        T_ancestor_frame = np.eye(4)
        while frame in self._edges:
            parent, T_parent_child = self._edges[frame]
            if parent in seen:
                raise ValueError(f"static transforms contain a cycle through frame {parent!r}")
            T_ancestor_frame = T_parent_child @ T_ancestor_frame
            chain.append((parent, T_ancestor_frame))
            seen.add(parent)
            frame = parent
        return chain

    def root_of(self, frame: str) -> Optional[tuple[str, np.ndarray]]:
        """``(root frame, pose of frame in root)``, or None when ``frame`` has no parent."""
        chain = self.chain_to_root(frame)
        return chain[-1] if len(chain) > 1 else None

    def lookup(self, target: str, source: str) -> Optional[np.ndarray]:
        """``T_target_source`` (4x4 float64) or None when the frames are not connected."""
        target, source = frame_id(target), frame_id(source)
        if target == source:
            return np.eye(4) if target in self.frames() else None
        target_chain = dict(self.chain_to_root(target))
        for ancestor, T_ancestor_source in self.chain_to_root(source):
            if ancestor in target_chain:
                return invert_rigid(target_chain[ancestor]) @ T_ancestor_source
        return None

    def can_transform(self, target: str, source: str) -> bool:
        return self.lookup(target, source) is not None
