"""spark3r_ros.bag_replay over loopback DDS: messages arrive with their bag stamps, /clock carries
bag time (a use_sim_time node's clock follows it), /tf_static stays latched for late
subscribers, and the mapping node (ground-truth test double) run with use_sim_time stamps its
outputs in bag time."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")

from ros_helpers import ros_process, spin_until  # noqa: E402

from spark3r.data.bag_io import write_sequence_bag  # noqa: E402
from spark3r.data.synthetic import render_sequence  # noqa: E402

SCENE = dict(num_frames=24, height=96, width=128, seed=5, fps=10.0)
SCENE_ARGS = ["--frames", "24", "--height", "96", "--width", "128", "--seed", "5", "--fps", "10"]


def stamp_ns(header) -> int:
    return header.stamp.sec * 10**9 + header.stamp.nanosec


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    seq = render_sequence(**SCENE)
    return seq, write_sequence_bag(seq, tmp_path_factory.mktemp("replay") / "scene.bag")


def sim_time_node(context, name):
    from rclpy.parameter import Parameter

    return rclpy.create_node(name, context=context, parameter_overrides=[Parameter("use_sim_time", Parameter.Type.BOOL, True)])


def test_replay_stamps_clock_and_latched_tf_static(ros_context, bag):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image
    from tf2_msgs.msg import TFMessage

    seq, path = bag
    node = sim_time_node(ros_context, "test_bag_replay_listener")
    images, clocks, statics = [], [], []
    node.create_subscription(Image, "/camera/image_raw", images.append, QoSProfile(depth=100))
    node.create_subscription(Clock, "/clock", clocks.append, 100)
    late = {}
    try:
        with ros_process("spark3r_ros.bag_replay", str(path), "--clock", "50", "--rate", "1.0",
                         "--wait-for", "/camera/image_raw") as proc:
            assert spin_until(node, lambda: len(images) >= 3, 30.0, proc), f"no images replayed:\n{proc.log_text()}"
            # Subscribe to /tf_static only now, long after it was published: it must be latched.
            latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
            late["sub"] = node.create_subscription(TFMessage, "/tf_static", statics.append, latched)
            # While playing, this node's clock is bag time (sim time from /clock), not wall time.
            assert spin_until(node, lambda: len(clocks) > 0, 5.0, proc)
            now_ns = node.get_clock().now().nanoseconds
            assert int(seq.stamps_ns[0]) <= now_ns <= int(seq.stamps_ns[-1]) + 10**9
            assert spin_until(node, lambda: len(images) == len(seq) and statics, 30.0, proc), \
                f"got {len(images)} images, {len(statics)} tf_static:\n{proc.log_text()}"
            assert spin_until(node, lambda: not proc.running(), 30.0), "replay did not finish"
            assert proc.popen.returncode == 0, proc.log_text()
    finally:
        node.destroy_node()
    assert [stamp_ns(m.header) for m in images] == seq.stamps_ns.tolist()
    t = statics[0].transforms[0]
    assert (t.header.frame_id, t.child_frame_id) == ("base_link", "camera_optical_frame")
    clock_ns = [c.clock.sec * 10**9 + c.clock.nanosec for c in clocks]
    assert clock_ns == sorted(clock_ns)  # monotonic
    assert clock_ns[0] >= int(seq.stamps_ns[0]) and clock_ns[-1] >= int(seq.stamps_ns[-1])
    assert len(set(clock_ns)) > len(seq)  # ticks between messages too, not just one per message


def test_replay_rejects_bad_arguments(bag, tmp_path):
    import subprocess
    import sys

    from ros_helpers import child_env

    _, path = bag
    for args, message in (([str(tmp_path / "missing")], "does not exist"),
                          ([str(path), "--topics", "/nope"], "not in bag"),
                          ([str(path), "--rate", "0"], "--rate must be > 0")):
        result = subprocess.run([sys.executable, "-m", "spark3r_ros.bag_replay", *args], env=child_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_mapping_node_with_sim_time_stamps_outputs_in_bag_time(ros_context, bag):
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry

    seq, path = bag
    bag_stamps = set(int(s) for s in seq.stamps_ns)
    node = rclpy.create_node("test_bag_replay_mapping", context=ros_context)
    odometry, diagnostics = [], []
    node.create_subscription(Odometry, "/spark3r_mapping/odometry", odometry.append, 50)
    node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 50)
    params = {"use_sim_time": "true", "window_size": "6", "window_stride": "3", "min_parallax_px": "4.0",
              "max_time_gap_s": "1.0"}
    ros_args = ["-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info"]
    ros_args += [a for k, v in params.items() for a in ("-p", f"{k}:={v}")]
    try:
        with ros_process("spark3r_ros.ground_truth_node", *SCENE_ARGS, "--ros-args", *ros_args) as mapper:
            assert spin_until(node, lambda: node.count_publishers("/spark3r_mapping/odometry") > 0, 60.0, mapper), \
                f"node did not start:\n{mapper.log_text()}"
            with ros_process("spark3r_ros.bag_replay", str(path), "--clock", "--wait-for", "/camera/image_raw",
                             "/clock", "--start-paused-s", "0.5") as replay:
                assert spin_until(node, lambda: not replay.running(), 60.0, mapper), "replay did not finish"
                assert replay.popen.returncode == 0, replay.log_text()
            assert spin_until(node, lambda: len(odometry) >= 6, 30.0, mapper), \
                f"only {len(odometry)} odometry messages:\n{mapper.log_text()}"
            n = len(diagnostics)
            spin_until(node, lambda: len(diagnostics) > n + 1, 5.0, mapper)
    finally:
        node.destroy_node()
    assert {stamp_ns(m.header) for m in odometry} <= bag_stamps
    # The node's own clock (diagnostics are stamped with now()) ran on /clock: bag time, not wall time.
    sim = [stamp_ns(d.header) for d in diagnostics if stamp_ns(d.header) > 0]
    assert sim, "no diagnostics stamped after /clock started"
    assert all(int(seq.stamps_ns[0]) <= s <= int(seq.stamps_ns[-1]) + 10**9 for s in sim[-3:])


def test_replaying_a_spark3r_map_output_bag(ros_context, bag, tmp_path):
    """What RViz sees through rosbag2: the offline mapper's mcap replayed over DDS."""
    from nav_msgs.msg import Path as PathMsg
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2
    from tf2_msgs.msg import TFMessage

    from spark3r.mapping import MapperConfig
    from spark3r.mapping.testing import GroundTruthBackbone
    from spark3r.offline.inputs import open_input
    from spark3r.offline.runner import run_map
    from spark3r_ros.conversions import msg_to_cloud

    seq, path = bag
    config = MapperConfig.from_flat({"window_size": 6, "window_stride": 3, "min_parallax_px": 4.0})
    report = run_map(open_input(path), tmp_path / "run", config, GroundTruthBackbone(seq))
    node = rclpy.create_node("test_bag_replay_output", context=ros_context)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    maps, paths, tfs = [], [], []
    node.create_subscription(PointCloud2, "/spark3r_mapping/map", maps.append, latched)
    node.create_subscription(PathMsg, "/spark3r_mapping/path", paths.append, latched)
    node.create_subscription(TFMessage, "/tf", tfs.append, 100)
    try:
        with ros_process("spark3r_ros.bag_replay", str(tmp_path / "run" / "mapping.bag"), "--rate", "5",
                         "--wait-for", "/tf", "/spark3r_mapping/map") as proc:
            assert spin_until(node, lambda: maps and len(tfs) == report["keyframes_mapped"], 30.0, proc), \
                f"{len(maps)} maps, {len(tfs)} tf:\n{proc.log_text()}"
    finally:
        node.destroy_node()
    xyz, rgb = msg_to_cloud(maps[-1])
    assert len(xyz) == report["map_points"] and rgb is not None
    assert len(paths[-1].poses) == report["keyframes_mapped"]
