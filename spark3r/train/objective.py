"""VGGT's training objective, written from the description of the official training code.

* Scene normalisation: poses are re-expressed relative to the first camera (its frame becomes
  the world), then translations and depths are divided by the mean distance of all valid
  ground-truth points (every pixel of every frame, in the first camera's frame) from the
  origin. The network therefore predicts geometry up to this canonical scale.
* Camera loss: L1 between the predicted and ground-truth pose encodings
  (``absT_quaR_FoV``: translation, quaternion, FoVs) for every refinement iteration of the camera
  head, weighted ``gamma ** (iterations - 1 - k)`` and averaged; translation + rotation + 0.5 *
  FoV terms; per-frame translation errors are clamped at 100.
* Depth loss: confidence-weighted regression ``|d - d*| * c - alpha * log c`` plus the plain
  regression term, both after dropping the worst 2 % of pixels (quantile filter), plus a
  multi-scale gradient-matching term on the depth error (4 scales, L1 of the error's x / y
  differences).
* Total: ``5 * camera + 1 * depth`` (the official default weights), plus optionally
  ``point_weight *`` a *geometric point loss* (ours, off by default): the predicted depth
  unprojected with the predicted camera (pose and FoV of the last refinement iteration) into the
  first camera's frame, L1 against the ground-truth points there (worst 2 % dropped). It is VGGT's
  point target reached through depth + camera instead of a point head, so every pixel's error
  has a gradient on its frame's pose -- a dense cross-view signal, where the camera loss has 9
  numbers per frame and is easily satisfied by predicting the average motion.

All functions are pure tensor functions of predictions and ground truth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from spark3r.models.camera import (depth_to_camera_points, extrinsics_intrinsics_to_pose_encoding,
                                   pose_encoding_to_extrinsics_intrinsics, unproject_depth)


@dataclass(frozen=True)
class ObjectiveConfig:
    camera_weight: float = 5.0
    depth_weight: float = 1.0
    camera_gamma: float = 0.6  # per-iteration decay of the camera-head refinement losses
    weight_trans: float = 1.0
    weight_rot: float = 1.0
    weight_fov: float = 0.5
    conf_gamma: float = 1.0  # weight of the confidence-scaled error
    conf_alpha: float = 0.2  # weight of the -log(confidence) regulariser
    keep_quantile: float = 0.98  # per-pixel losses above this quantile are dropped (outliers)
    gradient_scales: int = 4
    point_weight: float = 0.0  # geometric point loss (module docstring); 0 = VGGT's objective

    def __post_init__(self) -> None:
        for name in ("camera_weight", "depth_weight", "point_weight", "weight_trans", "weight_rot", "weight_fov"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.camera_weight == 0 and self.depth_weight == 0:
            raise ValueError("camera_weight and depth_weight cannot both be 0: nothing would be trained")

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_scene(c2w: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, valid: torch.Tensor):
    """Ground truth in VGGT's canonical frame.

    Args: ``c2w`` [B,S,4,4] (OpenCV), ``depth`` [B,S,H,W] metric z-depth, ``K`` [B,S,3,3],
    ``valid`` [B,S,H,W] bool.
    Returns: (camera-from-world extrinsics [B,S,3,4] relative to frame 0 and scaled, depth
    [B,S,H,W] scaled, scale [B] in metres per unit).
    """
    w2c = torch.linalg.inv(c2w)
    rel_w2c = w2c @ c2w[:, :1]  # maps frame-0 camera coordinates into camera i
    cam_points = depth_to_camera_points(depth, K)  # [B,S,H,W,3]
    rel_c2w = torch.linalg.inv(rel_w2c)
    rot = rel_c2w[:, :, None, None, :3, :3]
    pts0 = (rot @ cam_points[..., None])[..., 0] + rel_c2w[:, :, None, None, :3, 3]
    dist = pts0.norm(dim=-1)
    count = valid.flatten(1).sum(-1).clamp_min(1)
    scale = (dist * valid).flatten(1).sum(-1) / count
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
    ext = rel_w2c[..., :3, :].clone()
    ext[..., :3, 3] = ext[..., :3, 3] / scale[:, None, None]
    return ext, depth / scale[:, None, None, None], scale


def camera_loss(pose_enc_list: list[torch.Tensor], gt_pose_enc: torch.Tensor, frame_valid: torch.Tensor,
                cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """Camera loss over the refinement iterations (``frame_valid`` [B,S] selects frames)."""
    n = len(pose_enc_list)
    gt = gt_pose_enc[frame_valid]
    totals = {"loss_T": 0.0, "loss_R": 0.0, "loss_FL": 0.0}
    for k, pred_all in enumerate(pose_enc_list):
        pred = pred_all.float()[frame_valid]
        w = cfg.camera_gamma ** (n - 1 - k)
        err = (pred - gt).abs()
        totals["loss_T"] = totals["loss_T"] + w * _finite(err[:, :3]).clamp(max=100).mean()
        totals["loss_R"] = totals["loss_R"] + w * _finite(err[:, 3:7]).mean()
        totals["loss_FL"] = totals["loss_FL"] + w * _finite(err[:, 7:]).mean()
    out = {k: v / n for k, v in totals.items()}
    out["loss_camera"] = cfg.weight_trans * out["loss_T"] + cfg.weight_rot * out["loss_R"] + cfg.weight_fov * out["loss_FL"]
    return out


def drop_top_quantile(values: torch.Tensor, q: float, min_elements: int = 1000, hard_max: float = 100.0) -> torch.Tensor:
    """``values`` (1-D) clamped at ``hard_max`` without those at or above their ``q`` quantile;
    left whole when there are too few to filter."""
    if values.numel() <= min_elements or q >= 1.0:
        return values
    values = values.clamp(max=hard_max)
    k = int(round(q * (values.numel() - 1))) + 1
    threshold = torch.kthvalue(values.detach(), k).values.clamp(max=hard_max)
    kept = values < threshold
    return values[kept] if kept.sum() > min_elements else values


def gradient_matching_loss(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 of the x and y differences of the masked error map ``err`` [N,H,W] (pairs of
    valid neighbours only), normalised by the number of valid pixels."""
    m = mask.to(err.dtype)
    e = err * m
    gx = (e[:, :, 1:] - e[:, :, :-1]).abs() * (m[:, :, 1:] * m[:, :, :-1])
    gy = (e[:, 1:, :] - e[:, :-1, :]).abs() * (m[:, 1:, :] * m[:, :-1, :])
    total = gx.clamp(max=100).sum() + gy.clamp(max=100).sum()
    return total / m.sum().clamp_min(1.0)


def depth_loss(pred: torch.Tensor, conf: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
               cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """Depth terms for ``pred`` [B,S,H,W,1] (or [B,S,H,W]), ``conf`` [B,S,H,W] (> 1), ground
    truth ``gt`` and ``valid`` [B,S,H,W]."""
    if pred.dim() == gt.dim() + 1:
        pred = pred[..., 0]
    pred, conf = pred.float(), conf.float()
    err = pred - gt
    abs_err = _finite(err[valid].abs())
    c = conf[valid]
    conf_term = _finite(cfg.conf_gamma * abs_err * c - cfg.conf_alpha * torch.log(c))
    loss_conf = drop_top_quantile(conf_term, cfg.keep_quantile).mean()
    loss_reg = drop_top_quantile(abs_err, cfg.keep_quantile).mean()
    b, s, h, w = gt.shape
    e = torch.where(valid, err, torch.zeros_like(err)).reshape(b * s, h, w)
    mk = valid.reshape(b * s, h, w)
    loss_grad = sum(gradient_matching_loss(e[:, ::2**k, ::2**k], mk[:, ::2**k, ::2**k]) for k in range(cfg.gradient_scales))
    loss_grad = loss_grad / cfg.gradient_scales
    return {"loss_conf_depth": loss_conf, "loss_reg_depth": loss_reg, "loss_grad_depth": loss_grad,
            "loss_depth": loss_conf + loss_reg + loss_grad}


def geometric_point_loss(pose_enc: torch.Tensor, depth: torch.Tensor, gt_points: torch.Tensor, valid: torch.Tensor,
                         cfg: ObjectiveConfig) -> torch.Tensor:
    """Mean L1 between ``depth`` [B,S,H,W] unprojected with ``pose_enc`` [B,S,9] (camera-from-
    first-camera, FoVs) and ``gt_points`` [B,S,H,W,3] (first camera's frame, normalised), over
    ``valid`` pixels with the worst ``1 - keep_quantile`` dropped."""
    ext, intr = pose_encoding_to_extrinsics_intrinsics(pose_enc.float(), depth.shape[-2:])
    points = unproject_depth(depth.float(), ext, intr)
    err = _finite((points - gt_points)[valid].abs().sum(-1))
    return drop_top_quantile(err, cfg.keep_quantile).mean()


def compute_objective(outputs: dict, batch: dict, cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """All loss terms and ``objective`` (the scalar to minimise) for a VGGT forward ``outputs``
    on a ``batch`` with ``images`` [B,S,3,H,W], ``depth`` [B,S,H,W], ``c2w`` [B,S,4,4], ``K``."""
    depth = batch["depth"].float()
    valid = torch.isfinite(depth) & (depth > 0)
    depth = torch.where(valid, depth, torch.ones_like(depth))
    ext, gt_depth, _ = normalize_scene(batch["c2w"].double(), depth.double(), batch["K"].double(), valid)
    h, w = depth.shape[-2:]
    gt_pose = extrinsics_intrinsics_to_pose_encoding(ext, batch["K"].double(), (h, w)).float()
    gt_depth = gt_depth.float()
    frame_valid = valid.flatten(2).sum(-1) > 100
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=depth.device)
    if "pose_enc_list" in outputs:
        out.update(camera_loss(outputs["pose_enc_list"], gt_pose, frame_valid, cfg))
        total = total + cfg.camera_weight * out["loss_camera"]
    if "depth" in outputs:
        out.update(depth_loss(outputs["depth"], outputs["depth_conf"], gt_depth, valid, cfg))
        total = total + cfg.depth_weight * out["loss_depth"]
    if cfg.point_weight > 0 and "depth" in outputs and "pose_enc_list" in outputs:
        # Targets through the pose encoding's own camera model (principal point at W/2, H/2), so
        # the truth scores 0 whatever pixel-centre convention the data's K uses.
        gt_ext, gt_intr = pose_encoding_to_extrinsics_intrinsics(gt_pose.double(), (h, w))
        gt_points = unproject_depth(gt_depth.double(), gt_ext, gt_intr).float()
        pred_depth = outputs["depth"][..., 0] if outputs["depth"].dim() == gt_depth.dim() + 1 else outputs["depth"]
        out["loss_point"] = geometric_point_loss(outputs["pose_enc_list"][-1], pred_depth, gt_points, valid, cfg)
        total = total + cfg.point_weight * out["loss_point"]
    out["objective"] = total
    return out


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Non-finite entries replaced by 0 (kept in the graph), so one bad pixel cannot poison a step."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))
