"""Real two-process DDS round trip over the loopback-only shared-memory profile.

A separate publisher process (test/ros_test_publisher.py, started with ``python -m``) sends a
640x480 rgb8 stream at 30 Hz, a 200k-point cloud and a /tf_static tree; this process receives
them with the project's QoS choices (SensorDataQoS for images, a late-joining transient-local
/tf_static subscription) and decodes them through spark3r_ros.conversions.
"""
import time

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not installed")
pytest.importorskip("tf2_msgs.msg", reason="tf2_msgs is not built (run tools/setup_env.sh)")

import ros_test_publisher as pub  # noqa: E402
from ros_helpers import ros_process, spin_until, wait_for_publishers  # noqa: E402

pytestmark = pytest.mark.ros

FRAMES, RATE, WIDTH, HEIGHT, POINTS = 60, 30.0, 640, 480, 200_000


@pytest.fixture(scope="module")
def received(ros_context):
    """Run the publisher once; collect everything this process received."""
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image, PointCloud2
    from std_msgs.msg import UInt32

    from spark3r_ros.static_tf import StaticTransformCache, subscribe_static_tf

    node = Node("spark3r_roundtrip_test", context=ros_context)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    images, clouds, done = [], [], []
    image_sub = node.create_subscription(Image, pub.IMAGE_TOPIC, images.append, qos_profile_sensor_data)
    node.create_subscription(PointCloud2, pub.CLOUD_TOPIC, clouds.append, latched)
    node.create_subscription(UInt32, pub.DONE_TOPIC, done.append, latched)
    tf_cache = StaticTransformCache()
    try:
        with ros_process("ros_test_publisher", "--frames", FRAMES, "--rate", RATE, "--width", WIDTH,
                         "--height", HEIGHT, "--points", POINTS) as proc:
            wait_for_publishers(image_sub, 1, timeout=30.0, process=proc)
            # The publisher sent /tf_static before it created the image publisher we just
            # matched, so this subscription joins late and relies on transient-local delivery.
            subscribe_static_tf(node, tf_cache)
            finished = spin_until(node, lambda: bool(done) and bool(clouds) and len(tf_cache) >= 2,
                                  timeout=FRAMES / RATE + 30.0, process=proc)
            # Frames still in flight when "done" arrived: drain briefly.
            drain_until = time.monotonic() + 0.5
            spin_until(node, lambda: len(images) >= FRAMES or time.monotonic() > drain_until, timeout=2.0)
            log = proc.log_text()
        # Leaving the block sent SIGINT; the publisher must shut down cleanly on it (exit 0).
        yield {"images": images, "clouds": clouds, "done": done, "tf_cache": tf_cache,
               "finished": finished, "log": log, "returncode": proc.popen.returncode}
    finally:
        node.destroy_node()


def test_publisher_finished(received):
    assert received["finished"], f"publisher did not finish in time; its output:\n{received['log']}"
    assert received["done"][0].data == FRAMES
    assert received["returncode"] == 0, f"publisher did not stop cleanly on SIGINT:\n{received['log']}"


def test_image_stream_at_30hz_reaches_sensor_data_subscriber(received):
    from spark3r_ros.conversions import image_to_numpy, image_to_rgb, time_to_ns

    by_index = {}
    for msg in received["images"]:
        index = pub.frame_index(time_to_ns(msg.header.stamp))
        assert 0 <= index < FRAMES
        assert msg.header.frame_id == pub.CAMERA_FRAME
        assert (msg.height, msg.width, msg.encoding) == (HEIGHT, WIDTH, "rgb8")
        by_index[index] = msg
    print(f"{len(by_index)}/{FRAMES} frames arrived")
    assert len(by_index) >= 0.9 * FRAMES, f"only {len(by_index)}/{FRAMES} frames arrived"
    for index, msg in by_index.items():
        expected = pub.make_test_image(index, HEIGHT, WIDTH)
        np.testing.assert_array_equal(image_to_numpy(msg), expected, err_msg=f"frame {index} differs")
    # The mapper path (image_to_rgb) sees the same pixels.
    first = min(by_index)
    np.testing.assert_array_equal(image_to_rgb(by_index[first]), pub.make_test_image(first, HEIGHT, WIDTH))


def test_large_point_cloud_round_trip(received):
    from spark3r_ros.conversions import msg_to_cloud, time_to_ns

    assert received["clouds"], "no PointCloud2 arrived"
    msg = received["clouds"][-1]
    xyz, rgb = pub.make_test_cloud(POINTS)
    finite = np.isfinite(xyz).all(axis=1)
    assert 0 < (~finite).sum() < POINTS  # the test data really contains dropped points
    assert msg.width == finite.sum() and msg.is_dense and msg.header.frame_id == "map"
    assert time_to_ns(msg.header.stamp) == pub.BASE_STAMP_NS
    out_xyz, out_rgb = msg_to_cloud(msg)
    np.testing.assert_array_equal(out_xyz, xyz[finite])
    np.testing.assert_array_equal(out_rgb, rgb[finite])


def test_tf_static_reaches_late_joiner_and_chains(received):
    from spark3r.geometry import invert_rigid

    cache = received["tf_cache"]
    (p0, c0, T0), (p1, c1, T1) = pub.static_transforms()
    assert cache.parent_of(c0) == p0 and cache.parent_of(c1) == p1
    np.testing.assert_allclose(cache.lookup("base_link", pub.CAMERA_FRAME), T0 @ T1, atol=1e-12)
    np.testing.assert_allclose(cache.lookup(pub.CAMERA_FRAME, "base_link"), invert_rigid(T0 @ T1), atol=1e-12)
