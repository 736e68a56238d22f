"""A cache of ``/tf_static`` transforms that answers lookups through the frame tree.

tf2_ros is not available in every environment the project runs in, and the mapping node only
needs static extrinsics (e.g. ``base_link -> camera_optical_frame``), so this small cache does
the job: feed it ``TFMessage``/``TransformStamped`` messages from ``/tf_static`` and ask
``lookup(target, source)``, which chains transforms up and down the tree.

Semantics follow tf2: ``lookup(target, source)`` returns ``T_target_source``, the matrix that
maps points expressed in ``source`` into ``target`` (equivalently, the pose of ``source`` in
``target``). Every frame has at most one parent; a newer transform for the same child replaces
the older one.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from spark3r.geometry import invert_rigid
from spark3r_ros.conversions import transform_to_matrix

TF_STATIC_TOPIC = "/tf_static"


def _frame(name: str) -> str:
    # tf2 ignores a leading slash (a ROS 1 habit that still shows up in URDFs and drivers).
    return name[1:] if name.startswith("/") else name


class StaticTransformCache:
    """Static transforms by child frame, with chained lookups (see module docstring)."""

    def __init__(self) -> None:
        # child frame -> (parent frame, T_parent_child)
        self._edges: dict[str, tuple[str, np.ndarray]] = {}

    def add(self, message) -> int:
        """Add a ``TFMessage`` (its ``transforms``), one ``TransformStamped`` or an iterable of
        them; returns how many transforms were stored."""
        if hasattr(message, "transforms"):
            transforms: Iterable = message.transforms
        elif hasattr(message, "child_frame_id"):
            transforms = [message]
        else:
            transforms = message
        count = 0
        for tf in transforms:
            parent, child = _frame(tf.header.frame_id), _frame(tf.child_frame_id)
            if not parent or not child or parent == child:
                raise ValueError(f"invalid static transform {parent!r} -> {child!r}: frame ids must be non-empty and differ")
            self._edges[child] = (parent, transform_to_matrix(tf))
            count += 1
        return count

    def clear(self) -> None:
        self._edges.clear()

    def frames(self) -> set[str]:
        return set(self._edges) | {parent for parent, _ in self._edges.values()}

    def parent_of(self, frame: str) -> Optional[str]:
        edge = self._edges.get(_frame(frame))
        return edge[0] if edge else None

    def __contains__(self, frame: str) -> bool:
        return _frame(frame) in self.frames()

    def __len__(self) -> int:
        return len(self._edges)

    def _chain_to_root(self, frame: str) -> list[tuple[str, np.ndarray]]:
        """``[(frame, I), (parent, T_parent_frame), (grandparent, T_grand_frame), ...]``."""
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

    def lookup(self, target: str, source: str) -> Optional[np.ndarray]:
        """``T_target_source`` (4x4 float64) or None when the frames are not connected."""
        target, source = _frame(target), _frame(source)
        if target == source:
            return np.eye(4) if target in self.frames() else None
        source_chain = self._chain_to_root(source)
        target_chain = dict(self._chain_to_root(target))
        for ancestor, T_ancestor_source in source_chain:
            if ancestor in target_chain:
                return invert_rigid(target_chain[ancestor]) @ T_ancestor_source
        return None

    def can_transform(self, target: str, source: str) -> bool:
        return self.lookup(target, source) is not None


def tf_static_qos():
    """The QoS ``/tf_static`` uses: reliable, transient-local (late joiners get the latched
    transforms of every broadcaster), keep-last 100 like tf2's static listener."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        depth=100,
        history=HistoryPolicy.KEEP_LAST,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )


def subscribe_static_tf(node, cache: StaticTransformCache, topic: str = TF_STATIC_TOPIC):
    """Create a ``/tf_static`` subscription on ``node`` that feeds ``cache``; returns it."""
    from tf2_msgs.msg import TFMessage

    def on_message(msg) -> None:
        # One malformed transform from some broadcaster must not take the node down.
        for transform in msg.transforms:
            try:
                cache.add(transform)
            except ValueError as exc:
                node.get_logger().warning(f"ignoring static transform: {exc}")

    return node.create_subscription(TFMessage, topic, on_message, tf_static_qos())
