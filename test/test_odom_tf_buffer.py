"""OdomTfBuffer: the odom -> base_link history used for map -> odom under external odometry."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from spark3r.geometry import make_transform
from spark3r_ros.odom_tf_buffer import OdomTfBuffer

S = 1_000_000_000


def pose(yaw_deg, x):
    return make_transform(Rotation.from_euler("z", yaw_deg, degrees=True).as_matrix(), [x, 0.0, 0.0])


def test_exact_and_interpolated_lookups_and_no_extrapolation():
    buf = OdomTfBuffer("odom", "base_link")
    buf.add(10 * S, pose(0, 0.0))
    buf.add(11 * S, pose(90, 2.0))
    np.testing.assert_allclose(buf.lookup(10 * S), pose(0, 0.0))
    np.testing.assert_allclose(buf.lookup(10 * S + S // 2), pose(45, 1.0), atol=1e-12)
    np.testing.assert_allclose(buf.lookup(10 * S + S // 4), pose(22.5, 0.5), atol=1e-12)
    assert buf.lookup(9 * S) is None and buf.lookup(12 * S) is None


def test_gaps_age_and_time_jumps():
    buf = OdomTfBuffer("odom", "base_link", duration_ns=5 * S, max_gap_ns=S)
    buf.add(0, pose(0, 0.0))
    buf.add(3 * S, pose(0, 3.0))
    assert buf.lookup(S) is None  # a 3 s gap is not interpolated
    for t in range(4, 12):
        buf.add(t * S, pose(0, float(t)))
    assert len(buf) == 6 and buf.lookup(5 * S) is None  # older than the 5 s horizon
    buf.add(S, pose(0, 1.0))  # far in the past: the clock jumped back (bag loop)
    assert len(buf) == 1


def test_messages_are_filtered_by_frame_and_leading_slashes_ignored():
    pytest.importorskip("tf2_msgs")
    from tf2_msgs.msg import TFMessage

    from spark3r_ros.conversions import matrix_to_transform

    buf = OdomTfBuffer("/odom", "base_link")
    msg = TFMessage(transforms=[matrix_to_transform(pose(10, 1.0), 5 * S, "odom", "base_link"),
                                matrix_to_transform(pose(0, 0.0), 5 * S, "map", "odom"),
                                matrix_to_transform(pose(0, 0.0), 6 * S, "/odom", "/base_link")])
    assert buf.add_message(msg) == 2
    np.testing.assert_allclose(buf.lookup(5 * S), pose(10, 1.0), atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        OdomTfBuffer("odom", "base_link", duration_ns=0)
