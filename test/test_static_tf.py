"""spark3r_ros.static_tf: chained lookups through a tree of static transforms."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pytest.importorskip("rclpy", reason="ROS 2 message packages are not installed")
tf2_msgs = pytest.importorskip("tf2_msgs.msg", reason="tf2_msgs is not built (run tools/setup_env.sh)")

from spark3r.geometry import invert_rigid, make_transform  # noqa: E402
from spark3r_ros.conversions import matrix_to_transform  # noqa: E402
from spark3r_ros.static_tf import StaticTransformCache  # noqa: E402


def rigid(seed, t):
    return make_transform(Rotation.random(random_state=seed).as_matrix(), t)


@pytest.fixture
def tree():
    """base_link -> camera_link -> camera_optical_frame, base_link -> lidar, plus a detached pair."""
    T = {
        ("base_link", "camera_link"): rigid(1, [0.2, 0.0, 0.5]),
        ("camera_link", "camera_optical_frame"): make_transform(
            [[0, 0, 1], [-1, 0, 0], [0, -1, 0]], [0, 0, 0]),  # REP-103 body -> optical axes
        ("base_link", "lidar"): rigid(2, [0.0, 0.1, 0.8]),
        ("world", "marker"): rigid(3, [5, 5, 0]),
    }
    cache = StaticTransformCache()
    msg = tf2_msgs.TFMessage(transforms=[matrix_to_transform(m, 0, p, c) for (p, c), m in T.items()])
    assert cache.add(msg) == 4
    return cache, T


def test_direct_and_inverse_lookup(tree):
    cache, T = tree
    np.testing.assert_allclose(cache.lookup("base_link", "camera_link"), T[("base_link", "camera_link")], atol=1e-12)
    np.testing.assert_allclose(cache.lookup("camera_link", "base_link"),
                               invert_rigid(T[("base_link", "camera_link")]), atol=1e-12)


def test_chained_lookup_down_and_up_the_tree(tree):
    cache, T = tree
    T_base_opt = T[("base_link", "camera_link")] @ T[("camera_link", "camera_optical_frame")]
    np.testing.assert_allclose(cache.lookup("base_link", "camera_optical_frame"), T_base_opt, atol=1e-12)
    np.testing.assert_allclose(cache.lookup("camera_optical_frame", "base_link"), invert_rigid(T_base_opt), atol=1e-12)
    # Across branches: lidar -> optical goes up to base_link and down again.
    T_lidar_opt = invert_rigid(T[("base_link", "lidar")]) @ T_base_opt
    np.testing.assert_allclose(cache.lookup("lidar", "camera_optical_frame"), T_lidar_opt, atol=1e-12)
    # Semantics check with a point: p_base = T_base_opt @ p_opt (optical z forward = body x forward).
    p_opt = np.array([0.0, 0.0, 2.0, 1.0])
    p_cam = cache.lookup("camera_link", "camera_optical_frame") @ p_opt
    np.testing.assert_allclose(p_cam, [2.0, 0.0, 0.0, 1.0], atol=1e-12)


def test_unconnected_and_unknown_frames(tree):
    cache, _ = tree
    assert cache.lookup("base_link", "marker") is None
    assert cache.lookup("base_link", "nowhere") is None
    assert not cache.can_transform("marker", "lidar")
    assert cache.can_transform("marker", "world")
    np.testing.assert_array_equal(cache.lookup("lidar", "lidar"), np.eye(4))
    assert cache.lookup("nowhere", "nowhere") is None
    assert cache.frames() == {"base_link", "camera_link", "camera_optical_frame", "lidar", "world", "marker"}
    assert cache.parent_of("camera_optical_frame") == "camera_link"
    assert cache.parent_of("base_link") is None


def test_updates_replace_and_leading_slash(tree):
    cache, T = tree
    new = rigid(9, [1, 2, 3])
    cache.add(matrix_to_transform(new, 5, "/base_link", "/lidar"))
    assert len(cache) == 4
    np.testing.assert_allclose(cache.lookup("base_link", "lidar"), new, atol=1e-12)
    np.testing.assert_allclose(cache.lookup("/base_link", "lidar"), new, atol=1e-12)


def test_cycle_and_invalid_frames_are_reported():
    cache = StaticTransformCache()
    cache.add([matrix_to_transform(np.eye(4), 0, "a", "b"), matrix_to_transform(np.eye(4), 0, "b", "a")])
    with pytest.raises(ValueError, match="cycle"):
        cache.lookup("a", "c")
    bad = matrix_to_transform(np.eye(4), 0, "a", "b")
    bad.child_frame_id = ""
    with pytest.raises(ValueError, match="non-empty"):
        cache.add(bad)
