"""spark3r eval metrics against hand-made cases (known association, alignment, ATE/RPE, depth and
cloud numbers), the plots, and the eval runner on TUM files."""
import json

import numpy as np
import pytest

from spark3r.data.io import write_tum_trajectory
from spark3r.eval.cloud import cloud_metrics
from spark3r.eval.depth import aggregate, frame_depth_metrics, sample_at_cells
from spark3r.eval.runner import evaluate
from spark3r.eval.trajectory import associate, evaluate_trajectory, relative_pose_errors
from spark3r.mapping.alignment import Sim3
from spark3r.mapping.testing import random_rotation

MS = 1_000_000


def line_poses(n, step=1.0):
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 0, 3] = step * np.arange(n)
    poses[:, 1, 3] = 0.3 * np.sin(np.arange(n))  # not collinear: the alignment rotation is unique
    return poses


# -- association ---------------------------------------------------------------------------------


def test_associate_nearest_one_to_one_within_max_diff():
    est = np.array([0, 100, 205, 290, 1000]) * MS
    gt = np.array([2, 98, 200, 210, 300]) * MS
    ei, gi = associate(est, gt, 20 * MS)
    assert ei.tolist() == [0, 1, 2, 3]
    assert gi.tolist() == [0, 1, 2, 4]  # 205 takes 200 (5 ms) not 210 (5 ms tie broken by order), 1000 has no partner
    # Two estimates competing for one ground-truth stamp: the closer one wins.
    ei, gi = associate(np.array([95, 101]) * MS, np.array([100]) * MS, 20 * MS)
    assert ei.tolist() == [1] and gi.tolist() == [0]
    ei, gi = associate(est, gt, 1 * MS)
    assert ei.size == 0
    with pytest.raises(ValueError, match="max_diff_ns"):
        associate(est, gt, -1)


# -- ATE / RPE ----------------------------------------------------------------------------------


def test_sim3_alignment_recovers_a_similarity_exactly():
    rng = np.random.default_rng(3)
    gt = line_poses(30)
    for p in gt:
        p[:3, :3] = random_rotation(rng)
    to_est = Sim3(0.37, random_rotation(rng), np.array([4.0, -2.0, 1.0]))
    est = to_est.apply_to_poses(gt)
    stamps = np.arange(30) * 100 * MS
    res = evaluate_trajectory(stamps + 3 * MS, est, stamps, gt, alignment="sim3")
    assert res.summary()["associated_poses"] == 30
    assert res.summary()["ate_m"]["rmse"] < 1e-9
    assert res.summary()["ate_rotation_deg"]["max"] < 1e-5
    assert res.alignment.scale == pytest.approx(1 / 0.37, rel=1e-9)
    assert res.summary()["rpe"]["translation_m"]["max"] < 1e-9
    # Rigid alignment cannot undo the scale: the error is large.
    se3 = evaluate_trajectory(stamps, est, stamps, gt, alignment="se3")
    assert se3.alignment.scale == 1.0 and se3.summary()["ate_m"]["rmse"] > 1.0


def test_ate_without_alignment_is_rms_of_known_offsets():
    gt = line_poses(4)
    offsets = np.array([[0.1, 0, 0], [0, 0.2, 0], [0, 0, -0.3], [0, 0, 0]])
    est = gt.copy()
    est[:, :3, 3] += offsets
    stamps = np.arange(4) * MS
    res = evaluate_trajectory(stamps, est, stamps, gt, alignment="none")
    expected = np.sqrt(np.mean(np.sum(offsets**2, axis=1)))
    assert res.summary()["ate_m"]["rmse"] == pytest.approx(expected, rel=1e-12)
    assert res.ate_errors == pytest.approx([0.1, 0.2, 0.3, 0.0])


def test_rpe_sees_one_jump_once():
    gt = np.tile(np.eye(4), (6, 1, 1))
    gt[:, 0, 3] = np.arange(6)
    est = gt.copy()
    est[3:, 1, 3] += 0.5  # a 0.5 m sideways jump between pose 2 and 3, consistent afterwards
    t, r = relative_pose_errors(est, gt, delta=1)
    assert t == pytest.approx([0, 0, 0.5, 0, 0])
    assert r == pytest.approx(np.zeros(5), abs=1e-6)
    # A 10 degree yaw jump shows up as rotation error only at that step.
    est = gt.copy()
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    est[4:, :3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    _, r = relative_pose_errors(est, gt, delta=1)
    assert r == pytest.approx([0, 0, 0, 10, 0], abs=1e-6)
    # Tiny angles are exact too (no arccos precision floor of ~1e-6 degrees).
    c, s = np.cos(np.radians(1e-7)), np.sin(np.radians(1e-7))
    est[4:, :3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    _, r = relative_pose_errors(est, gt, delta=1)
    assert r[3] == pytest.approx(1e-7, rel=1e-6) and r[2] == 0.0
    with pytest.raises(ValueError, match="delta"):
        relative_pose_errors(est, gt, delta=0)


def test_trajectory_errors_are_clear():
    gt = line_poses(5)
    stamps = np.arange(5) * 100 * MS
    with pytest.raises(ValueError, match="no estimate stamp is within"):
        evaluate_trajectory(stamps + 10**12, gt, stamps, gt)
    with pytest.raises(ValueError, match="at least 3"):
        evaluate_trajectory(stamps[:2], gt[:2], stamps, gt, alignment="se3")
    with pytest.raises(ValueError, match="alignment must be one of"):
        evaluate_trajectory(stamps, gt, stamps, gt, alignment="affine")


# -- depth ---------------------------------------------------------------------------------------


def test_depth_metrics_known_values():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1.0, 5.0, size=(20, 30))
    m = frame_depth_metrics(2.0 * gt, gt, scale="median")
    assert m["scale"] == pytest.approx(0.5) and m["abs_rel"] == pytest.approx(0, abs=1e-12) and m["delta1"] == 1.0
    m = frame_depth_metrics(2.0 * gt, gt, scale="none")
    assert m["abs_rel"] == pytest.approx(1.0) and m["delta1"] == 0.0
    pred = gt.copy()
    pred[:, :15] *= 1.3  # half the pixels 30 % too far: AbsRel 0.15, delta1 0.5
    pred[0, 0] = np.nan  # ignored
    gt_masked = gt.copy()
    gt_masked[1, 1] = 0.0  # no ground truth: ignored
    m = frame_depth_metrics(pred, gt_masked, scale=1.0)
    assert m["valid_pixels"] == 600 - 2
    assert m["abs_rel"] == pytest.approx((298 * 0.3) / 598)  # both ignored pixels were in the scaled half
    assert m["delta1"] == pytest.approx(300 / 598)
    assert frame_depth_metrics(np.zeros((2, 2)), np.ones((2, 2)))["valid_pixels"] == 0
    agg = aggregate([m, {"valid_pixels": 0}])
    assert agg["frames"] == 1 and agg["abs_rel"] == m["abs_rel"]
    with pytest.raises(ValueError, match="same shape"):
        frame_depth_metrics(np.ones((2, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="positive"):
        frame_depth_metrics(gt, gt, scale=-1.0)


def test_sample_at_cells_follows_the_depth_box():
    image = np.arange(12 * 16, dtype=float).reshape(12, 16)
    assert np.array_equal(sample_at_cells(image, (12, 16), (0, 0, 16, 12)), image)
    # A half-resolution grid over the full image samples every second pixel (nearest, rounded).
    half = sample_at_cells(image, (6, 8), (0, 0, 16, 12))
    assert half.shape == (6, 8) and np.all(np.isfinite(half))
    # A grid over a centre crop of rows 2..10 at full resolution.
    crop = sample_at_cells(image, (8, 16), (0, 2, 16, 10))
    assert np.array_equal(crop, image[2:10])


# -- clouds --------------------------------------------------------------------------------------


def test_cloud_metrics_known_values():
    g = np.stack(np.meshgrid(np.arange(20), np.arange(20), indexing="ij"), -1).reshape(-1, 2) * 0.1
    ref = np.column_stack([g, np.zeros(len(g))])
    shifted = ref + [0, 0, 0.01]
    m = cloud_metrics(shifted, ref, threshold=0.02)
    assert m["accuracy_mean"] == pytest.approx(0.01) and m["completeness_mean"] == pytest.approx(0.01)
    assert m["chamfer"] == pytest.approx(0.01) and m["fscore"] == pytest.approx(1.0)
    half = ref[ref[:, 0] < 0.95]  # the map covers half the surface, exactly
    m = cloud_metrics(half, ref, threshold=0.05)
    assert m["accuracy_mean"] == 0.0 and m["precision"] == 1.0
    assert m["recall"] == pytest.approx(0.5) and m["completeness_mean"] > 0.1
    with pytest.raises(ValueError, match="no finite points"):
        cloud_metrics(np.full((3, 3), np.nan), ref)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        cloud_metrics(np.zeros((3, 2)), ref)


# -- runner and plots ---------------------------------------------------------------------------


def test_evaluate_tum_files_writes_json_and_plots(tmp_path):
    rng = np.random.default_rng(1)
    gt = line_poses(25, step=0.2)
    stamps = 1_700_000_000 * 10**9 + np.arange(25) * 100 * MS
    est = Sim3(2.0, random_rotation(rng), np.ones(3)).apply_to_poses(gt)
    est[:, :3, 3] += rng.normal(scale=0.01, size=(25, 3))
    write_tum_trajectory(tmp_path / "gt.tum", stamps, gt)
    write_tum_trajectory(tmp_path / "est.tum", stamps + 5 * MS, est)
    report = evaluate(tmp_path / "est.tum", tmp_path / "gt.tum", out=tmp_path / "eval", alignment="sim3")
    ate = report["trajectory"]["ate_m"]["rmse"]
    assert 0.001 < ate < 0.02  # noise of 1 cm per axis in est units, scaled by 1/2 into gt units
    assert report["trajectory"]["alignment"]["scale"] == pytest.approx(0.5, rel=0.02)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["trajectory"]["ate_m"]["rmse"] == pytest.approx(ate)
    for name in ("trajectory_top.png", "errors.png"):
        data = (tmp_path / "eval" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "missing.tum", tmp_path / "gt.tum")
    with pytest.raises(ValueError, match="depth_scale"):
        evaluate(tmp_path / "est.tum", tmp_path / "gt.tum", depth_scale="mean")


# -- bench --stream ------------------------------------------------------------------------------


def test_stream_bench_cache_matches_naive_dense_and_reports_per_keyframe_cost():
    from spark3r.bench.stream import StreamBenchConfig, run_stream_bench

    cfg = StreamBenchConfig(window=4, stride=2, windows=2, methods=("dense", "uniform"), image_hw=(48, 64),
                            image_width=56, threads=1)
    result = run_stream_bench(cfg)
    pipes = result["pipelines"]
    assert set(pipes) == {"naive-dense", "dense", "uniform"}
    for name, p in pipes.items():
        assert len(p["window_s"]) == 2 and p["per_keyframe_s"] > 0
        assert p["per_keyframe_s"] == pytest.approx(float(np.median(p["window_s"])) / 2)
        assert p["encoder_cache"] is (name != "naive-dense")
    # The encoder cache changes nothing in the result; a reduction does (a little).
    assert pipes["dense"]["depth_median_rel_diff_vs_naive"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < pipes["uniform"]["depth_median_rel_diff_vs_naive"] < 0.5
    with pytest.raises(ValueError, match="stride"):
        StreamBenchConfig(window=4, stride=4)


def test_bench_stream_flag_runs_the_stream_bench(tmp_path, capsys):
    from spark3r.cli import main

    out = tmp_path / "stream.json"
    code = main(["bench", "--stream", "--window", "3", "--stride", "1", "--stream-windows", "1", "--image-width", "28",
                 "--methods", "dense", "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["config"]["window"] == 3 and set(result["pipelines"]) == {"naive-dense", "dense"}
    assert main(["bench", "--stream", "--window", "3", "--stride", "3"]) == 2  # stride must be < window


def _small_rotation(rng, sigma_rad):
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rng.normal(scale=sigma_rad, size=3)).as_matrix()
    return T


def test_agrees_with_evo_when_installed():
    """Cross-check with evo (not a dependency; skipped unless importable)."""
    metrics = pytest.importorskip("evo.core.metrics", reason="evo is not installed")
    from evo.core import sync
    from evo.core.trajectory import PoseTrajectory3D

    rng = np.random.default_rng(0)
    n = 40
    gt = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        gt[i, :3, :3] = random_rotation(rng)
        gt[i, :3, 3] = [3 * np.cos(i / 8), 2 * np.sin(i / 8), 0.1 * i]
    est = Sim3(0.4, random_rotation(rng), np.array([1.0, 2.0, 3.0])).apply_to_poses(gt)
    est[:, :3, 3] += rng.normal(scale=0.05, size=(n, 3))
    for pose in est:  # small rotation noise too, so the rotation RPE is not just rounding
        pose[:3, :3] = pose[:3, :3] @ Sim3.from_matrix(_small_rotation(rng, 0.02)).R
    stamps_s = 1e9 + 0.1 * np.arange(n)
    stamps_ns = np.round(stamps_s * 1e9).astype(np.int64)
    ref, other = sync.associate_trajectories(PoseTrajectory3D(poses_se3=list(gt), timestamps=stamps_s),
                                             PoseTrajectory3D(poses_se3=list(est), timestamps=stamps_s + 0.003), max_diff=0.01)
    other.align(ref, correct_scale=True)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, other))
    rpe = metrics.RPE(metrics.PoseRelation.rotation_angle_deg, delta=1, delta_unit=metrics.Unit.frames)
    rpe.process_data((ref, other))
    mine = evaluate_trajectory(stamps_ns + 3 * MS, est, stamps_ns, gt, alignment="sim3", max_diff_ns=10 * MS).summary()
    assert mine["ate_m"]["rmse"] == pytest.approx(ape.get_statistic(metrics.StatisticsType.rmse), rel=1e-9)
    assert mine["rpe"]["rotation_deg"]["rmse"] == pytest.approx(rpe.get_statistic(metrics.StatisticsType.rmse), rel=1e-9)
