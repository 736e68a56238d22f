"""``spark3r eval``: an estimate (a ``spark3r map`` output folder or a TUM trajectory file)
against ground truth (a TUM RGB-D folder with groundtruth.txt, or a TUM trajectory file).

Trajectory ATE/RPE always; depth metrics when the estimate has ``keyframes.json`` and the
ground truth folder has depth; cloud metrics when a reference cloud is given (or the ground
truth folder's parent holds ``reference.ply``, as benchmark sequences do) and the estimate has
``map.ply``. The map is brought into the ground truth's frame with the trajectory alignment.
Writes ``eval.json`` and two PNG plots into ``out``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from spark3r.data import strict_json
from spark3r.data.io import atomic_write, read_ply, read_tum_trajectory
from spark3r.eval.cloud import cloud_metrics
from spark3r.eval.depth import aggregate, frame_depth_metrics, sample_at_cells
from spark3r.eval.trajectory import evaluate_trajectory

DEPTH_SCALES = ("median", "trajectory", "none")


def _estimate_paths(estimate: Path) -> dict:
    if estimate.is_file():
        return {"trajectory": estimate}
    if not estimate.is_dir():
        raise FileNotFoundError(f"estimate {estimate} does not exist")
    paths = {"trajectory": estimate / "trajectory.tum", "map": estimate / "map.ply", "keyframes": estimate / "keyframes.json",
             "report": estimate / "report.json"}
    if not paths["trajectory"].is_file():
        raise ValueError(f"{estimate} is not a spark3r map output (no trajectory.tum)")
    return {k: p for k, p in paths.items() if p.exists()}


def _ground_truth_trajectory(gt: Path) -> Path:
    if gt.is_dir():
        if not (gt / "groundtruth.txt").is_file():
            raise ValueError(f"ground-truth folder {gt} has no groundtruth.txt (expected a TUM RGB-D folder)")
        return gt / "groundtruth.txt"
    if not gt.is_file():
        raise FileNotFoundError(f"ground truth {gt} does not exist")
    return gt


def _depth_eval(keyframes_json: Path, gt_dir: Path, scale_mode: str, trajectory_scale: float, max_diff_ns: int) -> dict:
    import cv2

    from spark3r.data.io import TUM_DEPTH_FACTOR, read_file_list

    listing = json.loads(keyframes_json.read_text(encoding="utf-8"))["keyframes"]
    depth_list = read_file_list(gt_dir / "depth.txt")
    gt_stamps = np.array([s for s, _ in depth_list], dtype=np.int64)
    scale = {"median": "median", "none": "none", "trajectory": trajectory_scale}[scale_mode]
    per_frame = []
    for kf in listing:
        if "depth_png" not in kf:
            continue
        k = int(np.argmin(np.abs(gt_stamps - kf["stamp_ns"])))
        if abs(int(gt_stamps[k]) - kf["stamp_ns"]) > max_diff_ns:
            continue
        raw = cv2.imread(str(keyframes_json.parent / kf["depth_png"]), cv2.IMREAD_UNCHANGED)
        gt_raw = cv2.imread(str(gt_dir / depth_list[k][1]), cv2.IMREAD_UNCHANGED)
        if raw is None or gt_raw is None:
            raise ValueError(f"cannot read depth of keyframe {kf['stamp']} ({kf['depth_png']} / {depth_list[k][1]})")
        pred = np.where(raw > 0, raw * kf["depth_scale"], np.nan)
        gt = sample_at_cells(gt_raw / TUM_DEPTH_FACTOR, pred.shape, kf["depth_box"])
        metrics = frame_depth_metrics(pred, gt, scale=scale)
        metrics["stamp"] = kf["stamp"]
        per_frame.append(metrics)
    return {"scale_mode": scale_mode, **aggregate(per_frame), "per_frame": per_frame}


def evaluate(estimate, ground_truth, out=None, alignment: str = "sim3", max_diff_s: float = 0.02, rpe_delta: int = 1,
             depth_scale: str = "median", reference_cloud=None, cloud_threshold: float = 0.05, plots: bool = True) -> dict:
    """Evaluate and (if ``out``) write ``eval.json`` + ``trajectory_top.png`` + ``errors.png``."""
    if depth_scale not in DEPTH_SCALES:
        raise ValueError(f"depth_scale must be one of {DEPTH_SCALES}, got {depth_scale!r}")
    if not (np.isfinite(max_diff_s) and max_diff_s >= 0):
        raise ValueError(f"--max-diff must be a non-negative number of seconds, got {max_diff_s!r}")
    estimate, ground_truth = Path(estimate), Path(ground_truth)
    est_paths = _estimate_paths(estimate)
    max_diff_ns = int(round(max_diff_s * 1e9))
    est_stamps, est_poses = read_tum_trajectory(est_paths["trajectory"])
    gt_stamps, gt_poses = read_tum_trajectory(_ground_truth_trajectory(ground_truth))
    if len(est_stamps) == 0:
        raise ValueError(f"estimate trajectory {est_paths['trajectory']} has no poses (did the mapper map anything?)")
    result = evaluate_trajectory(est_stamps, est_poses, gt_stamps, gt_poses, alignment, max_diff_ns, rpe_delta)
    report = {"estimate": str(estimate), "ground_truth": str(ground_truth), "alignment_method": alignment,
              "max_diff_s": max_diff_s, "trajectory": result.summary()}
    if "report" in est_paths:
        map_report = json.loads(est_paths["report"].read_text(encoding="utf-8"))
        report["map_run_complete"] = bool(map_report.get("complete", False))
    if "keyframes" in est_paths and ground_truth.is_dir() and (ground_truth / "depth.txt").is_file():
        report["depth"] = _depth_eval(est_paths["keyframes"], ground_truth, depth_scale, result.alignment.scale, max_diff_ns)
    if reference_cloud is None and ground_truth.is_dir() and (ground_truth.parent / "reference.ply").is_file():
        reference_cloud = ground_truth.parent / "reference.ply"
    if reference_cloud is not None and "map" in est_paths:
        estimate_xyz = read_ply(est_paths["map"]).xyz
        reference_xyz = read_ply(reference_cloud).xyz
        report["cloud"] = {"reference": str(reference_cloud),
                           **cloud_metrics(result.alignment.apply(estimate_xyz), reference_xyz, cloud_threshold)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            from spark3r.eval.plots import plot_errors_over_time, plot_trajectory_top_view

            report["plots"] = {"trajectory_top": str(plot_trajectory_top_view(result, out / "trajectory_top.png")),
                               "errors": str(plot_errors_over_time(result, out / "errors.png"))}
        with atomic_write(out / "eval.json", "w") as fh:
            strict_json.dump(report, fh, indent=1)
    return report
