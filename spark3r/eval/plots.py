"""PNG plots of a trajectory evaluation (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spark3r.eval.trajectory import TrajectoryResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on robots / CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    from spark3r.data.io import atomic_write

    path = Path(path)
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=80)
    return path


def plot_trajectory_top_view(result: TrajectoryResult, path, title: str = "") -> Path:
    """Ground truth (grey line) and the aligned estimate coloured by its ATE, seen from above (x-y)."""
    plt = _pyplot()
    gt, est = result.gt[:, :3, 3], result.est_aligned[:, :3, 3]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    try:
        ax.plot(gt[:, 0], gt[:, 1], "-", color="0.6", lw=1.5, label="ground truth")
        ax.plot(est[:, 0], est[:, 1], "-", color="0.2", lw=0.6, alpha=0.5)
        points = ax.scatter(est[:, 0], est[:, 1], c=result.ate_errors, cmap="viridis", s=14, label="estimate (aligned)")
        fig.colorbar(points, ax=ax, label="ATE [m]")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("x [m]")
        ax.set_ylabel("y [m]")
        rmse = float(np.sqrt(np.mean(result.ate_errors**2)))
        ax.set_title(title or f"trajectory, top view (ATE RMSE {rmse:.3g} m, scale {result.alignment.scale:.3g})", fontsize=9)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_errors_over_time(result: TrajectoryResult, path) -> Path:
    """ATE and RPE (translation) against time since the first associated pose."""
    plt = _pyplot()
    t = (result.stamps_ns - result.stamps_ns[0]) / 1e9
    fig, ax = plt.subplots(figsize=(6, 3))
    try:
        ax.plot(t, result.ate_errors, "-o", ms=2.5, label="ATE [m]")
        if len(result.rpe_translation):
            ax.plot(t[result.rpe_delta:], result.rpe_translation, "-s", ms=2.5,
                    label=f"RPE translation, {result.rpe_delta} pose(s) [m]")
        ax.set_xlabel("time [s]")
        ax.set_ylabel("error [m]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_map_top_view(xyz: np.ndarray, colors, path, *, trajectory: np.ndarray | None = None,
                      ground_truth: np.ndarray | None = None, title: str = "", max_points: int = 60000) -> Path:
    """A rendered top view (x-y) of a point map: points drawn in their colours (``colors`` uint8
    [N,3] or None = height-coded), lower points first so the upper surfaces stay visible; camera
    centres ``trajectory`` [M,3] (and ``ground_truth`` [M,3]) on top."""
    plt = _pyplot()
    xyz = np.asarray(xyz, dtype=np.float64)
    step = max(1, len(xyz) // max_points)
    pts = xyz[::step]
    order = np.argsort(pts[:, 2])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    try:
        if colors is not None:
            c = np.asarray(colors)[::step][order] / 255.0
            ax.scatter(pts[order, 0], pts[order, 1], c=c, s=1.5, lw=0)
        else:
            ax.scatter(pts[order, 0], pts[order, 1], c=pts[order, 2], cmap="viridis", s=1.5, lw=0)
        if ground_truth is not None:
            ax.plot(ground_truth[:, 0], ground_truth[:, 1], "-", color="0.5", lw=1.5, label="ground-truth cameras")
        if trajectory is not None:
            ax.plot(trajectory[:, 0], trajectory[:, 1], "-o", color="crimson", ms=2.5, lw=1.0, label="keyframes")
        if trajectory is not None or ground_truth is not None:
            ax.legend(loc="best", fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(title or f"map, top view ({len(xyz)} points)", fontsize=9)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)
