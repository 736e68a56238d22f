"""Mapper + ground-truth test double on synthetic scenes: each window comes back in its own
random similarity frame; the stitched trajectory and map must match ground truth after ONE
global similarity, the map frame must follow REP-103, and save() must write PLY + TUM."""
import numpy as np
import pytest
from scipy.spatial import cKDTree

from spark3r.data.io import read_ply, read_tum_trajectory
from spark3r.data.synthetic import render_sequence
from spark3r.mapping import (OPTICAL_IN_BODY, Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig,
                             umeyama)
from spark3r.mapping.testing import GroundTruthBackbone


@pytest.fixture(scope="module", params=["orbit", "forward"])
def seq(request):
    return render_sequence(num_frames=60, height=96, width=128, seed=7, trajectory=request.param)


def config(voxel_size=0.002, **map_overrides):
    return MapperConfig(
        keyframe=KeyframeConfig(min_parallax_px=4.0, max_time_gap_s=1.0),
        window=WindowConfig(window_size=8, window_stride=4),
        map=MapConfig(voxel_size=voxel_size, **map_overrides),
    )


def run(mapper, seq, with_intrinsics=True):
    results = []
    for i in range(len(seq)):
        mapper.offer(Frame(seq.images[i], int(seq.stamps_ns[i]), seq.K if with_intrinsics else None))
        while (r := mapper.process_pending()) is not None:
            results.append(r)
    return results + mapper.flush()


def gt_index(bb, traj):
    return np.array([bb.frame_of_stamp[k.stamp_ns] for k in traj])


def global_alignment(seq, bb, traj):
    """Similarity map -> world from camera centres, and the ATE after it."""
    est = np.stack([k.camera_to_map for k in traj])
    gt = seq.c2w[gt_index(bb, traj)]
    S = umeyama(est[:, :3, 3], gt[:, :3, 3])
    ate = np.sqrt(np.mean(np.sum((S.apply(est[:, :3, 3]) - gt[:, :3, 3]) ** 2, axis=1)))
    rot_err = max(np.degrees(np.arccos(np.clip((np.trace((S.R @ e[:3, :3]).T @ g[:3, :3]) - 1) / 2, -1, 1)))
                  for e, g in zip(est, gt))
    return S, ate, rot_err


def surface_tree(seq):
    pts = np.concatenate([seq.world_points(i).reshape(-1, 3) for i in range(len(seq))])
    cols = seq.images.reshape(-1, 3)
    return cKDTree(pts), cols


@pytest.mark.parametrize("depth_stride", [1, 3])
def test_stitched_trajectory_and_points_match_ground_truth(seq, depth_stride):
    bb = GroundTruthBackbone(seq, seed=11, depth_stride=depth_stride)
    mapper = Mapper(config(), bb, base_to_camera=seq.base_to_camera)
    results = run(mapper, seq)
    traj = mapper.trajectory
    st = mapper.stats
    assert st.windows == len(bb.window_frames) >= 4 and st.windows_mapped == st.windows
    assert len(traj) == st.keyframes >= 12
    # Windows really were in different frames: scales differ by more than rounding.
    assert np.ptp([np.log(t.scale) for t in bb.window_transforms]) > 0.1
    S, ate, rot_err = global_alignment(seq, bb, traj)
    assert ate < 1e-3 * seq.scene_extent and rot_err < 0.01
    assert st.max_residual < 1e-4
    # Points of every window land on the true surfaces and carry the image colour found there.
    tree, cols = surface_tree(seq)
    xyz = S.apply(np.concatenate([r.points_xyz for r in results]).astype(np.float64))
    rgb = np.concatenate([r.points_rgb for r in results])
    dist, nearest = tree.query(xyz)
    assert len(xyz) > 1000
    assert np.percentile(dist, 99) < 1e-3 * seq.scene_extent
    assert np.mean(np.all(rgb == cols[nearest], axis=1)) > 0.98
    # The voxel map (means within 2 mm voxels, in map units) is on the surfaces too.
    vox, _ = mapper.voxel_map.points()
    vdist, _ = tree.query(S.apply(vox.astype(np.float64)))
    assert len(vox) > 1000 and np.percentile(vdist, 95) < 0.01 * seq.scene_extent


def test_noisy_windows_still_stitch_within_one_percent(seq):
    bb = GroundTruthBackbone(seq, seed=12, rotation_noise_deg=0.2, translation_noise=0.002, depth_noise=0.01)
    mapper = Mapper(config(), bb, base_to_camera=seq.base_to_camera)
    run(mapper, seq)
    _, ate, _ = global_alignment(seq, bb, mapper.trajectory)
    assert mapper.stats.windows_mapped == mapper.stats.windows
    assert ate < 0.01 * seq.scene_extent


def test_map_frame_is_first_base_link_when_extrinsic_known(seq):
    bb = GroundTruthBackbone(seq, seed=13)
    mapper = Mapper(config(), bb, base_to_camera=seq.base_to_camera)
    run(mapper, seq)
    traj = mapper.trajectory
    np.testing.assert_allclose(traj[0].base_to_map, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(traj[0].camera_to_map, seq.base_to_camera, atol=1e-9)
    for k in traj:
        np.testing.assert_allclose(k.base_to_map @ seq.base_to_camera, k.camera_to_map, atol=1e-9)
    # map -> world is the first base pose (rotation exactly; translation up to the map's unit).
    S, _, _ = global_alignment(seq, bb, traj)
    first = gt_index(bb, traj)[0]
    np.testing.assert_allclose(S.R, seq.base_c2w[first][:3, :3], atol=1e-6)


def test_map_frame_without_extrinsic_is_first_camera_in_rep103(seq):
    bb = GroundTruthBackbone(seq, seed=14)
    mapper = Mapper(config(), bb)
    run(mapper, seq)
    traj = mapper.trajectory
    np.testing.assert_allclose(traj[0].camera_to_map, OPTICAL_IN_BODY, atol=1e-9)
    # The camera looks along map +x; image "down" (optical +y) is map -z.
    np.testing.assert_allclose(traj[0].camera_to_map[:3, :3] @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(traj[0].camera_to_map[:3, :3] @ [0, 1, 0], [0, 0, -1], atol=1e-12)
    _, ate, _ = global_alignment(seq, bb, traj)
    assert ate < 1e-3 * seq.scene_extent


def test_missing_intrinsics_use_the_backbones(seq):
    bb = GroundTruthBackbone(seq, seed=15)
    mapper = Mapper(config(), bb, base_to_camera=seq.base_to_camera)
    run(mapper, seq, with_intrinsics=False)
    st = mapper.stats
    assert st.frames_missing_intrinsics == st.keyframes > 0
    assert all(np.allclose(k.K, seq.K) for k in mapper.trajectory)
    _, ate, _ = global_alignment(seq, bb, mapper.trajectory)
    assert ate < 1e-3 * seq.scene_extent


def test_save_writes_ply_and_tum(seq, tmp_path):
    bb = GroundTruthBackbone(seq, seed=16)
    mapper = Mapper(config(voxel_size=0.01, max_map_points=5000), bb, base_to_camera=seq.base_to_camera)
    run(mapper, seq)
    paths = mapper.save(tmp_path / "out")
    cloud = read_ply(paths["map"])
    xyz, rgb = mapper.voxel_map.points()
    assert len(xyz) == 5000  # capped by max_map_points
    np.testing.assert_allclose(cloud.xyz, xyz, atol=1e-6)
    np.testing.assert_array_equal(cloud.rgb, rgb)
    stamps, poses = read_tum_trajectory(paths["trajectory"])
    traj = mapper.trajectory
    np.testing.assert_array_equal(stamps, [k.stamp_ns for k in traj])
    np.testing.assert_allclose(poses, np.stack([k.camera_to_map for k in traj]), atol=1e-6)


def test_static_camera_maps_only_on_the_time_gap_and_stays_put():
    seq = render_sequence(num_frames=30, height=60, width=80, seed=3, trajectory="static")
    cfg = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=4.0, max_time_gap_s=0.5),
                       window=WindowConfig(window_size=4, window_stride=2), map=MapConfig(voxel_size=0.01))
    mapper = Mapper(cfg, GroundTruthBackbone(seq, seed=17), base_to_camera=seq.base_to_camera)
    run(mapper, seq)
    st = mapper.stats
    assert st.decisions == {"first": 1, "max_time_gap": 5, "low_parallax": 24}
    traj = mapper.trajectory
    assert len(traj) == 6 and st.windows_mapped == st.windows >= 2
    for k in traj:  # every keyframe is the first one: identity motion in the map
        np.testing.assert_allclose(k.base_to_map, np.eye(4), atol=1e-6)
