"""Pose encodings, extrinsics/intrinsics, poses and unprojection against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spark3r import geometry
from spark3r.models import camera


def rot_z(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return camera.quaternion_to_matrix(q)


def test_quaternion_to_matrix_hand_cases():
    s = math.sqrt(0.5)
    identity = camera.quaternion_to_matrix(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(identity, torch.eye(3, dtype=torch.float64))
    z90 = camera.quaternion_to_matrix(torch.tensor([0.0, 0.0, s, s], dtype=torch.float64))
    assert torch.allclose(z90, rot_z(90), atol=1e-12)
    # A non-unit quaternion describes the same rotation.
    assert torch.allclose(camera.quaternion_to_matrix(torch.tensor([0.0, 0.0, 3 * s, 3 * s], dtype=torch.float64)), z90)


def test_quaternion_conversions_agree_with_numpy_geometry():
    q = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = camera.quaternion_to_matrix(q).numpy()
    reference = geometry.quat_xyzw_to_matrix(q.numpy())
    np.testing.assert_allclose(ours, reference, atol=1e-12)


def test_matrix_to_quaternion_round_trip_including_half_turns():
    rots = torch.cat([random_rotations(200), rot_z(180)[None], torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))[None]])
    quats = camera.matrix_to_quaternion(rots)
    assert torch.all(quats[:, 3] >= 0)
    assert torch.allclose(quats.norm(dim=-1), torch.ones(len(rots), dtype=torch.float64))
    assert torch.allclose(camera.quaternion_to_matrix(quats), rots, atol=1e-10)


def test_decode_pose_encoding_hand_case():
    fov_h, fov_w = 2 * math.atan(0.5), 2 * math.atan(1.0)  # tan(fov/2) = 0.5 and 1
    enc = torch.tensor([[[1.0, 2.0, 3.0, 0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5), fov_h, fov_w]]], dtype=torch.float64)
    ext, intr = camera.pose_encoding_to_extrinsics_intrinsics(enc, (100, 200))
    assert ext.shape == (1, 1, 3, 4) and intr.shape == (1, 1, 3, 3)
    assert torch.allclose(ext[0, 0, :, :3], rot_z(90), atol=1e-12)
    assert ext[0, 0, :, 3].tolist() == [1.0, 2.0, 3.0]
    expected = torch.tensor([[100.0, 0.0, 100.0], [0.0, 100.0, 50.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    # fx = (W/2)/tan(fov_w/2) = 100/1, fy = (H/2)/tan(fov_h/2) = 50/0.5, principal point at the centre
    assert torch.allclose(intr[0, 0], expected)


def test_encode_is_the_inverse_of_decode():
    n = 6
    rots = random_rotations(n, seed=3)
    trans = torch.randn(n, 3, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ext = torch.cat([rots, trans], dim=-1).reshape(2, 3, 3, 4)
    intr = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    intr[..., 0, 0], intr[..., 1, 1], intr[..., 0, 2], intr[..., 1, 2], intr[..., 2, 2] = 300.0, 280.0, 259.0, 196.0, 1.0
    enc = camera.extrinsics_intrinsics_to_pose_encoding(ext, intr, (392, 518))
    assert enc.shape == (2, 3, 9)
    ext2, intr2 = camera.pose_encoding_to_extrinsics_intrinsics(enc, (392, 518))
    assert torch.allclose(ext2, ext, atol=1e-10)
    assert torch.allclose(intr2, intr, atol=1e-9)


def test_zero_fov_gives_infinite_focal_like_the_official_decoder():
    enc = torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 0.0, 1.0])
    _, intr = camera.pose_encoding_to_extrinsics_intrinsics(enc, (10, 10))
    assert math.isinf(intr[1, 1].item()) and math.isfinite(intr[0, 0].item())


def test_c2w_inverts_extrinsics():
    ext = torch.cat([random_rotations(4, seed=5), torch.randn(4, 3, 1, dtype=torch.float64)], dim=-1)
    c2w = camera.extrinsics_to_c2w(ext)
    w2c = torch.cat([ext, torch.tensor([[[0.0, 0, 0, 1]]], dtype=torch.float64).expand(4, 1, 4)], dim=1)
    assert torch.allclose(c2w @ w2c, torch.eye(4, dtype=torch.float64).expand(4, 4, 4), atol=1e-12)
    # The camera centre in world coordinates is -R^T t.
    centre = -(ext[:, :, :3].transpose(1, 2) @ ext[:, :, 3:])[..., 0]
    assert torch.allclose(c2w[:, :3, 3], centre)


def test_pose_encoding_to_c2w_hand_case():
    # Camera rotated 90 deg about z and translated by t: its centre is -R^T t.
    enc = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5), 1.0, 1.0], dtype=torch.float64)
    c2w = camera.pose_encoding_to_c2w(enc)
    assert torch.allclose(c2w[:3, :3], rot_z(90).T, atol=1e-12)
    assert torch.allclose(c2w[:3, 3], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert c2w[3].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_unproject_hand_case():
    depth = torch.full((1, 3, 4), 2.0, dtype=torch.float64)
    intr = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 4.0, 1.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    ext = torch.cat([torch.eye(3, dtype=torch.float64), torch.tensor([[0.0], [0.0], [-1.0]], dtype=torch.float64)], dim=1)[None]
    pts = camera.unproject_depth(depth, ext, intr)
    assert pts.shape == (1, 3, 4, 3)
    # pixel (u=3, v=2): x = (3-1)*2/2 = 2, y = (2-1)*2/4 = 0.5, z = 2; world = cam + (0, 0, 1)
    assert pts[0, 2, 3].tolist() == [2.0, 0.5, 3.0]
    assert pts[0, 1, 1].tolist() == [0.0, 0.0, 3.0]


def test_unproject_recovers_projected_world_points():
    g = torch.Generator().manual_seed(11)
    h, w = 6, 8
    rot = random_rotations(2, seed=12)
    ext = torch.cat([rot, torch.randn(2, 3, 1, generator=g, dtype=torch.float64)], dim=-1)
    intr = torch.tensor([[10.0, 0, 4.0], [0, 12.0, 3.0], [0, 0, 1]], dtype=torch.float64).expand(2, 3, 3)
    depth = 1 + torch.rand(2, h, w, 1, generator=g, dtype=torch.float64)
    world = camera.unproject_depth(depth, ext, intr)
    cam = (ext[:, None, None, :, :3] @ world[..., None])[..., 0] + ext[:, None, None, :, 3]
    assert torch.allclose(cam[..., 2:], depth)
    pix = (intr[:, None, None] @ cam[..., None])[..., 0]
    u = pix[..., 0] / pix[..., 2]
    v = pix[..., 1] / pix[..., 2]
    assert torch.allclose(u, torch.arange(w, dtype=torch.float64).expand(2, h, w))
    assert torch.allclose(v, torch.arange(h, dtype=torch.float64)[:, None].expand(2, h, w))


def test_batch_dims_are_preserved():
    enc = torch.zeros(2, 5, 9)
    enc[..., 6] = 1.0
    enc[..., 7:] = 1.0
    ext, intr = camera.pose_encoding_to_extrinsics_intrinsics(enc, (28, 42))
    depth = torch.ones(2, 5, 28, 42, 1)
    assert camera.unproject_depth(depth, ext, intr).shape == (2, 5, 28, 42, 3)
    assert camera.pose_encoding_to_c2w(enc).shape == (2, 5, 4, 4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: camera.pose_encoding_to_extrinsics_intrinsics(torch.zeros(2, 8), (10, 10)), r"\[\.\.\., 9\]"),
        (lambda: camera.pose_encoding_to_extrinsics_intrinsics(torch.zeros(9), (10,)), "height, width"),
        (lambda: camera.quaternion_to_matrix(torch.zeros(3)), r"\[\.\.\., 4\]"),
        (lambda: camera.invert_rigid(torch.zeros(3, 3)), "3, 4"),
        (lambda: camera.unproject_depth(torch.ones(2, 4, 4), torch.zeros(3, 3, 4), torch.eye(3).expand(3, 3, 3)), "leading dims"),
    ],
)
def test_bad_shapes_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
