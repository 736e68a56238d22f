"""``spark3r bench --quality``: method variants, the metrics against ``spark3r eval`` on the same
outputs, pose AUC on hand-made cases and the CLI's reports (seeded vggt-tiny, synthetic scenes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spark3r.bench.quality import (QualityConfig, parse_variants, quality_change, quality_table, run_quality,
                                   sequence_metrics, unproject_depth)
from spark3r.cli import main
from spark3r.eval.pose import pairwise_pose_errors, pose_auc

SIZE = (56, 70)


def test_method_variants():
    variants = parse_variants("dense, spark3r, spark3r:query_keep=4", {"spark3r": {"query_keep": 1}})
    assert [v.label for v in variants] == ["dense", "spark3r", "spark3r:query_keep=4"]
    assert variants[1].params == {"query_keep": 1} and variants[2].params == {"query_keep": 4}  # own value wins
    # common flags reach every variant of the method: the paper recipe refuses ours-only fields
    with pytest.raises(ValueError, match="recipe 'ours'"):
        parse_variants("spark3r:recipe=paper", {"spark3r": {"query_keep": 1}})
    assert parse_variants("spark3r:recipe=paper:temporal_group=10")[0].params == {"recipe": "paper", "temporal_group": 10}
    assert parse_variants("uniform:cell=1x2:ratio=0.5")[0].params == {"cell": (1, 2), "ratio": 0.5}
    for bad, match in (("bogus", "unknown reduction method"), ("spark3r:nope=1", "no parameter"),
                       ("spark3r:temporal_group=x", "temporal_group"), ("spark3r:recipe", "FIELD=VALUE"),
                       ("dense,dense", "twice"), ("", "at least one")):
        with pytest.raises(ValueError, match=match):
            parse_variants(bad)


def test_pose_auc_hand_made():
    rng = np.random.default_rng(0)
    gt = np.tile(np.eye(4), (5, 1, 1))
    gt[:, :3, 3] = rng.normal(size=(5, 3))
    r, t = pairwise_pose_errors(gt, gt)
    assert r.shape == (10,) and np.allclose(r, 0, atol=1e-5) and np.allclose(t, 0, atol=1e-5)
    assert pose_auc(r, t) == pytest.approx(1.0)
    # every pair 10 degrees off: below thresholds 11..30 -> 20 / 30
    assert pose_auc(np.full(10, 10.0), np.full(10, 2.0)) == pytest.approx(20 / 30)
    assert pose_auc(np.full(4, 1.0), np.array([np.nan, 40.0, 0.0, np.nan])) == pytest.approx((29 + 0 + 29 + 29) / 4 / 30)
    # scale and world frame do not matter
    scaled = gt.copy()
    scaled[:, :3, 3] *= 3.0
    assert pose_auc(*pairwise_pose_errors(scaled, gt)) == pytest.approx(1.0)


def _write_estimate(path, pred, seq, stride):
    import cv2

    from spark3r.data.io import format_stamp_ns, write_ply, write_tum_trajectory

    (path / "keyframes").mkdir(parents=True)
    write_tum_trajectory(path / "trajectory.tum", seq.stamps_ns, pred.c2w)
    write_ply(path / "map.ply", unproject_depth(pred.depth, pred.K, pred.c2w, stride))
    entries = []
    h, w = pred.depth.shape[1:]
    for stamp, depth in zip(seq.stamps_ns, pred.depth):
        name = format_stamp_ns(int(stamp))
        scale = float(depth.max()) / 65535
        cv2.imwrite(str(path / "keyframes" / f"{name}_depth.png"), np.round(depth / scale).astype(np.uint16))
        entries.append({"stamp": name, "stamp_ns": int(stamp), "depth_png": f"keyframes/{name}_depth.png",
                        "depth_scale": scale, "depth_box": [0.0, 0.0, float(w), float(h)]})
    (path / "keyframes.json").write_text(json.dumps({"keyframes": entries}))


def test_quality_metrics_agree_with_spark3r_eval(tmp_path):
    from spark3r.data.io import write_ply, write_tum_rgbd_folder
    from spark3r.eval.runner import evaluate

    cfg = QualityConfig(model="vggt-tiny", data="synthetic", frames=(5,), size=SIZE, methods="dense,spark3r:recipe=paper",
                        flops=False, cloud_stride=3)
    predictions = {}
    result = run_quality(cfg, predictions=predictions)
    entry = result["frame_counts"]["5"]
    assert set(entry["methods"]) == {"dense", "spark3r:recipe=paper"}
    for label in entry["methods"]:
        pred, seq = predictions[(5, label, 0)]
        bench = entry["methods"][label]["per_sequence"][0]
        assert bench == sequence_metrics(pred, seq, cfg.cloud_threshold, cfg.cloud_stride)
        est, gt_root = tmp_path / label / "estimate", tmp_path / label / "gt"
        _write_estimate(est, pred, seq, cfg.cloud_stride)
        gt_root.mkdir(parents=True)
        write_tum_rgbd_folder(seq, gt_root / "sequence")
        write_ply(gt_root / "reference.ply", unproject_depth(seq.depth, seq.K, seq.c2w, cfg.cloud_stride))
        report = evaluate(est, gt_root / "sequence", plots=False, cloud_threshold=cfg.cloud_threshold)
        traj = report["trajectory"]
        assert bench["ate_rmse"] == pytest.approx(traj["ate_m"]["rmse"], rel=1e-6)
        assert bench["rpe_translation_rmse"] == pytest.approx(traj["rpe"]["translation_m"]["rmse"], rel=1e-6)
        assert bench["rpe_rotation_deg_rmse"] == pytest.approx(traj["rpe"]["rotation_deg"]["rmse"], rel=1e-5)
        # depth: eval reads 16-bit PNGs (ground truth in 1/5000 m steps), the bench the floats
        assert report["depth"]["frames"] == 5
        assert bench["depth_abs_rel"] == pytest.approx(report["depth"]["abs_rel"], abs=2e-3)
        assert bench["depth_delta1"] == pytest.approx(report["depth"]["delta1"], abs=2e-2)
        # clouds: eval reads float32 PLY files
        assert bench["cloud_accuracy"] == pytest.approx(report["cloud"]["accuracy_mean"], rel=1e-4)
        assert bench["cloud_completeness"] == pytest.approx(report["cloud"]["completeness_mean"], rel=1e-4)
    dense_change = entry["methods"]["dense"]["change_vs_dense"]
    assert all(v == 0 for v in dense_change.values() if v is not None)
    paper = entry["methods"]["spark3r:recipe=paper"]
    assert paper["change_vs_dense"] == quality_change(paper["quality"], entry["methods"]["dense"]["quality"])


def test_quality_cli_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["bench", "--quality", "--model", "vggt-tiny", "--data", "synthetic", "--frame-counts", "3,4",
                 "--size", "28x42", "--methods",
                 "dense,spark3r:recipe=paper", "--out", str(out), "--table"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result["frame_counts"]) == {"3", "4"}
    for entry in result["frame_counts"].values():
        for label in ("dense", "spark3r:recipe=paper"):
            m = entry["methods"][label]
            assert m["speedup_vs_dense"] > 0 and m["cpu_time_speedup_vs_dense"] > 0
            assert m["flops"]["model"] > 0 and m["flop_speedup"] > 0
            assert set(m["quality"]) >= {"pose_auc_30", "ate_rmse", "depth_abs_rel", "cloud_accuracy"}
        assert entry["methods"]["dense"]["flop_speedup"] == 1.0
        assert entry["methods"]["spark3r:recipe=paper"]["flop_speedup"] > 1.0  # low-sensitivity layers: stride 3
    assert json.loads((out / "quality.json").read_text())["frame_counts"].keys() == result["frame_counts"].keys()
    assert "`spark3r:recipe=paper`" in (out / "quality.md").read_text() and "| frames |" in captured.err
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--quality", "--model", "vggt-tiny", "--frame-counts", "2", "--size", "28x42"]) == 2  # Sim(3) needs 3 poses
    assert "frame counts >= 3" in capsys.readouterr().err


def test_a_distilled_student_runs_beside_the_bench_model(tmp_path):
    """``speed3r:weights=DIR``: the vggt-nano-speed3r student written by ``spark3r distill`` runs its
    learned layer next to the training-free speed3r on the built-in vggt-nano."""
    from spark3r.distill.trainer import DistillConfig, distill

    student = tmp_path / "student"
    distill(DistillConfig(out=str(student), preset="vggt-nano-speed3r", frames=2, size=(28, 42), steps=1), progress=False)
    methods = f"dense,speed3r,speed3r:weights={student}"
    variants = parse_variants(methods, {"speed3r": {"top_k": 2}})
    assert [v.weights for v in variants] == [None, None, str(student)] and variants[2].params == {"top_k": 2}
    cfg = QualityConfig(model="vggt-nano", data="procedural", frames=(3,), size=(56, 70), methods=methods,
                        method_params={"speed3r": {"top_k": 1}}, flops=False)
    result = run_quality(cfg)
    entry = result["frame_counts"]["3"]["methods"]
    learned = entry[f"speed3r:weights={student}"]
    assert learned["model"]["preset"] == "vggt-nano-speed3r" and learned["model"]["weights"] == str(student)
    assert learned["model"]["description"] == "vggt-nano-speed3r, learned"
    assert entry["speed3r"]["model"]["description"] == "training-free" and entry["speed3r"]["model"]["preset"] == "vggt-nano"
    # top-1 of 2 key blocks: both variants are sparse and differ from dense and from each other
    assert learned["quality"] != entry["speed3r"]["quality"]
    table = quality_table(result)
    assert f"`speed3r:weights={student}` (vggt-nano-speed3r, learned)" in table and "`speed3r` (training-free)" in table


def test_a_student_of_another_model_is_refused(tmp_path):
    from spark3r.distill.trainer import DistillConfig, distill

    student = tmp_path / "student"
    distill(DistillConfig(out=str(student), preset="vggt-nano-speed3r", frames=2, size=(28, 42), steps=1), progress=False)
    cfg = QualityConfig(model="vggt-tiny", data="synthetic", frames=(3,), size=(28, 42),
                        methods=f"dense,speed3r:weights={student}", flops=False)
    with pytest.raises(ValueError, match="holds a vggt-nano-speed3r model, not the bench model vggt-tiny"):
        run_quality(cfg)
    with pytest.raises(ValueError, match="not a file or folder"):
        parse_variants(f"speed3r:weights={tmp_path / 'missing'}")
