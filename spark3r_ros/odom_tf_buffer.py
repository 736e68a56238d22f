"""A short time-indexed buffer of one ``/tf`` edge (``odom -> base_link``), interpolated in time.

When another node (wheel odometry, an EKF) owns ``odom -> base_link``, the mapping node must
publish ``map -> odom = T_map_base(t) * T_odom_base(t)^-1`` with both poses at the same image
stamp ``t``. tf2_ros is not available everywhere this package runs, and only this single edge is
needed, so this buffer keeps its recent history and interpolates (linear translation, slerp
rotation) between the two samples around ``t``. It never extrapolates: a stamp outside the
buffered span (or in a gap longer than ``max_gap_ns``) has no answer.
"""
from __future__ import annotations

import bisect
import threading
from typing import Optional

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from spark3r.mapping.tf_tree import frame_id as _frame


class OdomTfBuffer:
    """History of ``T_parent_child`` for one parent/child pair, fed with ``TFMessage``s."""

    def __init__(self, parent: str, child: str, duration_ns: int = 30_000_000_000, max_gap_ns: int = 1_000_000_000):
        if duration_ns <= 0 or max_gap_ns <= 0:
            raise ValueError(f"duration_ns and max_gap_ns must be positive, got {duration_ns} and {max_gap_ns}")
        self.parent, self.child = _frame(parent), _frame(child)
        self.duration_ns = int(duration_ns)
        self.max_gap_ns = int(max_gap_ns)
        self._stamps: list[int] = []
        self._poses: list[np.ndarray] = []
        self._lock = threading.Lock()  # fed by the executor thread, read by the mapping worker

    def __len__(self) -> int:
        return len(self._stamps)

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()
            self._poses.clear()

    def add_message(self, message) -> int:
        """Store the matching transforms of a ``TFMessage``; returns how many were stored."""
        from spark3r_ros.conversions import time_to_ns, transform_to_matrix

        count = 0
        for tf in message.transforms:
            if _frame(tf.header.frame_id) == self.parent and _frame(tf.child_frame_id) == self.child:
                self.add(time_to_ns(tf.header.stamp), transform_to_matrix(tf))
                count += 1
        return count

    def add(self, stamp_ns: int, T_parent_child: np.ndarray) -> None:
        T = np.asarray(T_parent_child, dtype=np.float64)
        if T.shape != (4, 4):
            raise ValueError(f"transform must be 4x4, got {T.shape}")
        with self._lock:
            if self._stamps and stamp_ns < self._stamps[-1] - self.duration_ns:
                # Far in the past of what we hold: the clock jumped back (bag loop). Start over.
                self._stamps.clear()
                self._poses.clear()
            i = bisect.bisect_left(self._stamps, stamp_ns)
            if i < len(self._stamps) and self._stamps[i] == stamp_ns:
                self._poses[i] = T
            else:
                self._stamps.insert(i, int(stamp_ns))
                self._poses.insert(i, T)
            horizon = self._stamps[-1] - self.duration_ns
            drop = bisect.bisect_left(self._stamps, horizon)
            del self._stamps[:drop], self._poses[:drop]

    def lookup(self, stamp_ns: int) -> Optional[np.ndarray]:
        """``T_parent_child`` at ``stamp_ns`` or None when the buffer does not cover it."""
        with self._lock:
            i = bisect.bisect_left(self._stamps, stamp_ns)
            if i < len(self._stamps) and self._stamps[i] == stamp_ns:
                return self._poses[i].copy()
            if i == 0 or i == len(self._stamps):
                return None
            t0, t1 = self._stamps[i - 1], self._stamps[i]
            T0, T1 = self._poses[i - 1], self._poses[i]
        if t1 - t0 > self.max_gap_ns:
            return None
        a = (stamp_ns - t0) / (t1 - t0)
        rotation = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([T0[:3, :3], T1[:3, :3]])))([a]).as_matrix()[0]
        T = np.eye(4)
        T[:3, :3] = rotation
        T[:3, 3] = (1.0 - a) * T0[:3, 3] + a * T1[:3, 3]
        return T
