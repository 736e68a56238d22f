"""``/tf_static`` for the mapping node: messages in, chained lookups out.

tf2_ros is not available in every environment the project runs in, and the mapping node only
needs static extrinsics (e.g. ``base_link -> camera_optical_frame``). The tree maths (chains up
and down, tf2's ``T_target_source`` convention, cycles, leading ``/``) is
:class:`spark3r.mapping.tf_tree.TransformTree`, which the offline bag reader uses too; this
module only feeds it ``TFMessage``/``TransformStamped`` messages.
"""
from __future__ import annotations

from typing import Iterable

from spark3r.mapping.tf_tree import TransformTree
from spark3r_ros.conversions import transform_to_matrix

TF_STATIC_TOPIC = "/tf_static"


class StaticTransformCache(TransformTree):
    """A :class:`TransformTree` fed with ROS messages."""

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
            self.set(tf.header.frame_id, tf.child_frame_id, transform_to_matrix(tf))
            count += 1
        return count


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
