"""ModelBackbone on vggt-tiny with seeded-v1 weights: preprocessing geometry, intrinsics mapped
back to keyframe pixels, and the patch-embedding cache giving exactly the uncached results."""
import numpy as np
import pytest
import torch

from spark3r.data.synthetic import render_sequence
from spark3r.mapping import BackboneConfig, Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig
from spark3r.mapping.frames import Keyframe
from spark3r.mapping.model_backbone import ModelBackbone, NetworkGeometry, network_geometry, preprocess, to_prediction
from spark3r.models import build_model
from spark3r.models.camera import extrinsics_intrinsics_to_pose_encoding
from spark3r.seeded import load_seeded_v1, seeded_v1

WIDTH = 126  # network input width: 9 patches, keeps the test fast


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The CI machine is small and shared; intra-op threads only add contention for a tiny model.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=18, height=96, width=128, seed=9, trajectory="orbit")


def seeded_tiny():
    """vggt-tiny with seeded-v1 weights; the FoV outputs are biased positive so that the decoded
    cameras are valid (random heads otherwise emit fov = 0, which the mapper rightly drops)."""
    model = load_seeded_v1(build_model("vggt-tiny", enable_point=False, enable_track=False))
    with torch.no_grad():
        fc2 = model.camera_head.pose_branch.fc2
        fc2.weight[7:] *= 0.01
        fc2.bias[7:] = 0.3
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return seeded_tiny()


def keyframes(seq, idx):
    return [Keyframe(i, int(seq.stamps_ns[i]), seq.images[i]) for i in idx]


def test_network_geometry_and_preprocess():
    g = network_geometry((480, 640), 518)
    assert g.network_hw == (392, 518) and g.box == (0.0, 0.0, 640.0, 480.0)
    tall = network_geometry((640, 480), 518)  # resized to 518x686, centre-cropped to 518x518
    assert tall.network_hw == (518, 518) and tall.resized_height == 686
    assert tall.box[3] - tall.box[1] == pytest.approx(640 * 518 / 686)
    assert (tall.box[1] + tall.box[3]) / 2 == pytest.approx(320.0)
    img = np.zeros((640, 480, 3), np.uint8)
    img[:, :, 0] = np.arange(640)[:, None] * 255 // 639  # red ramps down the rows
    x = preprocess(img, tall)
    assert x.shape == (3, 518, 518) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    # The crop is centred: the middle row of the network image shows the middle of the image.
    assert float(x[0, 259].mean()) == pytest.approx(0.5, abs=0.01)


def test_decoder_maps_intrinsics_and_poses_back_to_image_pixels():
    geometry = NetworkGeometry((96, 128), (98, 126), (0.0, 0.0, 128.0, 96.0), 98)
    rng = np.random.default_rng(0)
    S = 3
    q, _ = np.linalg.qr(rng.normal(size=(S, 3, 3)))
    q = q * np.sign(np.linalg.det(q))[:, None, None]
    w2c = np.concatenate([q, rng.normal(size=(S, 3, 1))], axis=2)
    K_net = np.array([[80.0, 0, 63.0], [0, 70.0, 49.0], [0, 0, 1]])
    enc = extrinsics_intrinsics_to_pose_encoding(torch.tensor(w2c), torch.tensor(np.repeat(K_net[None], S, 0)), (98, 126))
    out = {"pose_enc": enc[None].float(), "depth": torch.ones(1, S, 98, 126, 1), "depth_conf": torch.full((1, S, 98, 126), 2.0)}
    pred = to_prediction(build_model("vggt-tiny", device="meta").decode(out, geometry.network_hw), geometry)
    assert pred.shape_problem(S) is None and pred.finite_frames().all()
    for c2w, e in zip(pred.c2w, w2c):
        np.testing.assert_allclose(c2w[:3, :3] @ e[:, :3], np.eye(3), atol=1e-5)
        np.testing.assert_allclose(c2w[:3, :3] @ e[:, 3] + c2w[:3, 3], 0, atol=1e-5)
    sx, sy = 128 / 126, 96 / 98
    # A network pixel centre (u_n, v_n) is image point (sx (u_n + .5) - .5, sy (v_n + .5) - .5).
    u_n, v_n = 10.0, 30.0
    ray = np.linalg.inv(K_net) @ [u_n, v_n, 1]
    proj = pred.K[0] @ ray
    np.testing.assert_allclose(proj[:2] / proj[2], [sx * (u_n + 0.5) - 0.5, sy * (v_n + 0.5) - 0.5], atol=1e-4)
    assert pred.depth_box == geometry.box


def test_cache_gives_identical_predictions_and_stays_bounded(seq, model):
    cached = ModelBackbone(model, image_width=WIDTH, cache_max_frames=8)
    plain = ModelBackbone(model, image_width=WIDTH, cache_max_frames=0)
    first = cached.predict(keyframes(seq, range(0, 6)))
    assert cached.cache.misses == 6 and cached.cache.hits == 0
    window = keyframes(seq, range(3, 9))
    a, b = cached.predict(window), plain.predict(window)
    assert cached.cache.hits == 3 and len(cached.cache) == 8
    for name in ("c2w", "K", "depth", "conf"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.depth_box == b.depth_box and first.shape_problem(6) is None
    cached.forget([3, 4])
    assert len(cached.cache) == 6
    cached.reset()
    assert len(cached.cache) == 0


def test_mapper_results_do_not_depend_on_the_cache(seq, model):
    def run(cache_frames):
        cfg = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                           window=WindowConfig(window_size=6, window_stride=3, max_alignment_residual=10.0, min_inlier_fraction=0.0),
                           map=MapConfig(voxel_size=0.05))
        bb = ModelBackbone(model, image_width=WIDTH, cache_max_frames=cache_frames)
        m = Mapper(cfg, bb)
        results = []
        for i in range(12):
            m.offer(Frame(seq.images[i], int(seq.stamps_ns[i])))
            while (r := m.process_pending()) is not None:
                results.append(r)
        return m, bb, results

    m1, bb1, r1 = run(9)
    m2, _, r2 = run(0)
    assert len(r1) == len(r2) >= 2 and m1.stats.windows_dropped_nonfinite == 0
    assert bb1.cache.hits > 0 and len(bb1.cache) <= 6  # keyframes that left the window were forgotten
    for x, y in zip(m1.trajectory, m2.trajectory):
        np.testing.assert_array_equal(x.camera_to_map, y.camera_to_map)
    for x, y in zip(r1, r2):
        np.testing.assert_array_equal(x.points_xyz, y.points_xyz)
    np.testing.assert_array_equal(m1.voxel_map.points()[0], m2.voxel_map.points()[0])


def test_from_config_builds_seeded_models_and_refuses_bad_settings(seq):
    bb = ModelBackbone.from_config(BackboneConfig(backbone="vggt-tiny", checkpoint="seeded", image_width=WIDTH,
                                                  reduction="uniform", reduction_params={"ratio": 0.5}), 6, 3)
    assert bb.model.preset == "vggt-tiny" and bb.cache.max_frames == 9
    assert bb.model.accel_handle.method == "uniform"
    name = "camera_head.pose_branch.fc2.weight"
    torch.testing.assert_close(bb.model.state_dict()[name], seeded_v1(name, (9, 384)), rtol=0, atol=0)
    pred = bb.predict(keyframes(seq, range(4)))  # reduced attention runs through the same path
    assert pred.shape_problem(4) is None and pred.depth.shape == (4, 98, 126) and np.isfinite(pred.depth).all()
    with pytest.raises(ValueError, match="checkpoint is empty"):
        ModelBackbone.from_config(BackboneConfig(backbone="vggt-tiny"))
    with pytest.raises(ValueError, match="only supported on CUDA"):
        ModelBackbone.from_config(BackboneConfig(backbone="vggt-tiny", checkpoint="seeded", dtype="bfloat16"))
    with pytest.raises(ValueError, match="reduction method"):
        ModelBackbone.from_config(BackboneConfig(backbone="vggt-tiny", checkpoint="seeded", reduction="tome"))
    with pytest.raises(ValueError, match="preset"):
        ModelBackbone.from_config(BackboneConfig(backbone="vggt-huge", checkpoint="seeded"))
