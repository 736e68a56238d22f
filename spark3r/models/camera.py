"""Camera maths for model outputs: pose encodings, extrinsics/intrinsics, poses, unprojection.

Pure torch and batch-friendly (any leading dims), so it runs on the model's device and dtype.
(``spark3r.geometry`` holds the float64 numpy counterparts used by the ROS layer.)

Conventions (VGGT's, which the rest of spark3r converts from):

* Pose encoding ``absT_quaR_FoV``: 9 numbers ``[tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]``;
  quaternion scalar-last, FoVs in radians.
* Extrinsics ``[..., 3, 4] = [R | t]`` map world points into the camera (camera-from-world,
  "w2c"), OpenCV axes: x right, y down, z forward.
* Intrinsics ``[..., 3, 3]`` in pixels of the network input, principal point at the image centre.
* Pixel ``(u, v)`` is the column/row index of the pixel (no half-pixel offset).
"""
from __future__ import annotations

import torch

POSE_ENCODING_DIM = 9


def _check_last_dims(t: torch.Tensor, name: str, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < len(dims) or tuple(t.shape[t.dim() - len(dims):]) != dims:
        want = "[..., " + ", ".join(map(str, dims)) + "]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_image_size(image_hw) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_hw)
    except (TypeError, ValueError):
        raise ValueError(f"image_hw must be a (height, width) pair, got {image_hw!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_hw must be positive, got {(h, w)}")
    return h, w


def quaternion_to_matrix(quat_xyzw: torch.Tensor) -> torch.Tensor:
    """Quaternions ``[..., 4]`` (x, y, z, w; need not be unit length) -> rotations ``[..., 3, 3]``."""
    _check_last_dims(quat_xyzw, "quaternion", (4,))
    x, y, z, w = quat_xyzw.unbind(-1)
    two_s = 2.0 / (quat_xyzw * quat_xyzw).sum(-1)  # normalises non-unit quaternions
    m = torch.stack(
        (
            1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
            two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
            two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
        ),
        dim=-1,
    )
    return m.reshape(quat_xyzw.shape[:-1] + (3, 3))


def matrix_to_quaternion(rotation: torch.Tensor) -> torch.Tensor:
    """Rotations ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` (x, y, z, w) with ``w >= 0``.

    Picks, per matrix, the best-conditioned of the four closed forms (largest |component|).
    """
    _check_last_dims(rotation, "rotation", (3, 3))
    m = rotation.reshape(rotation.shape[:-2] + (9,)).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    four_sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )  # 4*w^2, 4*x^2, 4*y^2, 4*z^2
    mag = torch.sqrt(four_sq.clamp_min(0.0))
    # Row i: the quaternion (w, x, y, z) scaled by 4*q_i, i.e. divided by 2*mag_i below.
    cand = torch.stack(
        [
            torch.stack([mag[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, mag[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, mag[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, mag[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    cand = cand / (2.0 * mag.clamp_min(0.1))[..., None]
    best = mag.argmax(dim=-1, keepdim=True)[..., None].expand(mag.shape[:-1] + (1, 4))
    wxyz = torch.gather(cand, -2, best).squeeze(-2)
    xyzw = wxyz[..., [1, 2, 3, 0]]
    xyzw = xyzw / xyzw.norm(dim=-1, keepdim=True)
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def intrinsics_from_fov(fov_h: torch.Tensor, fov_w: torch.Tensor, image_hw) -> torch.Tensor:
    """Pinhole intrinsics ``[..., 3, 3]`` (pixels, centred principal point) from FoVs in radians.

    A FoV of exactly 0 (VGGT's ReLU can output it) gives an infinite focal length, as in the
    official decoder; callers that need finite values should mask such frames.
    """
    h, w = _check_image_size(image_hw)
    fy = (h / 2.0) / torch.tan(fov_h / 2.0)
    fx = (w / 2.0) / torch.tan(fov_w / 2.0)
    zero = torch.zeros_like(fx)
    one = torch.ones_like(fx)
    rows = (
        torch.stack([fx, zero, zero + w / 2], dim=-1),
        torch.stack([zero, fy, zero + h / 2], dim=-1),
        torch.stack([zero, zero, one], dim=-1),
    )
    return torch.stack(rows, dim=-2)


def pose_encoding_to_extrinsics_intrinsics(pose_enc: torch.Tensor, image_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., 9]`` -> (camera-from-world ``[..., 3, 4]``, intrinsics ``[..., 3, 3]`` in pixels)."""
    _check_last_dims(pose_enc, "pose_enc", (POSE_ENCODING_DIM,))
    t, q, fov = pose_enc[..., :3], pose_enc[..., 3:7], pose_enc[..., 7:]
    extrinsics = torch.cat([quaternion_to_matrix(q), t[..., None]], dim=-1)
    return extrinsics, intrinsics_from_fov(fov[..., 0], fov[..., 1], image_hw)


def extrinsics_intrinsics_to_pose_encoding(extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_hw) -> torch.Tensor:
    """Inverse of :func:`pose_encoding_to_extrinsics_intrinsics` (uses fy for fov_h, fx for fov_w)."""
    _check_last_dims(extrinsics, "extrinsics", (3, 4))
    _check_last_dims(intrinsics, "intrinsics", (3, 3))
    h, w = _check_image_size(image_hw)
    quat = matrix_to_quaternion(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((h / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((w / 2) / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], dim=-1)


def invert_rigid(transform: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid ``[..., 3, 4]`` or ``[..., 4, 4]`` transforms as ``[..., 4, 4]`` via ``R^T``.

    Assumes an orthonormal rotation (true for decoded pose encodings).
    """
    if not isinstance(transform, torch.Tensor) or transform.dim() < 2 or tuple(transform.shape[-2:]) not in {(3, 4), (4, 4)}:
        shape = tuple(transform.shape) if isinstance(transform, torch.Tensor) else type(transform).__name__
        raise ValueError(f"transform must have shape [..., 3, 4] or [..., 4, 4], got {shape}")
    r_t = transform[..., :3, :3].transpose(-1, -2)
    t = -(r_t @ transform[..., :3, 3:4])
    top = torch.cat([r_t, t], dim=-1)
    bottom = torch.zeros(top.shape[:-2] + (1, 4), dtype=top.dtype, device=top.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def extrinsics_to_c2w(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-from-world ``[..., 3, 4]`` -> camera-to-world poses ``[..., 4, 4]`` (OpenCV axes)."""
    return invert_rigid(extrinsics)


def pose_encoding_to_c2w(pose_enc: torch.Tensor) -> torch.Tensor:
    """``[..., 9]`` -> camera-to-world ``[..., 4, 4]`` (image size is not needed for poses)."""
    _check_last_dims(pose_enc, "pose_enc", (POSE_ENCODING_DIM,))
    ext = torch.cat([quaternion_to_matrix(pose_enc[..., 3:7]), pose_enc[..., :3, None]], dim=-1)
    return invert_rigid(ext)


def depth_to_camera_points(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Depth ``[..., H, W]`` (or ``[..., H, W, 1]``) + intrinsics ``[..., 3, 3]`` -> camera-frame
    points ``[..., H, W, 3]``; pixel ``(u, v)`` sits at column u, row v."""
    if not isinstance(depth, torch.Tensor):
        raise TypeError(f"depth must be a torch.Tensor, got {type(depth).__name__}")
    _check_last_dims(intrinsics, "intrinsics", (3, 3))
    if depth.dim() >= 3 and depth.shape[-1] == 1 and depth.dim() == intrinsics.dim() + 1:
        depth = depth[..., 0]
    if depth.dim() < 2 or depth.shape[:-2] != intrinsics.shape[:-2]:
        raise ValueError(
            f"depth [..., H, W] and intrinsics [..., 3, 3] need the same leading dims, got "
            f"{tuple(depth.shape)} and {tuple(intrinsics.shape)}"
        )
    h, w = depth.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(h, dtype=depth.dtype, device=depth.device),
        torch.arange(w, dtype=depth.dtype, device=depth.device),
        indexing="ij",
    )
    fx = intrinsics[..., 0, 0, None, None]
    fy = intrinsics[..., 1, 1, None, None]
    cx = intrinsics[..., 0, 2, None, None]
    cy = intrinsics[..., 1, 2, None, None]
    x = (u - cx) * depth / fx
    y = (v - cy) * depth / fy
    return torch.stack([x, y, depth], dim=-1)


def unproject_depth(depth: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """World points ``[..., H, W, 3]`` from depth ``[..., H, W(, 1)]``, camera-from-world
    extrinsics ``[..., 3, 4]`` and intrinsics ``[..., 3, 3]`` (VGGT's recommended route to a point
    cloud: usually more accurate than the point head)."""
    _check_last_dims(extrinsics, "extrinsics", (3, 4))
    cam = depth_to_camera_points(depth, intrinsics)
    c2w = invert_rigid(extrinsics)
    r = c2w[..., None, None, :3, :3]
    t = c2w[..., None, None, :3, 3]
    return (r @ cam[..., None])[..., 0] + t
