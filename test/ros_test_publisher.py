"""Publisher side of the two-process DDS round trip (run as ``python -m ros_test_publisher``).

Publishes, in this order:
1. ``/tf_static``: a small transform tree (transient-local), before anything else, so that the
   test's /tf_static subscription is a genuine late joiner;
2. the cloud topic: one deterministic ``PointCloud2`` (reliable, transient-local, like a map);
3. the image topic: ``--frames`` rgb8 images at ``--rate`` Hz once a subscriber has matched;
4. the done topic: the number of frames sent (reliable, transient-local),
then idles until SIGINT. The content generators are imported by the test to check every byte.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np

IMAGE_TOPIC = "/spark3r_test/image"
CLOUD_TOPIC = "/spark3r_test/cloud"
DONE_TOPIC = "/spark3r_test/done"
BASE_STAMP_NS = 1_700_000_000_000_000_123  # far beyond float64 nanosecond precision
FRAME_PERIOD_NS = 33_333_333
CAMERA_FRAME = "camera_optical_frame"


def frame_stamp_ns(index: int) -> int:
    return BASE_STAMP_NS + index * FRAME_PERIOD_NS


def frame_index(stamp_ns: int) -> int:
    index, remainder = divmod(stamp_ns - BASE_STAMP_NS, FRAME_PERIOD_NS)
    if remainder:
        raise ValueError(f"stamp {stamp_ns} is not a test frame stamp")
    return index


@functools.lru_cache(maxsize=4)
def _base_image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def make_test_image(index: int, height: int, width: int) -> np.ndarray:
    """Frame ``index``: a fixed random image shifted by ``index`` columns and xor-ed with it."""
    return np.roll(_base_image(height, width), index, axis=1) ^ np.uint8(index & 0xFF)


def make_test_cloud(points: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic cloud with a few non-finite points (which the writer must drop)."""
    rng = np.random.default_rng(99)
    xyz = rng.normal(scale=5.0, size=(points, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(points, 3), dtype=np.uint8)
    xyz[:: max(points // 7, 1), 1] = np.nan
    return xyz, rgb


def static_transforms() -> list[tuple[str, str, np.ndarray]]:
    """``(parent, child, T_parent_child)`` of the published static tree."""
    from spark3r.geometry import make_transform

    body_to_optical = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    return [
        ("base_link", "camera_link", make_transform(np.eye(3), [0.1, 0.0, 0.4])),
        ("camera_link", CAMERA_FRAME, make_transform(body_to_optical, [0.0, 0.0, 0.0])),
    ]


def _publish_all(node, args) -> None:
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2
    from std_msgs.msg import UInt32
    from tf2_msgs.msg import TFMessage

    from spark3r_ros.conversions import cloud_to_msg, matrix_to_transform, numpy_to_image
    from spark3r_ros.static_tf import TF_STATIC_TOPIC, tf_static_qos

    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)

    tf_pub = node.create_publisher(TFMessage, TF_STATIC_TOPIC, tf_static_qos())
    tf_pub.publish(TFMessage(transforms=[
        matrix_to_transform(T, BASE_STAMP_NS, parent, child) for parent, child, T in static_transforms()
    ]))

    cloud_pub = node.create_publisher(PointCloud2, CLOUD_TOPIC, latched)
    xyz, rgb = make_test_cloud(args.points)
    cloud_pub.publish(cloud_to_msg(xyz, rgb, BASE_STAMP_NS, "map"))

    done_pub = node.create_publisher(UInt32, DONE_TOPIC, latched)
    image_pub = node.create_publisher(Image, IMAGE_TOPIC, 10)
    deadline = time.monotonic() + args.match_timeout
    while image_pub.get_subscription_count() < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"no subscriber matched {IMAGE_TOPIC} within {args.match_timeout} s")
        time.sleep(0.01)

    start = time.monotonic()
    for index in range(args.frames):
        image = make_test_image(index, args.height, args.width)
        image_pub.publish(numpy_to_image(image, "rgb8", frame_stamp_ns(index), CAMERA_FRAME))
        # Fixed schedule (not sleep-after-work) so the stream keeps its nominal rate.
        time.sleep(max(0.0, start + (index + 1) / args.rate - time.monotonic()))
    done_pub.publish(UInt32(data=args.frames))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--match-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)

    from spark3r_ros.dds_env import loopback_problems

    problems = loopback_problems()
    if problems:
        print("refusing to start without loopback-only DDS: " + "; ".join(problems), file=sys.stderr)
        return 2

    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init()
    node = rclpy.create_node("spark3r_test_publisher")
    try:
        _publish_all(node, args)
        print("published all", flush=True)
        rclpy.spin(node)  # keep transient-local data available until the test stops us
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
