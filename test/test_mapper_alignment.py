"""Sim(3) algebra and the robust, weighted Umeyama/IRLS estimator on hand-made cases."""
import numpy as np
import pytest

from spark3r.mapping.alignment import Sim3, robust_sim3, umeyama
from spark3r.mapping.testing import random_rotation


def _case(seed=0, n=200, scale=2.5):
    rng = np.random.default_rng(seed)
    T = Sim3(scale, random_rotation(rng), rng.normal(size=3) * 3)
    src = rng.normal(size=(n, 3)) * [2.0, 1.0, 0.5]
    return rng, T, src, T.apply(src)


def _assert_close(A: Sim3, B: Sim3, tol=1e-9):
    assert A.scale == pytest.approx(B.scale, rel=tol, abs=tol)
    np.testing.assert_allclose(A.R, B.R, atol=tol)
    np.testing.assert_allclose(A.t, B.t, atol=tol * 10)


def test_sim3_matrix_inverse_compose_and_pose_application():
    rng, T, src, dst = _case()
    _assert_close(Sim3.from_matrix(T.matrix()), T)
    np.testing.assert_allclose((T @ T.inverse()).matrix(), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(T.matrix() @ np.append(src[0], 1.0), np.append(dst[0], 1.0), atol=1e-12)
    pose = np.eye(4)
    pose[:3, :3] = random_rotation(rng)
    pose[:3, 3] = src[1]
    moved = T.apply_to_poses(pose)
    # Still rigid, camera centre moved like a point, a point seen at depth d is now at depth s*d.
    np.testing.assert_allclose(moved[:3, :3].T @ moved[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(moved[:3, 3], T.apply(src[1]), atol=1e-12)
    p_cam = np.array([0.1, -0.2, 1.5])
    p_world_after = T.apply(pose[:3, :3] @ p_cam + pose[:3, 3])
    np.testing.assert_allclose(moved[:3, :3] @ (T.scale * p_cam) + moved[:3, 3], p_world_after, atol=1e-12)


def test_umeyama_recovers_exact_similarity_and_rigid_mode():
    _, T, src, dst = _case(seed=1)
    _assert_close(umeyama(src, dst), T, tol=1e-9)
    rigid = Sim3(1.0, T.R, T.t)
    assert umeyama(src, rigid.apply(src), with_scale=False).scale == 1.0
    _assert_close(umeyama(src, rigid.apply(src), with_scale=False), rigid, tol=1e-9)


def test_umeyama_weights_select_the_weighted_subset():
    rng, T, src, dst = _case(seed=2)
    other = Sim3(0.5, random_rotation(rng), np.zeros(3))
    dst = dst.copy()
    dst[100:] = other.apply(src[100:])
    w = np.r_[np.ones(100), np.zeros(100)]
    _assert_close(umeyama(src, dst, w), T, tol=1e-9)


@pytest.mark.parametrize("outlier_fraction", [0.2, 0.4])
def test_robust_sim3_rejects_gross_outliers(outlier_fraction):
    rng, T, src, dst = _case(seed=3, n=400)
    dst = dst + rng.normal(scale=1e-3, size=dst.shape)
    bad = rng.random(len(src)) < outlier_fraction
    # Gross and systematic (a second, wrong surface), so plain least squares is visibly biased.
    dst[bad] = 1.6 * dst[bad] + np.array([3.0, -2.0, 1.0]) + rng.normal(scale=1.0, size=(bad.sum(), 3))
    plain = umeyama(src, dst)
    fit = robust_sim3(src, dst)
    assert abs(np.log(plain.scale / T.scale)) > 0.01  # the outliers really do bias least squares
    assert fit.transform.scale == pytest.approx(T.scale, rel=2e-3)
    np.testing.assert_allclose(fit.transform.R, T.R, atol=2e-3)
    assert fit.residual_rms < 5e-3
    # Inliers found are (almost exactly) the clean pairs.
    assert np.mean(fit.inliers[~bad]) > 0.97 and np.mean(fit.inliers[bad]) < 0.05
    assert fit.inlier_fraction == pytest.approx(np.mean(fit.inliers))


def test_robust_sim3_confidence_weights_downweight_bad_pairs():
    rng, T, src, dst = _case(seed=4, n=300)
    dst = dst.copy()
    dst[:150] += rng.normal(scale=0.5, size=(150, 3))  # half the pairs are noisy ...
    w = np.r_[np.full(150, 1e-3), np.ones(150)]         # ... and have low confidence
    fit = robust_sim3(src, dst, w)
    assert fit.transform.scale == pytest.approx(T.scale, rel=1e-6)


def test_degenerate_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        umeyama(np.zeros((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="no spread"):
        umeyama(np.ones((5, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="positive weight"):
        umeyama(np.eye(3), np.eye(3), np.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        umeyama(np.eye(3), np.eye(3), np.array([1.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="positive scale"):
        Sim3.from_matrix(np.diag([-1.0, 1.0, 1.0, 1.0]))
