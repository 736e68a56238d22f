"""Rigid-transform math shared by the core and the ROS layer (numpy only, no ROS).

Conventions used everywhere in the project:

* A transform ``T`` is a 4x4 homogeneous matrix; ``T_a_b`` maps points from frame ``b`` into
  frame ``a`` (``p_a = T_a_b @ p_b``), which is also the pose of ``b`` expressed in ``a``.
* Quaternions are ordered ``(x, y, z, w)`` like ROS messages (not ``w, x, y, z`` like
  transforms3d), are unit length, and are returned with ``w >= 0`` so that the same rotation
  always gives the same four numbers.
"""
from __future__ import annotations

import numpy as np

# Default tolerance for "is this rotation orthonormal": loose enough for float32 round trips
# through messages and model outputs, tight enough to catch a similarity scale of 1.001.
RIGID_TOLERANCE = 1e-4


def _as_float_array(value, name: str, trailing_shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape[arr.ndim - len(trailing_shape):] != trailing_shape or arr.ndim < len(trailing_shape):
        expected = "[..., " + ", ".join(map(str, trailing_shape)) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def quat_xyzw_to_matrix(quat) -> np.ndarray:
    """Unit quaternion(s) ``[..., 4]`` in x, y, z, w order -> rotation matrices ``[..., 3, 3]``.

    Inputs are normalised first (messages carry float rounding); a zero-length quaternion is an
    error rather than a silent identity.
    """
    q = _as_float_array(quat, "quaternion", (4,))
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norm < 1e-9):
        raise ValueError("quaternion has (near) zero length; expected a unit quaternion x, y, z, w")
    x, y, z, w = np.moveaxis(q / norm, -1, 0)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = [
        [1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy)],
        [2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx)],
        [2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy)],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_quat_xyzw(rotation) -> np.ndarray:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` (x, y, z, w), ``w >= 0``.

    Uses the largest of the four candidate denominators per matrix, so it stays accurate near
    180-degree rotations where the trace-based formula loses all precision.
    """
    R = _as_float_array(rotation, "rotation", (3, 3))
    batch = R.shape[:-2]
    R = R.reshape(-1, 3, 3)
    m00, m11, m22 = R[:, 0, 0], R[:, 1, 1], R[:, 2, 2]
    # 4*q_i^2 for i = w, x, y, z; pick the largest per matrix as the pivot.
    candidates = np.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=1
    )
    pivot = np.argmax(candidates, axis=1)
    s = 2.0 * np.sqrt(np.maximum(candidates[np.arange(len(R)), pivot], 1e-300))
    d21, d02, d10 = R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]
    s21, s02, s10 = R[:, 2, 1] + R[:, 1, 2], R[:, 0, 2] + R[:, 2, 0], R[:, 1, 0] + R[:, 0, 1]
    # Columns x, y, z, w for each pivot choice.
    by_pivot = np.stack(
        [
            np.stack([d21 / s, d02 / s, d10 / s, s / 4], axis=1),
            np.stack([s / 4, s10 / s, s02 / s, d21 / s], axis=1),
            np.stack([s10 / s, s / 4, s21 / s, d02 / s], axis=1),
            np.stack([s02 / s, s21 / s, s / 4, d10 / s], axis=1),
        ],
        axis=0,
    )
    q = by_pivot[pivot, np.arange(len(R))]
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    q = np.where(q[:, 3:4] < 0, -q, q)
    return q.reshape(*batch, 4)


def make_transform(rotation, translation) -> np.ndarray:
    """4x4 homogeneous transform from a 3x3 rotation and a 3-vector translation (float64)."""
    R = _as_float_array(rotation, "rotation", (3, 3))
    t = _as_float_array(translation, "translation", (3,))
    if R.shape != (3, 3) or t.shape != (3,):
        raise ValueError(f"make_transform expects rotation [3, 3] and translation [3], got {R.shape} and {t.shape}")
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def rigid_error(transform) -> float:
    """How far a 4x4 matrix is from a proper rigid transform (0 for an exact one).

    The maximum of: the deviation of ``R^T R`` from identity (catches scale and shear), of
    ``det R`` from +1 (catches reflections) and of the bottom row from ``[0, 0, 0, 1]``.
    """
    T = _as_float_array(transform, "transform", (4, 4))
    if T.shape != (4, 4):
        raise ValueError(f"transform must have shape [4, 4], got {T.shape}")
    R = T[:3, :3]
    orthogonality = np.max(np.abs(R.T @ R - np.eye(3)))
    determinant = abs(np.linalg.det(R) - 1.0)
    bottom = np.max(np.abs(T[3] - np.array([0.0, 0.0, 0.0, 1.0])))
    return float(max(orthogonality, determinant, bottom))


def is_rigid(transform, tol: float = RIGID_TOLERANCE) -> bool:
    """True if ``transform`` is a finite 4x4 rotation + translation within ``tol``."""
    try:
        return rigid_error(transform) <= tol
    except ValueError:
        return False


def invert_rigid(transform, tol: float = RIGID_TOLERANCE) -> np.ndarray:
    """Inverse of rigid transform(s) ``[..., 4, 4]`` via ``R^T`` (exact, no general inverse).

    Raises ValueError for non-rigid input: the transpose shortcut would silently give a wrong
    answer for a similarity or a sheared matrix.
    """
    T = _as_float_array(transform, "transform", (4, 4))
    flat = T.reshape(-1, 4, 4)
    for i, single in enumerate(flat):
        err = rigid_error(single)
        if err > tol:
            where = "" if T.ndim == 2 else f" (index {i} of the batch)"
            raise ValueError(f"invert_rigid needs a rigid transform{where}; deviation {err:.3g} exceeds tolerance {tol:g}")
    R_t = np.swapaxes(T[..., :3, :3], -1, -2)
    out = np.zeros_like(T)
    out[..., :3, :3] = R_t
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", R_t, T[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out
