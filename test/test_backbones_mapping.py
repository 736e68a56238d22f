"""The mapper and the ROS node with the π3 and Depth-Anything-3 backbones (pi3-tiny / da3-small,
seeded-v1 weights): decoders, the mapper's production backbone path, and the mapping node."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spark3r.data.synthetic import render_sequence
from spark3r.mapping import BackboneConfig, Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig
from spark3r.mapping.model_backbone import ModelBackbone, NetworkGeometry, to_prediction
from spark3r.models import build_model
from spark3r.models.pi3 import focal_from_local_points

WIDTH = 126
GEOMETRY = NetworkGeometry((96, 128), (98, 126), (0.0, 0.0, 128.0, 96.0), 98)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=12, height=96, width=128, seed=9, trajectory="orbit")


def random_rigid(rng, count):
    q, _ = np.linalg.qr(rng.normal(size=(count, 3, 3)))
    q = q * np.sign(np.linalg.det(q))[:, None, None]
    return q, rng.normal(size=(count, 3))


def pinhole_points(depth, focal, h, w):
    v, u = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    return np.stack([u * depth / focal, v * depth / focal, depth], axis=-1)


def test_focal_fit_recovers_a_pinhole_point_map():
    rng = np.random.default_rng(1)
    depth = rng.uniform(1.0, 5.0, size=(2, 98, 126))
    points = np.stack([pinhole_points(depth[0], 90.0, 98, 126), pinhole_points(depth[1], 140.0, 98, 126)])
    points[1, :10, :, 2] = -1.0  # behind the camera: ignored
    points = torch.tensor(points)
    np.testing.assert_allclose(focal_from_local_points(points, torch.ones(2, 98, 126)).numpy(), [90.0, 140.0], rtol=1e-9)
    assert torch.isnan(focal_from_local_points(points, torch.zeros(2, 98, 126))).all()


def test_pi3_decoder_gives_c2w_depth_conf_and_fitted_intrinsics():
    rng = np.random.default_rng(2)
    R, t = random_rigid(rng, 3)
    c2w = np.tile(np.eye(4), (3, 1, 1))
    c2w[:, :3, :3], c2w[:, :3, 3] = R, t
    depth = rng.uniform(1.0, 3.0, size=(3, 98, 126))
    local = np.stack([pinhole_points(d, 100.0, 98, 126) for d in depth])
    logits = rng.normal(size=(1, 3, 98, 126, 1)) * 3
    logits[0, 0, 0, 0, 0] = 500.0  # would overflow exp in float32
    out = {"camera_poses": torch.tensor(c2w[None]).float(), "local_points": torch.tensor(local[None]).float(),
           "conf": torch.tensor(logits).float()}
    pred = to_prediction(build_model("pi3-tiny", device="meta").decode(out, GEOMETRY.network_hw), GEOMETRY)
    assert pred.shape_problem(3) is None and pred.finite_frames().all()
    np.testing.assert_allclose(pred.c2w, c2w, atol=1e-6)
    np.testing.assert_allclose(pred.depth, depth, rtol=1e-6)
    assert np.isfinite(pred.conf).all() and pred.conf.min() >= 1.0
    assert np.argsort(pred.conf.ravel())[-1] == 0  # monotone in the logits
    # Network focal 100 px on a 126-px-wide input that shows 128 image pixels.
    np.testing.assert_allclose(pred.K[:, 0, 0], 100.0 * 128 / 126, rtol=1e-4)


def test_da3_decoder_inverts_world_to_camera_extrinsics():
    rng = np.random.default_rng(3)
    R, t = random_rigid(rng, 2)
    w2c = np.concatenate([R, t[:, :, None]], axis=2)
    K = np.array([[80.0, 0, 63.0], [0, 70.0, 49.0], [0, 0, 1]])
    out = {"extrinsics": torch.tensor(w2c[None]).float(), "intrinsics": torch.tensor(np.repeat(K[None, None], 2, 1)).float(),
           "depth": torch.ones(1, 2, 98, 126), "depth_conf": torch.full((1, 2, 98, 126), 2.0)}
    pred = to_prediction(build_model("da3-small", device="meta").decode(out, GEOMETRY.network_hw), GEOMETRY)
    assert pred.shape_problem(2) is None and pred.finite_frames().all()
    for c2w, e in zip(pred.c2w, w2c):
        np.testing.assert_allclose(c2w[:3, :3] @ e[:, :3], np.eye(3), atol=1e-5)
        np.testing.assert_allclose(c2w[:3, :3] @ e[:, 3] + c2w[:3, 3], 0.0, atol=1e-5)
    np.testing.assert_allclose(pred.K[0], GEOMETRY.network_to_image_K(K), rtol=1e-5)


@pytest.mark.parametrize("backbone, reduction", [("pi3-tiny", "dense"), ("pi3-tiny", "spark3r"),
                                                 ("da3-small", "dense"), ("da3-small", "uniform")])
def test_mapper_maps_the_synthetic_stream(seq, backbone, reduction):
    bb = ModelBackbone.from_config(BackboneConfig(backbone=backbone, checkpoint="seeded", image_width=WIDTH,
                                                  reduction=reduction), 6, 3)
    assert bb.model.preset == backbone
    handle = getattr(bb.model, "accel_handle", None)
    assert handle is None if reduction == "dense" else handle.method == reduction
    cfg = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                       window=WindowConfig(window_size=6, window_stride=3, max_alignment_residual=10.0, min_inlier_fraction=0.0),
                       map=MapConfig(voxel_size=0.05, conf_percentile=0.0))
    mapper = Mapper(cfg, bb)
    results = []
    for i in range(12):
        mapper.offer(Frame(seq.images[i], int(seq.stamps_ns[i]), K=seq.K))  # camera_info K
        while (r := mapper.process_pending()) is not None:
            results.append(r)
    stats = mapper.stats
    assert stats.backbone_errors == 0, stats.last_backbone_error
    assert stats.windows == 3 and stats.windows_mapped == 3 and len(mapper.trajectory) == 12
    assert stats.map_points > 0 and all(np.isfinite(r.points_xyz).all() for r in results)


def test_pi3_window_without_camera_info_uses_the_fitted_focal(seq):
    bb = ModelBackbone.from_config(BackboneConfig(backbone="pi3-tiny", checkpoint="seeded", image_width=WIDTH), 6, 3)
    from spark3r.mapping.frames import Keyframe

    pred = bb.predict([Keyframe(i, int(seq.stamps_ns[i]), seq.images[i]) for i in range(4)])
    assert pred.shape_problem(4) is None and pred.depth.shape == (4, 98, 126)
    # The seeded network's point map is not a pinhole camera, but the fit still gives a focal
    # length for every frame, and K is a centred pinhole in keyframe pixels.
    assert np.isfinite(pred.K).all()
    np.testing.assert_allclose(pred.K[:, 0, 0], pred.K[:, 1, 1] * (128 / 126) / (96 / 98), rtol=1e-6)
    centre = GEOMETRY.network_to_image_K(np.array([[1.0, 0, 63.0], [0, 1.0, 49.0], [0, 0, 1]]))
    np.testing.assert_allclose(pred.K[:, :2, 2], np.broadcast_to(centre[:2, 2], (4, 2)), atol=1e-9)


# -- the ROS node ------------------------------------------------------------------------------

FRAMES = 16
WINDOW_OUTCOMES = ("windows_mapped", "windows_dropped_nonfinite", "windows_dropped_invalid",
                   "windows_rejected_alignment", "backbone_errors")


def window_counts(rec) -> dict:
    from test_mapping_node import diag

    return {k: diag(rec, k) for k in ("windows",) + WINDOW_OUTCOMES}


def outcomes(rec) -> int:
    """Windows whose result is known (mapped or dropped for a reason)."""
    counts = window_counts(rec)
    return sum(counts[k] for k in WINDOW_OUTCOMES)
SCENE_ARGS = ["--frames", str(FRAMES), "--height", "96", "--width", "128", "--seed", "4", "--fps", "10"]


@pytest.mark.ros
@pytest.mark.parametrize("backbone, reduction", [("da3-small", "spark3r"), ("pi3-tiny", "uniform")])
def test_mapping_node_maps_the_stream_with_the_backbone(ros_context, tmp_path, backbone, reduction):
    rclpy = pytest.importorskip("rclpy")
    from ros_helpers import ros_process, spin_until
    from spark3r_ros.demo import Recorder
    from test_mapping_node import diag, ros_params, settled

    params = {"backbone": backbone, "checkpoint": "seeded", "reduction": reduction, "image_width": WIDTH,
              "window_size": 4, "window_stride": 2, "min_parallax_px": 2.0, "map_publish_period": 0.0,
              "conf_percentile": 0.0, "conf_min": 0.0, "queue_depth": 32, "save_directory": str(tmp_path)}
    node = rclpy.create_node(f"test_backbone_recorder_{backbone.replace('-', '_')}", context=ros_context)
    rec = Recorder(node, "spark3r_mapping")
    try:
        with ros_process("spark3r_ros.mapping_node", "--ros-args", *ros_params(params)) as proc:
            assert spin_until(node, lambda: all(s.get_publisher_count() > 0 for s in rec.subs.values()), 90.0, proc), \
                proc.log_text()
            with ros_process("spark3r_ros.synthetic_camera", *SCENE_ARGS, "--rate", "8", "--image-topic", "/image",
                             "--camera-info-topic", "/camera_info", "--linger", "0.5") as cam:
                assert spin_until(node, lambda: not cam.running(), 60.0, proc), "camera did not finish"
            assert spin_until(node, settled(rec, FRAMES), 120.0, proc), f"node did not settle: {rec.diagnostics}"
            # The last window may still be running when the queue is empty: wait for its outcome.
            assert spin_until(node, lambda: window_counts(rec)["windows"] == outcomes(rec), 60.0, proc), rec.diagnostics
            log = proc.log_text()
        assert proc.popen.returncode == 0, log
    finally:
        node.destroy_node()
    counts = window_counts(rec)
    assert rec.diagnostics["backbone_error"] == "" and counts["backbone_errors"] == 0, log
    assert counts["windows"] >= 2 and counts["windows"] == outcomes(rec)
    assert counts["windows_mapped"] >= 1 and diag(rec, "map_points") > 0
    assert len(rec.messages["path"][-1].poses) == diag(rec, "trajectory_keyframes") >= 4
