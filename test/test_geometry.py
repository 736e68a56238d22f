"""spark3r.geometry: quaternion <-> matrix, rigid checks and inverse (no ROS needed)."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from spark3r.geometry import (
    invert_rigid,
    is_rigid,
    make_transform,
    matrix_to_quat_xyzw,
    quat_xyzw_to_matrix,
    rigid_error,
)


def random_rotations(n, seed=0):
    return Rotation.random(n, random_state=seed)


def test_quaternion_to_matrix_matches_scipy_xyzw_order():
    rot = random_rotations(50)
    np.testing.assert_allclose(quat_xyzw_to_matrix(rot.as_quat()), rot.as_matrix(), atol=1e-12)


def test_known_quaternions_exact_values():
    # 90 degrees about z: x -> y.
    s = np.sqrt(0.5)
    np.testing.assert_allclose(quat_xyzw_to_matrix([0, 0, s, s]), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_array_equal(quat_xyzw_to_matrix([0, 0, 0, 1]), np.eye(3))
    # 180 degrees about x.
    np.testing.assert_allclose(quat_xyzw_to_matrix([1, 0, 0, 0]), np.diag([1.0, -1.0, -1.0]), atol=1e-15)


def test_matrix_to_quaternion_round_trip_and_sign_convention():
    rot = random_rotations(200, seed=1)
    q = matrix_to_quat_xyzw(rot.as_matrix())
    assert q.shape == (200, 4)
    assert np.all(q[:, 3] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    expected = rot.as_quat()
    expected[expected[:, 3] < 0] *= -1
    np.testing.assert_allclose(q, expected, atol=1e-12)


@pytest.mark.parametrize("axis", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -2, 3]])
def test_half_turns_are_accurate(axis):
    # Near 180 degrees the trace is -1 and a naive formula divides by ~0.
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    R = Rotation.from_rotvec(np.pi * axis).as_matrix()
    q = matrix_to_quat_xyzw(R)
    np.testing.assert_allclose(quat_xyzw_to_matrix(q), R, atol=1e-12)


def test_quaternion_is_normalised_and_zero_rejected():
    np.testing.assert_allclose(quat_xyzw_to_matrix([0, 0, 0, 2.0]), np.eye(3))
    with pytest.raises(ValueError, match="zero length"):
        quat_xyzw_to_matrix([0, 0, 0, 0])
    with pytest.raises(ValueError, match="shape"):
        quat_xyzw_to_matrix([0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        quat_xyzw_to_matrix([0, 0, np.nan, 1])


def test_make_transform_and_invert():
    R = random_rotations(1, seed=3).as_matrix()[0]
    t = np.array([1.0, -2.0, 0.5])
    T = make_transform(R, t)
    assert T.shape == (4, 4)
    np.testing.assert_array_equal(T[3], [0, 0, 0, 1])
    np.testing.assert_allclose(invert_rigid(T) @ T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(invert_rigid(T), np.linalg.inv(T), atol=1e-12)


def test_invert_rigid_batch():
    rot = random_rotations(5, seed=4).as_matrix()
    Ts = np.stack([make_transform(R, np.arange(3.0) + i) for i, R in enumerate(rot)])
    inv = invert_rigid(Ts)
    np.testing.assert_allclose(np.einsum("nij,njk->nik", inv, Ts), np.broadcast_to(np.eye(4), (5, 4, 4)), atol=1e-12)


def test_rigid_checks_reject_scale_shear_reflection():
    T = make_transform(np.eye(3), [1, 2, 3])
    assert is_rigid(T)
    assert rigid_error(T) == 0.0
    scaled = T.copy()
    scaled[:3, :3] *= 1.01
    sheared = T.copy()
    sheared[0, 1] = 0.05
    reflected = T.copy()
    reflected[0, 0] = -1
    bad_row = T.copy()
    bad_row[3, 0] = 0.1
    for bad in (scaled, sheared, reflected, bad_row):
        assert not is_rigid(bad)
        with pytest.raises(ValueError, match="rigid"):
            invert_rigid(bad)
    assert not is_rigid(np.eye(3))
    assert not is_rigid(np.full((4, 4), np.nan))
    # float32 round trip of a rigid transform stays rigid under the default tolerance
    R = random_rotations(1, seed=5).as_matrix()[0]
    assert is_rigid(make_transform(R, [0, 0, 0]).astype(np.float32))
