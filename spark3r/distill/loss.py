"""Speed3R's distillation loss as small tensor functions (the student imitates a dense teacher).

What the official ``Pi3LossDistill`` computes (``Visual-AI/speed3r``, ``pi3/models/loss.py``),
written from its description:

* both point maps are normalised by the mean distance of their valid local points (per sample),
  pose translations by the same factor;
* **local points**: the student's normalised local points are scaled by the one factor ``s`` that
  minimises the weighted L1 distance to the teacher's (no gradient through ``s``; negative ``s``
  flipped), then ``mean(w * |s p - t|)`` with ``w = 1 / max(z_t, 0.1 * mean z_t)`` (near pixels
  count more);
* **camera**: for every ordered pair of frames (i != j) the relative pose ``inv(P_i) P_j`` of the
  student (translations times ``s``) against the teacher's: Huber (delta 0.1) on the relative
  translations times 100, plus the mean rotation angle;
* total = local + 0.1 * camera.

Differences, on purpose: the scale is solved on all valid pixels exactly (weighted median), not
on 4096 nearest-resampled points; the normal loss of the official recipe (only for its
"high-quality" datasets) is left out.

**VGGT students** (:func:`vggt_distill_loss`; the paper's VGGT recipe is not released, this is
the same loss adapted to VGGT's outputs): the local points are each model's depth map unprojected
with its *own* predicted intrinsics (so the student's FoV is trained too), then normalised and
scale-aligned exactly as above; the camera term is VGGT's own training loss on the pose
encodings (:func:`spark3r.train.objective.camera_loss`: L1 of translation, quaternion and FoV,
FoV at half weight) of the student's final encoding against the teacher's — VGGT's
poses are already in one canonical frame and scale (frame 0, normalised scene), so no alignment
is needed there. Total = local + ``VGGT_CAMERA_WEIGHT`` (1) * camera.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_valid_distance(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean norm of the valid points: ``[B, N, H, W, 3]``, ``[B, N, H, W]`` -> ``[B]``."""
    norms = points.norm(dim=-1) * valid
    return norms.flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp_min(1)


def weighted_l1_scale(source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per sample the ``s`` minimising ``sum w |s x - y|`` over all coordinates: the weighted
    median of ``y / x`` with weights ``w |x|``. ``source, target [B, M, 3]``, ``weight [B, M]``
    (0 for invalid points) -> ``[B]``."""
    x, y = source.flatten(1), target.flatten(1)
    w = weight[..., None].expand_as(source).flatten(1) * x.abs()
    usable = x.abs() > 1e-12
    ratio = torch.where(usable, y / torch.where(usable, x, torch.ones_like(x)), torch.zeros_like(x))
    w = torch.where(usable, w, torch.zeros_like(w))
    order = ratio.argsort(dim=-1)
    ratio, w = ratio.gather(-1, order), w.gather(-1, order)
    cumulative = w.cumsum(-1)
    half = cumulative[:, -1:] / 2
    index = (cumulative < half).sum(-1, keepdim=True).clamp_max(ratio.shape[-1] - 1)
    return ratio.gather(-1, index).squeeze(-1)


def local_point_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-aligned, depth-weighted L1 of normalised local points ``[B, N, H, W, 3]``; returns
    ``(loss, s [B])``."""
    z = teacher[..., 2]
    mean_z = (z * valid).flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp_min(1)
    weight = 1.0 / (torch.maximum(z, 0.1 * mean_z.view(-1, 1, 1, 1)) + 1e-6) * valid
    b = student.shape[0]
    with torch.no_grad():
        scale = weighted_l1_scale(student.detach().reshape(b, -1, 3), teacher.reshape(b, -1, 3), weight.reshape(b, -1)).abs()
    err = (scale.view(-1, 1, 1, 1, 1) * student - teacher).abs() * weight[..., None]
    loss = err.sum() / (3 * valid.sum().clamp_min(1))
    return loss, scale


def rotation_angle(r_a: torch.Tensor, r_b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Angle (radians) of ``r_a^T r_b`` for rotation matrices ``[..., 3, 3]``."""
    trace = torch.diagonal(r_a.transpose(-1, -2) @ r_b, dim1=-2, dim2=-1).sum(-1)
    return torch.acos(((trace - 1) / 2).clamp(-1 + eps, 1 - eps))


def relative_poses(c2w: torch.Tensor) -> torch.Tensor:
    """``[B, N, 4, 4]`` camera-to-world -> ``[B, N*(N-1), 4, 4]``: ``inv(P_i) P_j`` for i != j."""
    n = c2w.shape[1]
    inv = torch.linalg.inv(c2w)
    rel = inv[:, :, None] @ c2w[:, None, :]
    off = ~torch.eye(n, dtype=torch.bool, device=c2w.device)
    return rel[:, off]


def scale_translation(c2w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``[B, N, 4, 4]`` poses with their translations times ``factor [B]`` (out of place)."""
    top = torch.cat((c2w[..., :3, :3], c2w[..., :3, 3:] * factor.view(-1, 1, 1, 1)), dim=-1)
    return torch.cat((top, c2w[..., 3:, :]), dim=-2)


def camera_loss(student: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor,
                translation_weight: float = 100.0, huber_delta: float = 0.1) -> torch.Tensor:
    """Relative-pose loss over all frame pairs; student translations are multiplied by ``scale``."""
    rel_s, rel_t = relative_poses(scale_translation(student, scale)), relative_poses(teacher)
    trans = F.huber_loss(rel_s[..., :3, 3], rel_t[..., :3, 3], delta=huber_delta)
    rot = rotation_angle(rel_s[..., :3, :3], rel_t[..., :3, :3]).mean()
    return translation_weight * trans + rot


def normalized_local_point_loss(student: torch.Tensor, teacher: torch.Tensor):
    """Both point maps ``[B, N, H, W, 3]`` normalised by the mean distance of their points where
    the teacher's are valid (positive depth, finite), then :func:`local_point_loss`. Returns
    ``(loss, s [B], student_norm [B], teacher_norm [B])``."""
    t_points = teacher.float()
    valid = (t_points[..., 2] > 0) & torch.isfinite(t_points).all(-1)
    # Invalid pixels weigh 0; zeroed so that a non-finite value there cannot turn 0 * inf into NaN.
    t_points = torch.where(valid[..., None], t_points, torch.zeros_like(t_points))
    s_points = torch.where(valid[..., None], student.float(), torch.zeros_like(t_points))
    s_norm = mean_valid_distance(s_points, valid).clamp_min(1e-8)
    t_norm = mean_valid_distance(t_points, valid).clamp_min(1e-8)
    loss, scale = local_point_loss(s_points / s_norm.view(-1, 1, 1, 1, 1), t_points / t_norm.view(-1, 1, 1, 1, 1),
                                   valid.float())
    return loss, scale, s_norm, t_norm


def distill_loss(student: dict, teacher: dict, camera_weight: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The total loss of a student's outputs against the teacher's (π3 output names:
    ``local_points [B, N, H, W, 3]``, ``camera_poses [B, N, 4, 4]``) and its parts."""
    points, scale, s_norm, t_norm = normalized_local_point_loss(student["local_points"], teacher["local_points"])
    s_pose = scale_translation(student["camera_poses"].float(), 1.0 / s_norm)
    t_pose = scale_translation(teacher["camera_poses"].float(), 1.0 / t_norm)
    camera = camera_loss(s_pose, t_pose, scale)
    total = points + camera_weight * camera
    return total, {"local_points": float(points.detach()), "camera": float(camera.detach()), "total": float(total.detach())}


VGGT_CAMERA_WEIGHT = 1.0


def vggt_local_points(outputs: dict) -> torch.Tensor:
    """A VGGT forward's depth ``[B, S, H, W, 1]`` unprojected with its own predicted intrinsics
    (from ``pose_enc``): camera-frame points ``[B, S, H, W, 3]``."""
    from spark3r.models.camera import depth_to_camera_points, pose_encoding_to_extrinsics_intrinsics

    depth = outputs["depth"].float()
    _, intrinsics = pose_encoding_to_extrinsics_intrinsics(outputs["pose_enc"].float(), depth.shape[2:4])
    return depth_to_camera_points(depth, intrinsics)


def vggt_distill_loss(student: dict, teacher: dict, camera_weight: float = VGGT_CAMERA_WEIGHT) -> tuple[torch.Tensor, dict]:
    """The distillation loss of a VGGT student (module docstring) from the outputs of
    ``model(images, heads=("camera", "depth"))`` (``pose_enc``, ``depth``)."""
    from spark3r.train.objective import ObjectiveConfig
    from spark3r.train.objective import camera_loss as pose_encoding_loss

    points, _, _, _ = normalized_local_point_loss(vggt_local_points(student), vggt_local_points(teacher))
    target = teacher["pose_enc"].float()
    frames = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
    # The final encodings only: the teacher's own earlier refinement iterations differ from its final one.
    camera = pose_encoding_loss([student["pose_enc"]], target, frames, ObjectiveConfig())["loss_camera"]
    total = points + camera_weight * camera
    return total, {"local_points": float(points.detach()), "camera": float(camera.detach()), "total": float(total.detach())}
