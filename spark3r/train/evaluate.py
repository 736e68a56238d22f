"""Held-out evaluation of a reconstruction model on procedural scenes, with trivial baselines.

Windows: ``num_windows`` held-out scene seeds (:data:`spark3r.data.procedural.HELDOUT_SEED_LIMIT`),
``min_frames``..``max_frames`` frames each, rendered at the network width. Metrics per window:

* depth ``abs_rel`` = mean |s d - d*| / d* and ``delta_1_25`` = share of pixels with
  max(s d / d*, d* / (s d)) < 1.25, where ``s`` = median(d*) / median(d) over all the window's
  valid pixels (per-window median scaling: the network's scale is arbitrary);
* ``pose_auc_30``: VGGT's relative-pose AUC -- for every frame pair (i < j) the relative-rotation
  angle error and the relative-translation direction error (sign-ambiguous: min(e, 180 - e));
  a pair's error is the larger of the two; AUC = mean over thresholds 1..30 degrees of the share
  of pairs below it. Pairs whose ground-truth baseline is under ``min_baseline_m`` (a camera
  turning on the spot) have no defined direction and are scored on rotation only.

Baselines: ``median_depth`` (a constant depth, i.e. the window's ground-truth median after
scaling), ``identity`` poses (no rotation; translation direction undefined -> 90 degrees) and
``constant_velocity`` poses (the ground-truth motion from frame 0 to 1 repeated).
Metrics are averaged over windows (``mean``) and also reported per motion kind.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from spark3r.data.procedural import HELDOUT_SEED_LIMIT, render_procedural
from spark3r.eval.pose import pairwise_pose_errors, pose_auc

PATCH = 14


@dataclass(frozen=True)
class EvalConfig:
    num_windows: int = 16  # held-out sequences (seeds first_seed, first_seed + 1, ...)
    first_seed: int = 0
    min_frames: int = 8
    max_frames: int = 16
    width: int = 140  # network input width (multiple of 14)
    aspect: float = 0.75  # height / width, rounded to a multiple of 14
    min_baseline_m: float = 0.05

    def __post_init__(self) -> None:
        if not 1 <= self.num_windows <= 10000:
            raise ValueError(f"num_windows must be in [1, 10000], got {self.num_windows}")
        if not 0 <= self.first_seed and self.first_seed + self.num_windows <= HELDOUT_SEED_LIMIT:
            raise ValueError(f"held-out seeds must lie in [0, {HELDOUT_SEED_LIMIT}), got {self.first_seed}+{self.num_windows}")
        if not 2 <= self.min_frames <= self.max_frames <= 256:
            raise ValueError(f"frames must satisfy 2 <= min_frames <= max_frames <= 256, got {self.min_frames}..{self.max_frames}")
        if self.width < 2 * PATCH or self.width % PATCH:
            raise ValueError(f"width must be a multiple of {PATCH} >= {2 * PATCH}, got {self.width}")
        if not 0.2 <= self.aspect <= 2.0:
            raise ValueError(f"aspect must be in [0.2, 2], got {self.aspect}")

    @property
    def height(self) -> int:
        return max(PATCH, int(round(self.width * self.aspect / PATCH)) * PATCH)

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_windows(cfg: EvalConfig) -> list:
    """The held-out sequences of ``cfg`` (frame counts spread evenly over the range)."""
    out = []
    for k in range(cfg.num_windows):
        seed = cfg.first_seed + k
        frames = cfg.min_frames + (k * 7919) % (cfg.max_frames - cfg.min_frames + 1)
        out.append(render_procedural(seed, frames, cfg.height, cfg.width))
    return out


# ---------------------------------------------------------------------------------------------
# Metrics (numpy, float64)


def median_scaled_depth_errors(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """AbsRel and delta<1.25 of ``pred`` against ``gt`` ([S,H,W]) after one median scale."""
    valid = np.isfinite(gt) & (gt > 0) & np.isfinite(pred) & (pred > 0)
    if valid.sum() == 0:
        return {"abs_rel": float("nan"), "delta_1_25": float("nan")}
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    p = p * (np.median(g) / np.median(p))
    ratio = np.maximum(p / g, g / p)
    return {"abs_rel": float(np.mean(np.abs(p - g) / g)), "delta_1_25": float(np.mean(ratio < 1.25))}


def constant_velocity_c2w(gt_c2w: np.ndarray) -> np.ndarray:
    """Frame 0's pose followed by the 0 -> 1 ground-truth motion repeated (a motion model)."""
    step = np.linalg.inv(gt_c2w[0]) @ gt_c2w[1]
    out = [gt_c2w[0]]
    for _ in range(len(gt_c2w) - 1):
        out.append(out[-1] @ step)
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# Model and baselines over the held-out set


@torch.no_grad()
def predict_window(model, images_uint8: np.ndarray, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(depth [S,H,W], c2w [S,4,4]) predicted by a backbone ``model`` for uint8 images [S,H,W,3]
    (its own ``decode`` gives the common convention)."""
    x = torch.from_numpy(images_uint8).to(device).permute(0, 3, 1, 2).float() / 255.0
    dtype = next(model.parameters()).dtype
    out = model.decode(model(x.to(dtype), heads=("camera", "depth")), images_uint8.shape[1:3])
    return out.depth[0].float().cpu().numpy(), out.c2w[0].double().cpu().numpy()


def _window_metrics(depth_pred, c2w_pred, seq, min_baseline) -> dict[str, float]:
    d = median_scaled_depth_errors(depth_pred, seq.depth)
    r_err, t_err = pairwise_pose_errors(c2w_pred, seq.c2w, min_baseline)
    d["pose_auc_30"] = pose_auc(r_err, t_err)
    d["rot_err_deg"] = float(np.mean(r_err))
    return d


def evaluate_windows(windows: list, cfg: EvalConfig, model=None, device="cpu") -> dict:
    """Metrics of ``model`` (if given) and of the baselines over ``windows``."""
    rows: dict[str, list] = {"model": [], "median_depth": [], "identity": [], "constant_velocity": []}
    motions = []
    for seq in windows:
        motions.append(seq.trajectory)
        flat = np.full_like(seq.depth, 1.0)
        ident = np.repeat(np.eye(4)[None], len(seq), axis=0)
        if model is not None:
            depth_pred, c2w_pred = predict_window(model, seq.images, device)
            rows["model"].append(_window_metrics(depth_pred, c2w_pred, seq, cfg.min_baseline_m))
        rows["median_depth"].append(median_scaled_depth_errors(flat, seq.depth))
        rows["identity"].append(_window_metrics(flat, ident, seq, cfg.min_baseline_m))
        rows["constant_velocity"].append(_window_metrics(flat, constant_velocity_c2w(seq.c2w), seq, cfg.min_baseline_m))
    result = {"config": cfg.to_dict(), "windows": len(windows), "frames": int(sum(len(s) for s in windows))}
    for name, items in rows.items():
        if not items:
            continue
        keys = list(items[0])
        if name in ("identity", "constant_velocity"):
            keys = ["pose_auc_30", "rot_err_deg"]  # their depth is the median baseline's
        summary = {k: _mean([it[k] for it in items]) for k in keys}
        by_motion = {}
        for m in sorted(set(motions)):
            sel = [it for it, mm in zip(items, motions) if mm == m]
            by_motion[m] = {k: _mean([it[k] for it in sel]) for k in keys} | {"windows": len(sel)}
        result[name] = {"mean": summary, "by_motion": by_motion}
    return result


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def floor_check(result: dict) -> dict:
    """Whether the model is at least twice as good as the best trivial baseline on each metric
    (errors halved; for scores in [0, 1], the remaining gap to 1 halved) and whether it meets
    the issue's targets."""
    m = result.get("model", {}).get("mean")
    if not m:
        return {}
    base_abs_rel = result["median_depth"]["mean"]["abs_rel"]
    base_delta = result["median_depth"]["mean"]["delta_1_25"]
    base_auc = max(result["identity"]["mean"]["pose_auc_30"], result["constant_velocity"]["mean"]["pose_auc_30"])
    return {
        "floor_abs_rel": m["abs_rel"] <= base_abs_rel / 2,
        "floor_delta_1_25": (1 - m["delta_1_25"]) <= (1 - base_delta) / 2,
        "floor_pose_auc_30": (1 - m["pose_auc_30"]) <= (1 - base_auc) / 2,
        "target_abs_rel_0.10": m["abs_rel"] <= 0.10,
        "target_delta_0.90": m["delta_1_25"] >= 0.90,
        "target_pose_auc_0.70": m["pose_auc_30"] >= 0.70,
    }


def write_json(path, payload: dict) -> None:
    from pathlib import Path
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)
