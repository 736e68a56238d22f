"""Similarity transforms (Sim(3)) and their robust, weighted estimation from point pairs.

A :class:`Sim3` maps ``x -> scale * R @ x + t``. Applied to a camera-to-world pose ``[R_c | t_c]``
it gives ``[R R_c | scale R t_c + t]``: the pose stays rigid and the camera's depth scales by
``scale``. Estimation is Umeyama's closed form with per-pair weights, wrapped in iteratively
reweighted least squares (Cauchy weights on a robust residual scale) after a trimmed start, so a
minority of gross outliers does not pull the fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sim3:
    scale: float = 1.0
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @classmethod
    def from_matrix(cls, T: np.ndarray) -> "Sim3":
        """From a 4x4 ``[[s R, t], [0, 1]]``."""
        T = np.asarray(T, dtype=np.float64)
        if T.shape != (4, 4):
            raise ValueError(f"Sim3.from_matrix expects a 4x4 matrix, got shape {T.shape}")
        sR = T[:3, :3]
        s = float(np.cbrt(np.linalg.det(sR)))
        if not np.isfinite(s) or s <= 0:
            raise ValueError("Sim3.from_matrix: the 3x3 block has no positive scale (det <= 0)")
        return cls(s, sR / s, T[:3, 3].copy())

    def matrix(self) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = self.scale * self.R
        T[:3, 3] = self.t
        return T

    def inverse(self) -> "Sim3":
        Rt = self.R.T
        return Sim3(1.0 / self.scale, Rt, -(Rt @ self.t) / self.scale)

    def __matmul__(self, other: "Sim3") -> "Sim3":
        return Sim3(self.scale * other.scale, self.R @ other.R, self.scale * (self.R @ other.t) + self.t)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """``[..., 3]`` points."""
        return self.scale * (np.asarray(points) @ self.R.T) + self.t

    def apply_to_poses(self, c2w: np.ndarray) -> np.ndarray:
        """``[..., 4, 4]`` rigid camera-to-world poses -> rigid poses in the target frame."""
        c2w = np.asarray(c2w, dtype=np.float64)
        out = c2w.copy()
        out[..., :3, :3] = self.R @ c2w[..., :3, :3]
        out[..., :3, 3] = self.scale * (c2w[..., :3, 3] @ self.R.T) + self.t
        return out


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, with_scale: bool = True) -> Sim3:
    """Weighted least-squares similarity with ``dst ~ scale * R @ src + t``.

    ``src, dst``: ``[N, 3]``; ``weights``: ``[N]`` non-negative (uniform if None). Needs at least
    three non-collinear weighted points for a unique rotation (fewer give *a* minimiser).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(f"umeyama expects two [N, 3] arrays of equal shape, got {src.shape} and {dst.shape}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(src),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"umeyama weights must be [N={len(src)}] finite and >= 0")
    total = w.sum()
    if len(src) == 0 or total <= 0:
        raise ValueError("umeyama needs at least one point with positive weight")
    w = w / total
    mu_s = w @ src
    mu_d = w @ dst
    xs = src - mu_s
    xd = dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, D, Vt = np.linalg.svd(cov)
    sign = np.ones(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        sign[2] = -1.0
    R = (U * sign) @ Vt
    var_s = float(w @ np.sum(xs * xs, axis=1))
    if with_scale:
        if var_s <= 0:
            raise ValueError("umeyama: source points have no spread, the scale is undetermined")
        scale = float((D * sign).sum() / var_s)
        if scale <= 0:
            raise ValueError("umeyama: degenerate configuration (non-positive scale)")
    else:
        scale = 1.0
    t = mu_d - scale * (R @ mu_s)
    return Sim3(scale, R, t)


@dataclass(frozen=True)
class AlignmentResult:
    transform: Sim3
    residual_rms: float       # weighted RMS of the inlier residuals, in dst units
    inlier_fraction: float    # share of the input weight on inliers
    inliers: np.ndarray       # bool [N]
    iterations: int


def robust_sim3(
    src: np.ndarray,
    dst: np.ndarray,
    weights: np.ndarray | None = None,
    iterations: int = 20,
    hypotheses: int = 64,
    seed: int = 0,
    cauchy_c: float = 2.3849,
    inlier_sigmas: float = 3.0,
    min_sigma: float = 1e-9,
    with_scale: bool = True,
) -> AlignmentResult:
    """Confidence-weighted robust similarity ``dst ~ scale * R @ src + t``.

    Start: least median of squares over the plain weighted fit and ``hypotheses`` fits of random
    4-pair subsets (seeded, so results are reproducible; survives up to ~50 % outliers). Then IRLS:
    weights = prior weight x Cauchy(residual / (cauchy_c * sigma)), sigma = 1.4826 x weighted
    median residual (floored at ``min_sigma`` times the dst spread). Inliers are residuals below
    ``inlier_sigmas * sigma``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    prior = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    T = _least_median_start(src, dst, prior, hypotheses, seed, with_scale)
    spread = float(np.sqrt(np.mean(np.sum((dst - dst.mean(0)) ** 2, axis=1)))) or 1.0
    floor = min_sigma * spread
    it = 0
    for it in range(1, iterations + 1):
        r = np.linalg.norm(T.apply(src) - dst, axis=1)
        sigma = max(1.4826 * _weighted_median(r, prior), floor)
        w = prior / (1.0 + (r / (cauchy_c * sigma)) ** 2)
        T_new = umeyama(src, dst, w, with_scale)
        change = abs(np.log(T_new.scale / T.scale)) + np.linalg.norm(T_new.R - T.R) + np.linalg.norm(T_new.t - T.t) / spread
        T = T_new
        if change < 1e-10:
            break
    r = np.linalg.norm(T.apply(src) - dst, axis=1)
    sigma = max(1.4826 * _weighted_median(r, prior), floor)
    inliers = r <= inlier_sigmas * sigma
    wi = prior * inliers
    rms = float(np.sqrt((wi @ (r * r)) / wi.sum())) if wi.sum() > 0 else float("inf")
    frac = float(wi.sum() / prior.sum()) if prior.sum() > 0 else 0.0
    return AlignmentResult(T, rms, frac, inliers, it)


_PROBE_PAIRS = 1000


def _least_median_start(src, dst, prior, hypotheses: int, seed: int, with_scale: bool) -> Sim3:
    best = umeyama(src, dst, prior, with_scale)
    usable = np.flatnonzero(prior > 0)
    if len(usable) < 8 or hypotheses <= 0:
        return best
    rng = np.random.default_rng(seed)
    # Hypotheses are scored on a fixed subsample: a median is well estimated from ~1000 pairs.
    probe = usable if len(usable) <= _PROBE_PAIRS else rng.choice(usable, size=_PROBE_PAIRS, replace=False)
    src_p, dst_p, w_p = src[probe], dst[probe], prior[probe]
    best_score = _weighted_median(np.linalg.norm(best.apply(src_p) - dst_p, axis=1), w_p)
    p = prior[usable] / prior[usable].sum()
    for _ in range(hypotheses):
        pick = rng.choice(usable, size=4, replace=False, p=p)
        try:
            T = umeyama(src[pick], dst[pick], None, with_scale)
        except ValueError:
            continue
        score = _weighted_median(np.linalg.norm(T.apply(src_p) - dst_p, axis=1), w_p)
        if score < best_score:
            best, best_score = T, score
    return best


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    if cw[-1] <= 0:
        return float(np.median(values))
    return float(values[order][np.searchsorted(cw, 0.5 * cw[-1])])
