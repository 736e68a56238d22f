"""π3 (Pi3, ``yyfz233/Pi3``) built from the shared layers.

Numerically the official model (``yyfz/Pi3`` commit 9fa3ddb); ``state_dict()`` has the official
entry names and shapes, so the released ``model.safetensors`` loads strictly.

Data flow: images ``[B, N, 3, H, W]`` in [0, 1] -> ImageNet normalisation (persistent buffers
``image_mean``/``image_std``, part of the checkpoint) -> per-frame DINOv2 patch tokens
(:meth:`Pi3.encode_patches`, cacheable) -> ``[5 registers, patches]`` per frame, the same
registers for every frame -> ``decoder_depth`` blocks alternating frame (even) / global (odd)
attention with qk-norm + 2-D RoPE -> channel concat of the last frame and last global block ->
three frame-wise transformer heads (local points, confidence, camera).

π3 has no reference frame: nothing depends on the frame index, so permuting the input frames
permutes every output (``camera_poses`` live in an arbitrary world frame per call). Global layers
therefore report ``reference_frame=None`` to token-reduction methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers.layout import TokenLayout

from .base import BackboneModel, BackboneOutputs, ForwardInputs
from .layers.attention import Attention
from .layers.block import Block
from .layers.rope import RoPE2D, grid_positions
from .layers.vit import DinoViT
from .images import IMAGENET_MEAN, IMAGENET_STD, batched_images

HEAD_NAMES = ("camera", "point", "conf")


@dataclass(frozen=True)
class Pi3Config:
    """Architecture numbers of a π3 model (defaults = the released Pi3, 958.7 M parameters)."""

    img_size: int = 518
    patch_size: int = 14
    # DINOv2 encoder with 4 registers (ViT-L/14 in the release)
    encoder_embed_dim: int = 1024
    encoder_depth: int = 24
    encoder_num_heads: int = 16
    # Frames per DINO call; 1 keeps every frame's tokens independent of its batch (caching).
    encoder_frames_chunk: int = 1
    # Alternating frame/global decoder
    embed_dim: int = 1024
    depth: int = 36
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 5
    init_values: float = 0.01
    rope_freq: float = 100.0
    # Frame-wise transformer heads (point, conf share a structure; camera has its own out dim)
    head_embed_dim: int = 1024
    head_depth: int = 5
    head_num_heads: int = 16
    point_out_dim: int = 1024
    camera_out_dim: int = 512

    def __post_init__(self) -> None:
        if self.embed_dim != self.encoder_embed_dim:
            # The official decode concatenates encoder tokens with decoder-width registers
            # without a projection, so the widths must agree.
            raise ValueError(f"embed_dim ({self.embed_dim}) must equal encoder_embed_dim ({self.encoder_embed_dim})")
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"depth must be an even number >= 2 (frame/global pairs), got {self.depth}")
        if self.embed_dim % self.num_heads or self.head_embed_dim % self.head_num_heads:
            raise ValueError("embed_dim / head_embed_dim must be divisible by their head counts")
        if self.encoder_frames_chunk < 1:
            raise ValueError("encoder_frames_chunk must be >= 1")

    @property
    def special_tokens(self) -> int:
        return self.num_register_tokens

    @property
    def num_global_layers(self) -> int:
        return self.depth // 2


class TransformerHead(nn.Module):
    """Linear projection -> frame-wise RoPE blocks (no LayerScale, no qk-norm) -> linear out.

    Keys ``projects``, ``blocks.N``, ``linear_out`` as in the official ``TransformerDecoder``."""

    def __init__(self, in_dim: int, out_dim: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, rope: RoPE2D) -> None:
        super().__init__()
        self.projects = nn.Linear(in_dim, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, norm_eps=1e-6, init_values=None, rope=rope)
            for _ in range(depth)
        )
        self.linear_out = nn.Linear(embed_dim, out_dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.projects(x)
        for blk in self.blocks:
            x = blk(x, pos=pos)
        return self.linear_out(x)


class PatchLinearHead(nn.Module):
    """One linear map per patch token to ``patch x patch x channels`` pixels (pixel shuffle)."""

    def __init__(self, patch_size: int, in_dim: int, channels: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_dim, channels * patch_size**2)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[N, rows*cols, C]`` -> ``[N, H, W, channels]``."""
        n = tokens.shape[0]
        feat = self.proj(tokens).transpose(-1, -2).reshape(n, -1, grid[0], grid[1])
        return F.pixel_shuffle(feat, self.patch_size).permute(0, 2, 3, 1)


class _ResidualMLP(nn.Module):
    """``x + relu(l3(relu(l2(relu(l1(x))))))`` (keys ``res_conv1..3``: 1x1 convs turned linear)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv1 = nn.Linear(dim, dim)
        self.res_conv2 = nn.Linear(dim, dim)
        self.res_conv3 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.res_conv1(x))
        y = F.relu(self.res_conv2(y))
        return x + F.relu(self.res_conv3(y))


def project_to_rotation(m: torch.Tensor) -> torch.Tensor:
    """``[..., 9]`` -> the rotation ``[..., 3, 3]`` nearest (Frobenius) to the matrix whose rows
    are the L2-normalised 3-vectors of ``m``; reflections are turned into proper rotations."""
    m = F.normalize(m.reshape(m.shape[:-1] + (3, 3)), dim=-1)
    u, _, vh = torch.linalg.svd(m)
    # m = U S Vh; the nearest rotation is U diag(1, 1, det(U Vh)) Vh.
    det = torch.det(u @ vh)
    fix = torch.ones(det.shape + (3,), dtype=m.dtype, device=m.device)
    fix[..., 2] = det
    return (u * fix[..., None, :]) @ vh


class CameraHead(nn.Module):
    """Patch features -> two residual MLPs -> grid average -> MLP -> (t, rotation) -> 4x4 c2w."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv = nn.ModuleList(_ResidualMLP(dim) for _ in range(2))
        self.more_mlps = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_rot = nn.Linear(dim, 9)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """``[N, patches, dim]`` -> camera-to-world ``[N, 4, 4]`` (OpenCV axes)."""
        for block in self.res_conv:
            feat = block(feat)
        feat = self.more_mlps(feat.mean(dim=1))
        # The pose itself (SVD projection included) is computed in float32 like the original.
        rot = project_to_rotation(self.fc_rot(feat).float())
        pose = torch.zeros(feat.shape[0], 4, 4, dtype=torch.float32, device=feat.device)
        pose[:, :3, :3] = rot
        pose[:, :3, 3] = self.fc_t(feat).float()
        pose[:, 3, 3] = 1.0
        return pose


def focal_from_local_points(local_points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per frame, the focal length (pixels, one for both axes) that best explains a camera-frame
    point map ``[..., h, w, 3]`` under a pinhole with the principal point at the image centre
    (the convention of the other backbones' intrinsics): weighted least squares of
    ``f * (x/z, y/z) = (u - w/2, v - h/2)`` over pixels in front of the camera. NaN when a frame
    has no usable pixel. Computed in the inputs' dtype (float64 recommended)."""
    h, w = local_points.shape[-3:-1]
    kw = dict(dtype=local_points.dtype, device=local_points.device)
    v, u = torch.meshgrid(torch.arange(h, **kw) - h / 2, torch.arange(w, **kw) - w / 2, indexing="ij")
    z = local_points[..., 2]
    ok = torch.isfinite(local_points).all(dim=-1) & (z > 1e-12) & torch.isfinite(weights) & (weights > 0)
    safe_z = torch.where(ok, z, torch.ones_like(z))
    zero = torch.zeros_like(z)
    a = torch.where(ok, local_points[..., 0] / safe_z, zero)
    b = torch.where(ok, local_points[..., 1] / safe_z, zero)
    wt = torch.where(ok, weights.to(z.dtype), zero)
    num = (wt * (a * u + b * v)).sum(dim=(-2, -1))
    den = (wt * (a * a + b * b)).sum(dim=(-2, -1))
    focal = num / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, focal, torch.full_like(focal, float("nan")))


class Pi3(BackboneModel):
    """π3 backbone + heads. See :meth:`forward`."""

    HEAD_NAMES = HEAD_NAMES
    # depth = z of the local points; its confidence is the conf head
    HEAD_ALIASES = {"depth": ("point", "conf")}

    def __init__(self, config: Pi3Config = Pi3Config(), preset: Optional[str] = None) -> None:
        super().__init__()
        self.config = config
        self.preset = preset
        c = config.embed_dim
        # Registration order = official state-dict order.
        self.register_token = nn.Parameter(torch.zeros(1, 1, config.num_register_tokens, c))
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.encoder = DinoViT(
            embed_dim=config.encoder_embed_dim, depth=config.encoder_depth, num_heads=config.encoder_num_heads,
            patch_size=config.patch_size, img_size=config.img_size, num_register_tokens=4, init_values=1.0,
            norm_eps=1e-6, interpolate_antialias=True, interpolate_offset=0.0, with_mask_token=False,
        )
        self.rope = RoPE2D(config.rope_freq)
        self.decoder = nn.ModuleList(
            Block(c, config.num_heads, mlp_ratio=config.mlp_ratio, norm_eps=1e-6, init_values=config.init_values,
                  qk_norm=True, qk_norm_eps=1e-5, rope=self.rope)
            for _ in range(config.depth)
        )

        def head(out_dim: int) -> TransformerHead:
            return TransformerHead(2 * c, out_dim, config.head_embed_dim, config.head_depth, config.head_num_heads,
                                   config.mlp_ratio, self.rope)

        self.point_decoder = head(config.point_out_dim)
        self.point_head = PatchLinearHead(config.patch_size, config.point_out_dim, 3)
        self.conf_decoder = head(config.point_out_dim)
        self.conf_head = PatchLinearHead(config.patch_size, config.point_out_dim, 1)
        self.camera_decoder = head(config.camera_out_dim)
        self.camera_head = CameraHead(config.camera_out_dim)

    # -- hook and cache API ---------------------------------------------------------------------

    def global_attention_modules(self) -> list[Attention]:
        """Attention of the global decoder blocks (the odd ones), in layer order."""
        return [blk.attn for blk in self.decoder[1::2]]

    def weight_dtype(self) -> torch.dtype:
        return self.register_token.dtype

    def patch_token_shape(self, batch: int, frames: int, grid: tuple[int, int]) -> tuple[int, ...]:
        return (batch, frames, grid[0] * grid[1], self.config.encoder_embed_dim)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Per-frame DINO patch tokens ``[B, N, Np, C]`` for images in [0, 1]; frames are encoded
        one at a time, so cached tokens of earlier calls can be combined with new ones."""
        images = batched_images(images, self.config.patch_size)
        b, s, _, h, w = images.shape
        mean = self.image_mean.to(device=images.device)
        std = self.image_std.to(device=images.device)
        flat = ((images - mean) / std).to(self.register_token.dtype).reshape(b * s, 3, h, w)
        step = b * s if flat.is_meta else self.config.encoder_frames_chunk
        tokens = [self.encoder(flat[i : i + step]) for i in range(0, b * s, step)]
        tokens = tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=0)
        return tokens.reshape(b, s, tokens.shape[1], tokens.shape[2])

    def aggregate(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Patch tokens ``[B, N, Np, C]`` -> ``[decoder output [B, N, P, 2C]]`` (cat of the last
        frame and last global block; P includes the registers)."""
        cfg = self.config
        b, s, n_patch, c = patch_tokens.shape
        registers = self.register_token.expand(b, s, -1, -1)
        x = torch.cat([registers, patch_tokens], dim=2)
        p = x.shape[2]
        pos = grid_positions(grid[0], grid[1], cfg.special_tokens, device=x.device)
        outputs = []
        for i, blk in enumerate(self.decoder):
            if i % 2 == 0:
                x = blk(x.reshape(b * s, p, c), pos=pos)
            else:
                layout = TokenLayout(frames=s, tokens_per_frame=p, special_tokens=cfg.special_tokens,
                                     grid=(int(grid[0]), int(grid[1])), reference_frame=None,
                                     layer=i // 2, num_layers=cfg.num_global_layers)
                x = blk(x.reshape(b, s * p, c), pos=pos, layout=layout)
            if i >= cfg.depth - 2:
                outputs.append(x.reshape(b, s, p, c))
        return [torch.cat(outputs, dim=-1)]

    # -- forward ---------------------------------------------------------------------------------

    def forward_prepared(self, inputs: ForwardInputs) -> dict[str, torch.Tensor]:
        """Decoder and the requested heads (``forward(images, patch_tokens=..., heads=...)`` with
        heads from ``("camera", "point", "conf")``, default all; the mapper's ``"depth"`` stands
        for point + conf: depth is the z of the local points).

        Returns (official names, float32): ``points`` [B,N,H,W,3] (world = camera_poses applied
        to local points), ``local_points`` [B,N,H,W,3], ``conf`` [B,N,H,W,1] (raw logits),
        ``camera_poses`` [B,N,4,4] (camera-to-world, OpenCV, arbitrary world frame); only those
        the requested heads produce.
        """
        b, s, _, h, w = inputs.images.shape
        grid, wanted = inputs.grid, inputs.heads
        hidden = self.aggregate(inputs.patch_tokens, grid)[0]
        hidden = hidden.reshape(b * s, hidden.shape[2], hidden.shape[3])
        pos = grid_positions(grid[0], grid[1], self.config.special_tokens, device=hidden.device)
        start = self.config.special_tokens
        out: dict[str, torch.Tensor] = {}
        poses = None
        if "camera" in wanted:
            cam = self.camera_decoder(hidden, pos)
            poses = self.camera_head(cam[:, start:].to(self.camera_head.fc_t.weight.dtype)).reshape(b, s, 4, 4)
            out["camera_poses"] = poses
        if "point" in wanted:
            tokens = self.point_decoder(hidden, pos)[:, start:].to(self.point_head.proj.weight.dtype)
            raw = self.point_head(tokens, grid).float().reshape(b, s, h, w, 3)
            xy, z = raw.split([2, 1], dim=-1)
            z = torch.exp(z)
            local = torch.cat([xy * z, z], dim=-1)
            out["local_points"] = local
            if poses is not None:
                out["points"] = torch.einsum("bnij,bnhwj->bnhwi", poses[..., :3, :3], local) + poses[:, :, None, None, :3, 3]
        if "conf" in wanted:
            tokens = self.conf_decoder(hidden, pos)[:, start:].to(self.conf_head.proj.weight.dtype)
            out["conf"] = self.conf_head(tokens, grid).float().reshape(b, s, h, w, 1)
        return out

    def decode(self, outputs: dict, image_hw: tuple[int, int]) -> BackboneOutputs:
        """``camera_poses`` are already camera-to-world (OpenCV, arbitrary world per call); depth
        is the z of ``local_points``; confidence ``1 + exp(conf)`` maps the raw logits onto the
        ``>= 1`` scale of the other backbones. π3 predicts no intrinsics: the focal length is fitted
        to the local point map (:func:`focal_from_local_points`), principal point at the centre."""
        c2w = intrinsics = depth = conf = None
        if "camera_poses" in outputs:
            c2w = outputs["camera_poses"].detach().double()
        if "local_points" in outputs:
            depth = outputs["local_points"].detach()[..., 2].float()
        if "conf" in outputs:
            # exp overflows float32 beyond ~88; such pixels are certain anyway.
            logits = outputs["conf"].detach()[..., 0].double().clamp(-60.0, 60.0)
            conf = (1.0 + torch.exp(logits)).float()
        if "local_points" in outputs and "conf" in outputs:
            local = outputs["local_points"].detach().double()
            focal = focal_from_local_points(local, 1.0 / (1.0 + torch.exp(-logits)))
            h, w = image_hw
            intrinsics = torch.zeros(focal.shape + (3, 3), dtype=torch.float64, device=focal.device)
            intrinsics[..., 0, 0] = intrinsics[..., 1, 1] = focal
            intrinsics[..., 0, 2], intrinsics[..., 1, 2], intrinsics[..., 2, 2] = w / 2, h / 2, 1.0
        points = outputs.get("points")
        return BackboneOutputs(c2w, intrinsics, depth, conf, None if points is None else points.detach())
