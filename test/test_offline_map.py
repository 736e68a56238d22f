"""spark3r map end to end with the ground-truth test double (then spark3r eval: near-zero ATE),
the mcap output read by rosbags / mcap / rclpy, every input kind, Ctrl-C partial outputs and bad
input (unreadable bag, missing topic, mixed sizes, corrupt frames, zero frames)."""
import glob
import io
import json
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest

from spark3r.data.io import format_stamp_ns, read_ply, read_tum_trajectory
from spark3r.geometry import invert_rigid, quat_xyzw_to_matrix
from spark3r.mapping import MapperConfig
from spark3r.mapping.testing import GroundTruthBackbone
from spark3r.offline import cli as map_cli
from spark3r.offline.benchmark import load_tum_ground_truth, write_benchmark
from spark3r.offline.inputs import OfflineInput, open_input
from spark3r.offline.runner import run_map
from spark3r.eval import cli as eval_cli

MAPPER_PARAMS = ["window_size=8", "window_stride=4", "min_parallax_px=4.0", "voxel_size=0.02"]


def mapper_config():
    return MapperConfig.from_flat(map_cli.parse_params(MAPPER_PARAMS))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    paths = write_benchmark(root / "orbit", num_frames=40, height=120, width=160, seed=0)
    return paths


@pytest.fixture(scope="module")
def gt_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "map_gt"
    argv = [str(bench["bag"]), "--out", str(out), "--ground-truth", str(bench["tum"]), "--no-progress"]
    for p in MAPPER_PARAMS:
        argv += ["--param", p]
    assert map_cli.main(argv) == 0
    return out


def bag_stamps(seq_stamps):
    return set(int(s) for s in seq_stamps)


def test_map_then_eval_ground_truth_double_gives_near_zero_errors(bench, gt_run, tmp_path, capsys):
    report = json.loads((gt_run / "report.json").read_text())
    assert report["complete"] is True and report["interrupted"] is False
    assert report["frames"] == 40 and report["keyframes_mapped"] >= 12
    assert report["input"]["kind"] == "bag" and report["input"]["topic"] == "/camera/image_raw"
    assert report["input"]["intrinsics"] == "given" and report["input"]["extrinsic"].startswith("base_link")
    assert len(report["windows"]) == report["mapper_stats"]["windows_mapped"] >= 3
    assert report["alignment_residuals"]["max"] < 1e-4
    # Trajectory stamps are bag (source) stamps of keyframes.
    gt = load_tum_ground_truth(bench["tum"])
    stamps, poses = read_tum_trajectory(gt_run / "trajectory.tum")
    assert len(stamps) == report["keyframes_mapped"] and set(stamps.tolist()) <= bag_stamps(gt.stamps_ns)
    assert len(read_ply(gt_run / "map.ply").xyz) == report["map_points"] > 1000

    out = tmp_path / "eval"
    assert eval_cli.main([str(gt_run), "--gt", str(bench["tum"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ATE RMSE" in printed
    ev = json.loads((out / "eval.json").read_text())
    extent = 10.0
    assert ev["trajectory"]["associated_poses"] == len(stamps)
    assert ev["trajectory"]["ate_m"]["rmse"] < 1e-6 * extent
    assert ev["trajectory"]["rpe"]["rotation_deg"]["max"] < 1e-3
    assert ev["map_run_complete"] is True
    # Depth PNGs (16-bit) match the true depth up to quantisation, with the alignment's scale.
    assert ev["depth"]["frames"] == len(stamps) and ev["depth"]["abs_rel"] < 1e-3 and ev["depth"]["delta1"] == 1.0
    # The map lies on the true surfaces (reference.ply found beside the TUM folder).
    assert ev["cloud"]["accuracy_median"] < 0.02 and ev["cloud"]["precision"] > 0.99
    assert (out / "trajectory_top.png").stat().st_size > 5000
    # Trajectory-scale depth (no per-frame fitting) is right too: the map's unit is consistent.
    ev2 = eval_cli.main([str(gt_run), "--gt", str(bench["tum"]), "--depth-scale", "trajectory", "--no-plots",
                         "--out", str(tmp_path / "eval2")])
    assert ev2 == 0
    assert json.loads((tmp_path / "eval2" / "eval.json").read_text())["depth"]["abs_rel"] < 1e-3


def test_keyframe_depth_and_confidence_files(gt_run):
    listing = json.loads((gt_run / "keyframes.json").read_text())["keyframes"]
    assert listing
    for kf in listing:
        assert kf["stamp"] == format_stamp_ns(kf["stamp_ns"])
        depth = cv2.imread(str(gt_run / kf["depth_png"]), cv2.IMREAD_UNCHANGED)
        conf = cv2.imread(str(gt_run / kf["conf_png"]), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and conf.dtype == np.uint16 and depth.shape == (120, 160)
        assert depth.max() == 65535 and kf["depth_scale"] > 0
        # The double's confidence is 1 + 4 * uniform: decoded values stay in that range.
        c = conf * kf["conf_scale"]
        assert 1.0 - 1e-4 <= c.min() and c.max() <= 5.0 + 1e-4  # quantisation: 5 / 65535


def _read_bag(path):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    out = {}
    with Reader(path) as reader:
        conns = {c.topic: c for c in reader.connections}
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, raw, ts.deserialize_cdr(raw, conn.msgtype)))
    return conns, out


def test_mcap_output_is_readable_by_rosbags_mcap_and_rclpy(gt_run, bench):
    from mcap.reader import make_reader

    conns, msgs = _read_bag(gt_run / "mapping.bag")
    report = json.loads((gt_run / "report.json").read_text())
    n = report["keyframes_mapped"]
    assert {t: c.msgtype for t, c in conns.items()} == {
        "/tf": "tf2_msgs/msg/TFMessage", "/tf_static": "tf2_msgs/msg/TFMessage",
        "/spark3r_mapping/odometry": "nav_msgs/msg/Odometry", "/spark3r_mapping/path": "nav_msgs/msg/Path",
        "/spark3r_mapping/cloud": "sensor_msgs/msg/PointCloud2", "/spark3r_mapping/map": "sensor_msgs/msg/PointCloud2"}
    for topic in ("/tf_static", "/spark3r_mapping/path", "/spark3r_mapping/map"):  # latched
        assert conns[topic].ext.offered_qos_profiles[0].durability.name == "TRANSIENT_LOCAL"
    assert conns["/tf"].ext.offered_qos_profiles[0].durability.name == "VOLATILE"
    assert len(msgs["/tf"]) == len(msgs["/spark3r_mapping/odometry"]) == n
    assert len(msgs["/spark3r_mapping/path"]) == len(msgs["/spark3r_mapping/cloud"]) == len(report["windows"])
    assert len(msgs["/spark3r_mapping/path"][-1][2].poses) == n
    # TF map -> base_link = keyframe camera pose composed with the inverse extrinsic.
    stamps, cam_poses = read_tum_trajectory(gt_run / "trajectory.tum")
    (_, _, static), = msgs["/tf_static"]
    st = static.transforms[0]
    assert (st.header.frame_id, st.child_frame_id) == ("base_link", "camera_optical_frame")
    base_to_cam = np.eye(4)
    base_to_cam[:3, :3] = quat_xyzw_to_matrix([st.transform.rotation.x, st.transform.rotation.y,
                                              st.transform.rotation.z, st.transform.rotation.w])
    base_to_cam[:3, 3] = [st.transform.translation.x, st.transform.translation.y, st.transform.translation.z]
    for (t, _, tf), stamp, cam in zip(msgs["/tf"], stamps, cam_poses):
        tr, map_odom = tf.transforms
        assert t == stamp == tr.header.stamp.sec * 10**9 + tr.header.stamp.nanosec
        assert (tr.header.frame_id, tr.child_frame_id) == ("odom", "base_link")
        assert (map_odom.header.frame_id, map_odom.child_frame_id) == ("map", "odom")
        # map -> odom: the back end's correction, the identity without a revisit.
        assert map_odom.transform.rotation.w == pytest.approx(1.0, abs=1e-9)
        assert np.allclose([map_odom.transform.translation.x, map_odom.transform.translation.y,
                            map_odom.transform.translation.z], 0.0, atol=1e-6)
        expected = cam @ invert_rigid(base_to_cam)
        assert np.allclose([tr.transform.translation.x, tr.transform.translation.y, tr.transform.translation.z],
                           expected[:3, 3], atol=1e-9)
    # The mcap file itself: schemas in ros2msg, CDR messages (what Foxglove reads).
    mcap_file, = glob.glob(str(gt_run / "mapping.bag" / "*.mcap"))
    with open(mcap_file, "rb") as fh:
        summary = make_reader(fh).get_summary()
    assert {ch.message_encoding for ch in summary.channels.values()} == {"cdr"}
    assert {s.encoding for s in summary.schemas.values()} == {"ros2msg"}
    assert summary.statistics.message_count == sum(len(v) for v in msgs.values())
    # rclpy reads the clouds; the bytes equal what the live node's conversion produces.
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import PointCloud2

    from spark3r_ros.conversions import cloud_to_msg, msg_to_cloud

    (_, raw, _), = msgs["/spark3r_mapping/map"]
    msg = deserialize_message(raw, PointCloud2)
    xyz, rgb = msg_to_cloud(msg)
    ply = read_ply(gt_run / "map.ply")
    assert np.array_equal(xyz, ply.xyz) and np.array_equal(rgb, ply.rgb)
    live = cloud_to_msg(ply.xyz, ply.rgb, msg.header.stamp, "map")
    assert bytes(live.data) == bytes(msg.data) and live.point_step == msg.point_step
    assert [(f.name, f.offset, f.datatype, f.count) for f in live.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in msg.fields]


# -- inputs -------------------------------------------------------------------------------------


def test_tum_folder_and_image_folder_inputs_map_like_the_bag(bench, gt_run, tmp_path):
    gt = load_tum_ground_truth(bench["tum"])
    reference, _ = read_tum_trajectory(gt_run / "trajectory.tum")
    images = tmp_path / "images"
    images.mkdir()
    for stamp, rgb in zip(gt.stamps_ns, gt.images):
        cv2.imwrite(str(images / f"{format_stamp_ns(int(stamp))}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    for name, path in (("tum", bench["tum"]), ("images", images)):
        source = open_input(path)
        assert source.kind == name
        progress = io.StringIO()
        report = run_map(source, tmp_path / f"out_{name}", mapper_config(), GroundTruthBackbone(gt), progress=progress)
        assert report["complete"] and report["input"]["frames_read"] == 40
        last_line = progress.getvalue().rstrip("\n").split("\r")[-1]
        assert f"frames 40/40 | keyframes {report['mapper_stats']['keyframes']} | windows {len(report['windows'])}/" in last_line
        stamps, _ = read_tum_trajectory(tmp_path / f"out_{name}" / "trajectory.tum")
        assert np.array_equal(stamps, reference)  # same frames, same keyframes, same stamps


def test_compressed_sqlite_bag_and_video_inputs(tmp_path):
    from spark3r.data.bag_io import write_sequence_bag
    from spark3r.data.synthetic import render_sequence

    seq = render_sequence(num_frames=6, height=48, width=64, seed=1)
    bag = write_sequence_bag(seq, tmp_path / "c.bag", storage="sqlite3", compressed=True, compressed_format="png")
    source = open_input(bag)
    assert source.topic == "/camera/image_raw/compressed" and source.expected_frames == 6
    frames = list(source.frames())
    assert [f.stamp_ns for f in frames] == seq.stamps_ns.tolist()
    assert np.array_equal(frames[0].image, seq.images[0])  # png: lossless
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48))
    for rgb in seq.images:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    source = open_input(video)
    frames = list(source.frames())
    assert source.kind == "video" and len(frames) == 6
    assert [f.stamp_ns for f in frames] == [i * 200_000_000 for i in range(6)]
    assert frames[0].image.shape == (48, 64, 3)
    assert np.abs(frames[2].image.astype(int) - seq.images[2]).mean() < 12  # JPEG in the video


# -- Ctrl-C ------------------------------------------------------------------------------------


def _stopping_source(bench, after: int, how: str) -> OfflineInput:
    source = open_input(bench["bag"])
    inner = source.read

    def read():
        for i, item in enumerate(inner()):
            if i == after:
                if how == "signal":
                    signal.raise_signal(signal.SIGINT)  # what Ctrl-C does; the runner's handler catches it
                else:
                    raise KeyboardInterrupt
            yield item

    source.read = read
    return source


@pytest.mark.parametrize("how", ["signal", "exception"])
def test_ctrl_c_leaves_valid_partial_outputs(bench, tmp_path, how):
    gt = load_tum_ground_truth(bench["tum"])
    out = tmp_path / "partial"
    report = run_map(_stopping_source(bench, 24, how), out, mapper_config(), GroundTruthBackbone(gt))
    assert report["interrupted"] is True and report["complete"] is False
    saved = json.loads((out / "report.json").read_text())
    assert saved["interrupted"] is True and saved["complete"] is False
    assert 24 <= saved["frames"] <= 25 and saved["keyframes_mapped"] > 0
    stamps, _ = read_tum_trajectory(out / "trajectory.tum")
    assert len(stamps) == saved["keyframes_mapped"]
    conns, msgs = _read_bag(out / "mapping.bag")
    assert len(msgs["/tf"]) == len(stamps) and len(msgs["/spark3r_mapping/map"]) == 1
    assert len(read_ply(out / "map.ply").xyz) == saved["map_points"]
    assert not list(tmp_path.glob(".partial*"))  # no staging directory left behind


class _CtrlCTwiceInWindow:
    """Backbone wrapper: during its third window the user presses Ctrl-C twice."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def predict(self, window):
        self.calls += 1
        if self.calls == 3:
            signal.raise_signal(signal.SIGINT)  # first: stop after this frame
            signal.raise_signal(signal.SIGINT)  # second: stop now, inside the window
        return self.inner.predict(window)

    def forget(self, ids):
        self.inner.forget(ids)

    def reset(self):
        self.inner.reset()


def test_second_ctrl_c_inside_a_window_still_leaves_consistent_outputs(bench, tmp_path):
    gt = load_tum_ground_truth(bench["tum"])
    out = tmp_path / "twice"
    report = run_map(open_input(bench["bag"]), out, mapper_config(), _CtrlCTwiceInWindow(GroundTruthBackbone(gt)))
    assert report["interrupted"] and not report["complete"]
    assert report["mapper_stats"]["windows_mapped"] == 2  # the interrupted third window is not in the outputs
    stamps, _ = read_tum_trajectory(out / "trajectory.tum")
    conns, msgs = _read_bag(out / "mapping.bag")
    listing = json.loads((out / "keyframes.json").read_text())["keyframes"]
    assert len(stamps) == len(msgs["/tf"]) == len(listing) == report["keyframes_mapped"] > 0


# -- bad input ---------------------------------------------------------------------------------


def _run_cli(argv, capsys):
    code = map_cli.main(argv + ["--no-progress"])
    return code, capsys.readouterr().err


def test_bad_inputs_give_clear_errors_and_no_output(bench, tmp_path, capsys):
    gt_args = ["--ground-truth", str(bench["tum"])]
    out = tmp_path / "out"
    code, err = _run_cli([str(tmp_path / "nope"), "--out", str(out)] + gt_args, capsys)
    assert code == 2 and "does not exist" in err
    broken = tmp_path / "broken.bag"
    broken.mkdir()
    (broken / "metadata.yaml").write_text("rosbag2_bagfile_information: [not, a, bag\n")
    code, err = _run_cli([str(broken), "--out", str(out)] + gt_args, capsys)
    assert code == 2 and "not a readable rosbag2 bag" in err
    code, err = _run_cli([str(bench["bag"]), "--out", str(out), "--topic", "/nope"] + gt_args, capsys)
    assert code == 2 and "'/nope' is not in bag" in err and "/camera/image_raw" in err
    code, err = _run_cli([str(bench["bag"]), "--out", str(out), "--topic", "/camera/camera_info"] + gt_args, capsys)
    assert code == 2 and "expected sensor_msgs/msg/Image" in err
    code, err = _run_cli([str(bench["bag"]), "--out", str(out), "--param", "window_size=1"] + gt_args, capsys)
    assert code == 2 and "window_size" in err
    code, err = _run_cli([str(bench["bag"]), "--out", str(out), "--reduction", "uniform", "--reduction-schedule", "s.json"],
                         capsys)
    assert code == 2 and "only used by --reduction spark3r" in err
    code, err = _run_cli([str(bench["bag"]), "--out", str(out), "--reduction-params", "[1]"], capsys)
    assert code == 2 and "must be a JSON object" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # An existing output is never overwritten by accident.
    out.mkdir()
    code, err = _run_cli([str(bench["bag"]), "--out", str(out)] + gt_args, capsys)
    assert code == 2 and "already exists" in err


def _image_folder(root: Path, images: list) -> Path:
    root.mkdir()
    for i, img in enumerate(images):
        if isinstance(img, bytes):
            (root / f"{i:04d}.png").write_bytes(img)
        else:
            cv2.imwrite(str(root / f"{i:04d}.png"), img)
    return root


def test_mixed_sizes_corrupt_and_zero_frames(bench, tmp_path):
    gt = load_tum_ground_truth(bench["tum"])
    backbone = GroundTruthBackbone(gt)
    good = [cv2.cvtColor(im, cv2.COLOR_RGB2BGR) for im in gt.images[:6]]
    mixed = _image_folder(tmp_path / "mixed", good[:3] + [cv2.resize(good[3], (80, 60))] + good[4:])
    with pytest.raises(ValueError, match=r"frame 3 .* is 80x60 but the sequence started at 160x120"):
        run_map(open_input(mixed), tmp_path / "out_mixed", mapper_config(), backbone)
    assert not (tmp_path / "out_mixed").exists() and not list(tmp_path.glob(".out_mixed*"))

    corrupt = _image_folder(tmp_path / "corrupt", good[:2] + [b"\x89PNG\r\n\x1a\n garbage"] + good[3:])
    source = open_input(corrupt)
    frames = list(source.frames())
    assert len(frames) == 5 and source.corrupt_frames == 1
    assert [f.stamp_ns for f in frames] == [0, 100_000_000, 300_000_000, 400_000_000, 500_000_000]

    nothing = _image_folder(tmp_path / "nothing", [b"not an image", b"neither"])
    with pytest.raises(ValueError, match="no decodable frames"):
        run_map(open_input(nothing), tmp_path / "out_nothing", mapper_config(), backbone)
    assert not (tmp_path / "out_nothing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a rosbag2 bag"):
        open_input(tmp_path / "empty")


def test_corrupt_bag_message_is_skipped_and_counted(tmp_path):
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer

    from spark3r.data.bag_io import write_sequence_bag
    from spark3r.data.synthetic import render_sequence

    seq = render_sequence(num_frames=4, height=48, width=64, seed=2)
    good = write_sequence_bag(seq, tmp_path / "good.bag")
    # Copy the bag, garbling the payload of the second image (a truncated CDR message).
    with Reader(good) as reader:
        items = [(c, t, raw) for c, t, raw in reader.messages()]
        conns = list(reader.connections)
    writer = Writer(tmp_path / "bad.bag", version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    new = {c.id: writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data, rihs01=c.digest,
                                       offered_qos_profiles=c.ext.offered_qos_profiles) for c in conns}
    images_seen = 0
    for c, t, raw in items:
        if c.topic == "/camera/image_raw":
            images_seen += 1
            if images_seen == 2:
                raw = raw[:40]
        writer.write(new[c.id], t, raw)
    writer.close()
    source = open_input(tmp_path / "bad.bag")
    frames = list(source.frames())
    assert len(frames) == 3 and source.corrupt_frames == 1
    assert source.summary()["corrupt_frames"] == 1


def test_vggt_tiny_seeded_every_output_is_produced_and_readable(bench, tmp_path):
    """The real model path (vggt-tiny, deterministic random weights): whatever the quality of a
    random network, every output exists and standard readers accept it; eval runs on it."""
    from mcap.reader import make_reader

    out = tmp_path / "tiny"
    argv = [str(bench["bag"]), "--out", str(out), "--backbone", "vggt-tiny", "--checkpoint", "seeded",
            "--image-width", "56", "--max-frames", "14", "--no-progress",
            "--param", "window_size=4", "--param", "window_stride=2", "--param", "min_parallax_px=4.0"]
    assert map_cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["backbone"]["backbone"] == "vggt-tiny" and report["frames"] == 14
    assert report["keyframes_mapped"] >= 3  # enough for the Sim(3) alignment in eval
    stamps, poses = read_tum_trajectory(out / "trajectory.tum")
    assert len(stamps) == report["keyframes_mapped"] and np.all(np.isfinite(poses))
    assert len(read_ply(out / "map.ply").xyz) == report["map_points"] > 0
    listing = json.loads((out / "keyframes.json").read_text())["keyframes"]
    for kf in listing:
        depth = cv2.imread(str(out / kf["depth_png"]), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and depth.max() > 0
        x0, y0, x1, y1 = kf["depth_box"]
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120  # the network's crop, in image pixels
    conns, msgs = _read_bag(out / "mapping.bag")
    assert len(msgs["/tf"]) == len(stamps) and len(msgs["/spark3r_mapping/map"]) == 1
    mcap_file, = glob.glob(str(out / "mapping.bag" / "*.mcap"))
    with open(mcap_file, "rb") as fh:
        assert sum(1 for _ in make_reader(fh).iter_messages()) == sum(len(v) for v in msgs.values())
    assert eval_cli.main([str(out), "--gt", str(bench["tum"]), "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert ev["trajectory"]["associated_poses"] == len(stamps) and np.isfinite(ev["trajectory"]["ate_m"]["rmse"])
    assert ev["depth"]["frames"] == len(listing) and 0 <= ev["depth"]["delta1"] <= 1


def test_offline_odometry_carries_the_twist_of_the_moving_camera(gt_run):
    """The bag's Odometry comes from the node's composer: a body-frame twist, not zeros."""
    _, msgs = _read_bag(gt_run / "mapping.bag")
    odometry = [m for _, _, m in msgs["/spark3r_mapping/odometry"]]
    speeds = [np.linalg.norm([m.twist.twist.linear.x, m.twist.twist.linear.y, m.twist.twist.linear.z]) for m in odometry]
    assert speeds[0] == 0.0  # the first keyframe of a map has no velocity
    assert all(s > 0 for s in speeds[1:]) and len(speeds) >= 12
    # The twist is the motion between consecutive poses: speed * dt = distance travelled.
    poses = [np.array([m.pose.pose.position.x, m.pose.pose.position.y, m.pose.pose.position.z]) for m in odometry]
    stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in odometry]
    for i in range(1, len(odometry)):
        assert speeds[i] * (stamps[i] - stamps[i - 1]) == pytest.approx(np.linalg.norm(poses[i] - poses[i - 1]), rel=1e-6)


class _SpoilsDepthAfter:
    """TEST DOUBLE: the ground-truth backbone whose depth is scrambled from window ``n + 1`` on,
    so those windows cannot be aligned to the map."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls, self.rng = inner, n, 0, np.random.default_rng(0)

    def predict(self, window):
        pred = self.inner.predict(window)
        self.calls += 1
        if self.calls > self.n:
            pred.depth = (pred.depth * self.rng.uniform(0.2, 5.0, size=pred.depth.shape)).astype(np.float32)
        return pred


def test_offline_odometry_covariance_and_tracking_lost_records(bench, tmp_path):
    """As the node: Odometry carries the alignment covariance, and each window that cannot be
    aligned writes one Odometry holding the last pose with 9999 on the covariance diagonal."""
    gt = load_tum_ground_truth(bench["tum"])
    report = run_map(open_input(bench["bag"]), tmp_path / "out", mapper_config(), _SpoilsDepthAfter(GroundTruthBackbone(gt), 2))
    assert report["complete"] and report["mapper_stats"]["windows_rejected_alignment"] >= 1
    _, msgs = _read_bag(tmp_path / "out" / "mapping.bag")
    odometry = [m for _, _, m in msgs["/spark3r_mapping/odometry"]]
    variances = [float(m.pose.covariance[0]) for m in odometry]
    # Two mapped windows (8 + 4 keyframes), then lost. (The bag is in stamp order: keyframes that a
    # later window maps may be older than a lost record.)
    assert all(0 < v < 1.0 for v in variances[:12]) and 9999.0 in variances
    lost = odometry[variances.index(9999.0)]
    assert np.all(np.diag(np.reshape(lost.pose.covariance, (6, 6))) == 9999.0)
    # The last pose before tracking was lost (held by the lost record, or where the back end starts
    # the new, unlinked segment: also with 9999).
    def position(m):
        return [m.pose.pose.position.x, m.pose.pose.position.y, m.pose.pose.position.z]
    assert np.allclose(position(lost), position(odometry[11]), atol=1e-6)
