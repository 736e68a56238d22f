"""spark3r.mapping.outputs: one composer for the live node and the offline bag.

The composer's records (TF, Odometry with twist, Path, clouds) for a WindowResult are checked
directly; then the node's conversion (spark3r_ros.conversions -> rclpy messages) and the offline
writer (MapBagWriter -> mcap) are fed the same records and must carry identical messages.
"""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from spark3r.geometry import invert_rigid, make_transform
from spark3r.mapping import MappedKeyframe, WindowResult
from spark3r.mapping.config import OutputConfig
from spark3r.mapping.outputs import OutputComposer, body_twist
from spark3r.mapping.tf_tree import TransformTree

S = 1_000_000_000


def base_pose(t_s: float) -> np.ndarray:
    """A robot driving forward at 0.5 m/s while turning at 0.2 rad/s."""
    return make_transform(Rotation.from_rotvec([0, 0, 0.2 * t_s]).as_matrix(), [0.5 * t_s, 0.1 * t_s ** 2, 0.0])


def window(index: int, times_s, starts_map=False, points=5) -> WindowResult:
    keyframes = tuple(MappedKeyframe(id=int(t * 10), stamp_ns=int(round(t * S)), camera_to_map=base_pose(t),
                                     base_to_map=base_pose(t), K=np.eye(3), window_index=index) for t in times_s)
    rng = np.random.default_rng(index)
    return WindowResult(index, keyframes, rng.normal(size=(points, 3)).astype(np.float32),
                        rng.integers(0, 255, (points, 3), dtype=np.uint8), 1.0, 0.0, 1.0, 0, 0.1, starts_map)


def test_own_odometry_records_tf_twist_and_path():
    composer = OutputComposer(OutputConfig(transform_tolerance=0.25))
    first = composer.compose_window(window(0, [1.0, 1.5, 2.0], starts_map=True))
    second = composer.compose_window(window(1, [2.5, 3.0]))
    assert [k.odometry.stamp_ns for k in first.keyframes + second.keyframes] == [int(t * S) for t in (1, 1.5, 2, 2.5, 3)]
    for out in (first, second):
        for kf in out.keyframes:
            odom_base, map_odom = kf.transforms
            assert (odom_base.parent, odom_base.child, odom_base.stamp_ns) == ("odom", "base_link", kf.odometry.stamp_ns)
            np.testing.assert_array_equal(odom_base.T, kf.odometry.pose)
            assert (map_odom.parent, map_odom.child) == ("map", "odom")
            assert map_odom.stamp_ns == kf.odometry.stamp_ns + 250_000_000  # future-dated
            np.testing.assert_array_equal(map_odom.T, np.eye(4))
            assert (kf.odometry.frame_id, kf.odometry.child_frame_id) == ("odom", "base_link")
    # The first keyframe of a map has no velocity; the others the body-frame twist of the motion.
    np.testing.assert_array_equal(first.keyframes[0].odometry.linear, np.zeros(3))
    later = second.keyframes[0].odometry  # across the window boundary: 2.0 s -> 2.5 s
    linear, angular = body_twist(base_pose(2.0), base_pose(2.5), 0.5)
    np.testing.assert_allclose(later.linear, linear)
    np.testing.assert_allclose(later.angular, [0, 0, 0.2], atol=1e-9)
    assert np.linalg.norm(later.linear) > 0.4  # forward speed 0.5 m/s in a slightly turning body frame
    # Path: every keyframe so far, in the map frame, stamped with the latest one; cloud = window's points.
    assert len(second.path.poses) == 5 and second.path.stamp_ns == 3 * S and second.path.frame_id == "map"
    assert second.cloud.stamp_ns == 3 * S and second.cloud.frame_id == "map" and len(second.cloud.xyz) == 5
    # A window that restarts the map forgets the path and the velocity history.
    restart = composer.compose_window(window(2, [4.0], starts_map=True))
    assert len(restart.path.poses) == 1
    np.testing.assert_array_equal(restart.keyframes[0].odometry.linear, np.zeros(3))


def test_external_odometry_gives_map_to_odom_at_each_keyframe_and_reports_gaps():
    composer = OutputComposer(OutputConfig(publish_odom_to_base_tf=False, transform_tolerance=0.0))
    T_odom_base = make_transform(Rotation.from_rotvec([0, 0, 0.3]).as_matrix(), [1.0, 2.0, 0.0])
    known = {int(1.0 * S): T_odom_base}
    out = composer.compose_window(window(0, [1.0, 2.0], starts_map=True), odom_to_base=known.get)
    assert out.missing_odometry == (2 * S,)
    (map_odom,), () = out.keyframes[0].transforms, out.keyframes[1].transforms
    np.testing.assert_allclose(map_odom.T @ T_odom_base, base_pose(1.0), atol=1e-12)
    assert all(k.odometry.frame_id == "map" for k in out.keyframes)  # the pose is only known in the map frame


def test_path_is_bounded_by_path_max_size():
    composer = OutputComposer(OutputConfig(path_max_size=3))
    out = composer.compose_window(window(0, [1.0, 2.0, 3.0, 4.0, 5.0], starts_map=True))
    assert [p.stamp_ns for p in out.path.poses] == [3 * S, 4 * S, 5 * S]


def test_transform_tree_root_and_lookup_are_the_offline_and_node_walker():
    tree = TransformTree()
    T_base_link = make_transform(Rotation.from_rotvec([0, 0.1, 0]).as_matrix(), [0.2, 0, 0.4])
    T_link_opt = make_transform([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], [0, 0, 0])
    tree.set("/base_link", "camera_link", T_base_link)
    tree.set("camera_link", "camera_optical_frame", T_link_opt)
    root, T = tree.root_of("camera_optical_frame")
    assert root == "base_link"
    np.testing.assert_allclose(T, T_base_link @ T_link_opt)
    np.testing.assert_allclose(tree.lookup("camera_optical_frame", "base_link"), invert_rigid(T))
    assert tree.root_of("base_link") is None and tree.lookup("base_link", "elsewhere") is None
    tree.set("camera_optical_frame", "base_link", np.eye(4))
    with pytest.raises(ValueError, match="cycle"):
        tree.root_of("camera_link")


def test_node_conversion_and_offline_bag_carry_identical_messages(tmp_path):
    """The same records, converted the node's way (rclpy messages) and written the offline way
    (MapBagWriter CDR read back with rclpy), are equal message for message."""
    pytest.importorskip("rclpy")
    pytest.importorskip("rosbags")
    from nav_msgs.msg import Odometry, Path
    from rclpy.serialization import deserialize_message
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import PointCloud2
    from tf2_msgs.msg import TFMessage

    from spark3r.offline.map_bag import MapBagWriter
    from spark3r_ros.conversions import (PathConverter, cloud_record_to_msg, odometry_record_to_msg,
                                         transform_record_to_msg)

    composer = OutputComposer(OutputConfig())
    windows = [composer.compose_window(window(0, [1.0, 1.5, 2.0], starts_map=True)),
               composer.compose_window(window(1, [2.5, 3.0]))]
    static = composer.static_transform(1 * S, make_transform(np.eye(3), [0.1, 0, 0.3]), "camera_optical_frame")
    map_cloud = composer.map_cloud(np.ones((4, 3), np.float32), np.full((4, 3), 7, np.uint8))
    with MapBagWriter(tmp_path / "bag") as bag:
        bag.write_static(static)
        for out in windows:
            bag.write_window(out)
        bag.write_map(map_cloud)
    types = {"/tf": TFMessage, "/tf_static": TFMessage, "/spark3r_mapping/odometry": Odometry,
             "/spark3r_mapping/path": Path, "/spark3r_mapping/cloud": PointCloud2, "/spark3r_mapping/map": PointCloud2}
    written = {topic: [] for topic in types}
    with Reader(tmp_path / "bag") as reader:
        for conn, _, raw in reader.messages():
            written[conn.topic].append(deserialize_message(raw, types[conn.topic]))

    path_msg = PathConverter()
    live_tf = [transform_record_to_msg(t) for out in windows for t in out.transforms]
    assert [t for msg in written["/tf"] for t in msg.transforms] == live_tf and len(live_tf) == 10
    assert written["/tf_static"][0].transforms == [transform_record_to_msg(static)]
    assert written["/spark3r_mapping/odometry"] == [odometry_record_to_msg(k.odometry) for out in windows for k in out.keyframes]
    assert written["/spark3r_mapping/path"] == [path_msg(out.path) for out in windows]
    assert written["/spark3r_mapping/cloud"] == [cloud_record_to_msg(out.cloud) for out in windows]
    assert written["/spark3r_mapping/map"] == [cloud_record_to_msg(map_cloud)]
    # The offline Odometry carries the twist (it used to be zero).
    speeds = [np.hypot(m.twist.twist.linear.x, m.twist.twist.linear.y) for m in written["/spark3r_mapping/odometry"]]
    assert speeds[0] == 0.0 and min(speeds[1:]) > 0.4
    # ... and the covariances from the window alignment (they used to be zero).
    for msg in written["/spark3r_mapping/odometry"]:
        pose_cov = np.reshape(msg.pose.covariance, (6, 6))
        assert np.all(np.diag(pose_cov) > 0) and np.count_nonzero(pose_cov - np.diag(np.diag(pose_cov))) == 0


def test_back_end_correction_goes_to_map_to_odom_and_odometry_stays_continuous():
    """With back-end poses (REP-105): map -> odom is the back end's correction; odom -> base_link
    and the Odometry are T_map_odom^-1 T_map_base, continuous when a loop moves the map poses;
    the Path is rebuilt from the optimised trajectory; the graph covariance is rotated into odom."""
    from spark3r.mapping.outputs import BackendPoses
    from spark3r.mapping.tracking import ros_pose_covariance

    composer = OutputComposer(OutputConfig(transform_tolerance=0.0))
    w0 = window(0, [1.0, 1.5, 2.0], starts_map=True)
    cov_rot_first = np.diag([1e-4, 2e-4, 3e-4, 1e-2, 2e-2, 3e-2])   # rotation block first, as gtsam's tangent
    cov = ros_pose_covariance(cov_rot_first)
    np.testing.assert_allclose(np.diag(cov), [1e-2, 2e-2, 3e-2, 1e-4, 2e-4, 3e-4])
    first = composer.compose_window(w0, backend=BackendPoses(np.eye(4), w0.keyframes, "OK", cov))
    # A loop: the back end moves every pose by a correction C; the front end's chain does not move.
    C = make_transform(Rotation.from_rotvec([0, 0, 0.3]).as_matrix(), [0.4, -0.2, 0.0])
    w1 = window(1, [2.5, 3.0])
    moved = tuple(MappedKeyframe(k.id, k.stamp_ns, C @ k.camera_to_map, C @ k.base_to_map, k.K, k.window_index)
                  for k in w0.keyframes + w1.keyframes)
    second = composer.compose_window(WindowResult(1, moved[3:], w1.points_xyz, w1.points_rgb, 1.0, 0.0, 1.0, 3, 0.1, False),
                                     backend=BackendPoses(C, moved, "RELOCALIZED", cov))
    for out, correction in ((first, np.eye(4)), (second, C)):
        for kf in out.keyframes:
            odom_base, map_odom = kf.transforms
            np.testing.assert_allclose(map_odom.T, correction, atol=1e-12)
            t = kf.odometry.stamp_ns / S
            np.testing.assert_allclose(odom_base.T, base_pose(t), atol=1e-9)   # continuous: the uncorrected chain
            np.testing.assert_allclose(kf.odometry.pose, base_pose(t), atol=1e-9)
    # The twist across the loop is the robot's, not the correction's.
    linear, _ = body_twist(base_pose(2.0), base_pose(2.5), 0.5)
    np.testing.assert_allclose(second.keyframes[0].odometry.linear, linear, atol=1e-9)
    # The Path (map frame) holds every keyframe at its corrected pose.
    assert len(second.path.poses) == 5
    for p, k in zip(second.path.poses, moved):
        np.testing.assert_allclose(p.pose, k.base_to_map, atol=1e-12)
    # Covariance: the graph's, rotated from map into odom (a rotation about z here).
    R = invert_rigid(C)[:3, :3]
    J = np.zeros((6, 6))
    J[:3, :3] = J[3:, 3:] = R
    np.testing.assert_allclose(second.keyframes[0].odometry.pose_covariance, J @ cov @ J.T, atol=1e-15)
    assert composer.tracking.state == "RELOCALIZED"
    # LOST from the back end (a new, unlinked segment): 9999 on the diagonal, as compose_lost.
    lost = composer.compose_window(window(2, [3.5]), backend=BackendPoses(C, moved, "LOST", ros_pose_covariance(np.diag(np.full(6, 1e4)))))
    assert np.all(np.diag(lost.keyframes[0].odometry.pose_covariance) == 9999.0) and composer.tracking.state == "LOST"


def test_poses_updated_record_rebuilds_the_path_and_carries_the_map():
    composer = OutputComposer(OutputConfig())
    w0 = window(0, [1.0, 1.5], starts_map=True)
    composer.compose_window(w0)
    C = make_transform(np.eye(3), [0.0, 1.0, 0.0])
    moved = [MappedKeyframe(k.id, k.stamp_ns, C @ k.camera_to_map, C @ k.base_to_map, k.K, 0) for k in w0.keyframes]
    xyz, rgb = np.ones((7, 3), np.float32), np.zeros((7, 3), np.uint8)
    update = composer.compose_poses_updated(moved, xyz, rgb)
    assert [p.stamp_ns for p in update.path.poses] == [k.stamp_ns for k in moved] and update.path.frame_id == "map"
    np.testing.assert_allclose(update.path.poses[1].pose, moved[1].base_to_map)
    assert update.map.frame_id == "map" and len(update.map.xyz) == 7 and update.map.stamp_ns == moved[-1].stamp_ns


def test_back_end_path_reuses_the_records_of_keyframes_that_did_not_move():
    """The Path is rebuilt every window from the trajectory; a keyframe object the mapper did not
    replace keeps its PoseRecord (the node converts only moved poses), a moved one gets a new one,
    and path_max_size keeps the newest."""
    from spark3r.mapping.outputs import BackendPoses

    composer = OutputComposer(OutputConfig(path_max_size=4))
    w0 = window(0, [1.0, 1.5, 2.0], starts_map=True)
    first = composer.compose_window(w0, backend=BackendPoses(np.eye(4), w0.keyframes, "OK", None))
    w1 = window(1, [2.5, 3.0])
    moved = MappedKeyframe(w0.keyframes[2].id, w0.keyframes[2].stamp_ns, np.eye(4), np.eye(4), np.eye(3), 0)
    trajectory = (w0.keyframes[0], w0.keyframes[1], moved) + w1.keyframes
    second = composer.compose_window(w1, backend=BackendPoses(np.eye(4), trajectory, "OK", None))
    assert [p.stamp_ns for p in second.path.poses] == [k.stamp_ns for k in trajectory[1:]]
    assert second.path.poses[0] is first.path.poses[1]          # unchanged keyframe: same record
    assert second.path.poses[1] is not first.path.poses[2]      # moved keyframe: a new record
    np.testing.assert_allclose(second.path.poses[1].pose, np.eye(4))
