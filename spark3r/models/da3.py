"""Depth-Anything-3 (``depth-anything/DA3-*``) built from the shared layers.

Numerically the official ``DepthAnything3Net`` (``ByteDance-Seed/Depth-Anything-3`` commit
2c21ea8). ``state_dict()`` has the Hugging Face checkpoint names, i.e. with the ``model.`` prefix
of the official wrapper (``model.backbone.pretrained.blocks.0.attn.qkv.weight``), so released
``model.safetensors`` files load strictly.

Differences from the official *inner* network, by design: :meth:`DepthAnything3.forward` takes
images in [0, 1] and applies the ImageNet normalisation itself (like VGGT and π3); pose
conditioning (``cam_enc``) and the Gaussian-splat head are present for checkpoint compatibility
only and are never run.

Data flow: per-frame DINOv2 blocks ``0 .. alt_start-2`` (:meth:`DepthAnything3.encode_patches`,
cacheable) -> reference-view selection on the CLS tokens (>= 3 views; the chosen view moves to
position 0) -> block ``alt_start-1`` -> from ``alt_start`` on, the CLS slot holds a camera token
(reference view / other views) and odd blocks attend globally across views, with RoPE positions
that carry no spatial information (patches at (1, 1)) -> at each out layer: cat(last frame-local
output, current output), restored to input order -> DualDPT depth head and camera decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .base import BackboneModel, BackboneOutputs, ForwardInputs, camera_to_world
from .camera import quaternion_to_matrix
from .layers.attention import Attention
from .layers.block import Block
from .layers.dpt import DPTHead, FusionBlock, activate_dense, add_uv_embedding, resize_bilinear
from .layers.layout import TokenLayout
from .layers.mlp import Mlp
from .layers.rope import grid_positions
from .layers.vit import DinoViT
from .images import batched_images, normalize_images

HEAD_NAMES = ("camera", "depth")
REF_VIEW_STRATEGIES = ("saddle_balanced", "first", "middle", "saddle_sim_range")


@dataclass(frozen=True)
class DA3Config:
    """Architecture numbers of a DA3 model (defaults = da3-large)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "swiglu" for the giant backbone
    out_layers: tuple[int, ...] = (11, 15, 19, 23)
    # First multi-view block: qk-norm and RoPE start here, odd blocks from here on are global.
    alt_start: int = 8
    rope_freq: float = 100.0
    head_features: int = 256
    head_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    head_frames_chunk: int = 8
    cam_enc_depth: int = 4
    cam_enc_num_heads: int = 16
    gs_output_dim: int = 38
    enable_cam_enc: bool = True   # weights only (pose-conditioned inference is not implemented)
    enable_gs_head: bool = False  # weights only (da3-giant's Gaussian-splat head)
    ref_view_strategy: str = "saddle_balanced"
    ref_view_min_frames: int = 3  # fewer views keep their order (official THRESH_FOR_REF_SELECTION)
    encoder_frames_chunk: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_layers", tuple(int(i) for i in self.out_layers))
        object.__setattr__(self, "head_out_channels", tuple(int(i) for i in self.head_out_channels))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 2 <= self.alt_start < self.depth:
            raise ValueError(f"alt_start must be in 2..depth-1 = 2..{self.depth - 1}, got {self.alt_start}")
        if len(self.out_layers) != 4 or any(not self.alt_start <= i < self.depth for i in self.out_layers):
            raise ValueError(f"out_layers must be 4 block indices in {self.alt_start}..{self.depth - 1}, got {self.out_layers}")
        if self.ref_view_strategy not in REF_VIEW_STRATEGIES:
            raise ValueError(f"ref_view_strategy must be one of {REF_VIEW_STRATEGIES}, got {self.ref_view_strategy!r}")
        if self.encoder_frames_chunk < 1:
            raise ValueError("encoder_frames_chunk must be >= 1")

    @property
    def global_blocks(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.alt_start, self.depth) if i % 2 == 1)

    @property
    def head_dim_in(self) -> int:
        return 2 * self.embed_dim


# ---------------------------------------------------------------------------------------------
# Reference view


def select_reference_view(tokens: torch.Tensor, strategy: str = "saddle_balanced") -> torch.Tensor:
    """Index ``[B]`` of the reference view from tokens ``[B, S, P, C]`` (token 0 = CLS).

    ``saddle_balanced`` picks the most "typical" view: mean cosine similarity of its CLS token to
    the other views, CLS norm and CLS feature variance are each min-max normalised over views and
    the view closest to 0.5 in all three (summed absolute distance) wins. ``saddle_sim_range``
    picks the view with the widest range of similarities; ``first`` / ``middle`` go by position.
    """
    if strategy not in REF_VIEW_STRATEGIES:
        raise ValueError(f"reference-view strategy must be one of {REF_VIEW_STRATEGIES}, got {strategy!r}")
    b, s = tokens.shape[:2]
    if s <= 1 or strategy == "first":
        return torch.zeros(b, dtype=torch.long, device=tokens.device)
    if strategy == "middle":
        return torch.full((b,), s // 2, dtype=torch.long, device=tokens.device)
    cls = tokens[:, :, 0]
    unit = cls / cls.norm(dim=-1, keepdim=True)
    others = unit @ unit.transpose(1, 2) - torch.eye(s, device=tokens.device, dtype=unit.dtype)
    if strategy == "saddle_sim_range":
        return (others.max(dim=-1).values - others.min(dim=-1).values).argmax(dim=1)

    def unit_range(m: torch.Tensor) -> torch.Tensor:
        lo, hi = m.min(dim=1, keepdim=True).values, m.max(dim=1, keepdim=True).values
        return (m - lo) / (hi - lo + 1e-8)

    metrics = (others.sum(dim=-1) / (s - 1), cls.norm(dim=-1), unit.var(dim=-1))
    score = sum((unit_range(m) - 0.5).abs() for m in metrics)
    return score.argmin(dim=1)


def reference_first_order(ref: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, S]`` view order with the reference first and the others in their original order."""
    pos = torch.arange(frames, device=ref.device).expand(ref.shape[0], frames)
    order = torch.where(pos <= ref[:, None], pos - 1, pos)
    order[:, 0] = ref
    return order


def take_views(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x [B, S, ...]`` with views reordered per batch element by ``order [B, S]``."""
    batch = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[batch, order]


# ---------------------------------------------------------------------------------------------
# Heads


class _ChannelsLast(nn.Module):
    """``[N, C, H, W]`` <-> ``[N, H, W, C]`` so a LayerNorm can normalise channels (no params)."""

    def __init__(self, to_last: bool) -> None:
        super().__init__()
        self.dims = (0, 2, 3, 1) if to_last else (0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class DualDPTHead(DPTHead):
    """DA3's head: the DPT depth branch (non-relu'd residual skips, float32 UV embedding) plus an
    independent auxiliary "ray" fusion chain. Only the depth branch runs in :meth:`forward`; the
    ray branch (which cam_dec makes redundant) is available via :meth:`ray_outputs`."""

    def __init__(self, dim_in: int, features: int, out_channels, frames_chunk: int = 8, levels: int = 4) -> None:
        super().__init__(dim_in, patch_size=14, output_dim=2, activation="exp", conf_activation="expp1",
                         features=features, out_channels=out_channels, layer_indices=(0, 1, 2, 3), pos_embed=True,
                         relu_skip=False, frames_chunk=frames_chunk, uv_float64=False)
        sc = self.scratch
        sc.refinenet1_aux = FusionBlock(features, True, False)
        sc.refinenet2_aux = FusionBlock(features, True, False)
        sc.refinenet3_aux = FusionBlock(features, True, False)
        sc.refinenet4_aux = FusionBlock(features, False, False)
        half = features // 2

        def neck() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(features, half, 3, padding=1), nn.Conv2d(half, features, 3, padding=1),
                                 nn.Conv2d(features, half, 3, padding=1), nn.Conv2d(half, features, 3, padding=1),
                                 nn.Conv2d(features, half, 3, padding=1))

        sc.output_conv1_aux = nn.ModuleList(neck() for _ in range(levels))
        # One LayerNorm object shared by all levels (as in the original): its weights appear under
        # four state-dict names, see DepthAnything3.tied_state_dict_names().
        shared_norm = nn.LayerNorm(32)
        sc.output_conv2_aux = nn.ModuleList(
            nn.Sequential(nn.Conv2d(half, 32, 3, padding=1), _ChannelsLast(True), shared_norm, _ChannelsLast(False),
                          nn.ReLU(), nn.Conv2d(32, 7, 1))
            for _ in range(levels)
        )

    def ray_outputs(self, token_list, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary branch: ``ray [B, S, h, w, 6]`` and ``ray_conf [B, S, h, w]`` at the
        finest fusion resolution (8x the patch grid)."""
        h, w = image_hw
        rows, cols = h // self.patch_size, w // self.patch_size
        b, s = token_list[0].shape[:2]
        sc = self.scratch
        levels = []
        for level, tokens in enumerate(token_list[:4]):
            x = self.norm(tokens.reshape(b * s, rows * cols, tokens.shape[-1]))
            x = x.permute(0, 2, 1).reshape(b * s, -1, rows, cols)
            x = add_uv_embedding(self.projects[level](x), w, h, float64=False)
            levels.append(self.resize_layers[level](x))
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(x) for i, x in enumerate(levels, start=1))
        out = sc.refinenet4_aux(l4, size=l3.shape[2:])
        out = sc.refinenet3_aux(out, l3, size=l2.shape[2:])
        out = sc.refinenet2_aux(out, l2, size=l1.shape[2:])
        out = sc.refinenet1_aux(out, l1)
        out = add_uv_embedding(sc.output_conv1_aux[-1](out), w, h, float64=False)
        values, conf = activate_dense(sc.output_conv2_aux[-1](out), "linear", "expp1")
        return values.reshape(b, s, *values.shape[1:]), conf.reshape(b, s, *conf.shape[1:])


class CameraDecoder(nn.Module):
    """Camera token ``[B, S, 2C]`` -> pose encoding ``[B, S, 9]`` (t, quaternion XYZW, fov_h,
    fov_w) of the **camera-to-world** pose; FoVs are ReLU'd."""

    def __init__(self, dim_in: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_in), nn.ReLU())
        self.fc_t = nn.Linear(dim_in, 3)
        self.fc_qvec = nn.Linear(dim_in, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim_in, 2), nn.ReLU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(tokens)
        return torch.cat([self.fc_t(feat), self.fc_qvec(feat), self.fc_fov(feat)], dim=-1).float()


def decode_camera(pose_enc: torch.Tensor, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DA3 pose encoding (camera-to-world) -> (world-to-camera ``[..., 3, 4]``, intrinsics
    ``[..., 3, 3]`` in input pixels). ``tan(fov/2)`` is clamped at 1e-6 as in the original, so a
    zero FoV gives a huge but finite focal length."""
    h, w = image_hw
    rot = quaternion_to_matrix(pose_enc[..., 3:7])
    rot_t = rot.transpose(-1, -2)
    w2c = torch.cat([rot_t, -(rot_t @ pose_enc[..., :3, None])], dim=-1)
    fy = (h / 2.0) / torch.clamp(torch.tan(pose_enc[..., 7] / 2.0), min=1e-6)
    fx = (w / 2.0) / torch.clamp(torch.tan(pose_enc[..., 8] / 2.0), min=1e-6)
    k = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    k[..., 0, 0], k[..., 1, 1] = fx, fy
    k[..., 0, 2], k[..., 1, 2], k[..., 2, 2] = w / 2, h / 2, 1.0
    return w2c, k


class CameraEncoderWeights(nn.Module):
    """``cam_enc`` (pose conditioning): weights only, so official checkpoints load strictly."""

    def __init__(self, dim_out: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*(Block(dim_out, num_heads, norm_eps=1e-5, init_values=0.01) for _ in range(depth)))
        self.token_norm = nn.LayerNorm(dim_out)
        self.trunk_norm = nn.LayerNorm(dim_out)
        self.pose_branch = Mlp(9, dim_out // 2, dim_out)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("pose-conditioned DA3 inference (cam_enc) is not implemented in spark3r")


class GaussianHeadWeights(nn.Module):
    """da3-giant's ``gs_head`` (3-D Gaussian splats): weights only, never run."""

    def __init__(self, dim_in: int, features: int, out_channels, output_dim: int) -> None:
        super().__init__()
        dpt = DPTHead(dim_in, output_dim=output_dim, activation="linear", conf_activation="sigmoid",
                      features=features, out_channels=out_channels, layer_indices=(0, 1, 2, 3), relu_skip=False)
        self.projects, self.resize_layers, self.scratch = dpt.projects, dpt.resize_layers, dpt.scratch
        merged = features // 2
        self.images_merger = nn.Sequential(
            nn.Conv2d(3, merged // 4, 3, padding=1), nn.GELU(), nn.Conv2d(merged // 4, merged // 2, 3, padding=1),
            nn.GELU(), nn.Conv2d(merged // 2, merged, 3, padding=1), nn.GELU(),
        )

    def forward(self, *args, **kwargs):
        raise NotImplementedError("the DA3 Gaussian-splat head is not implemented in spark3r; only its weights load")


class _Backbone(nn.Module):
    def __init__(self, pretrained: DinoViT) -> None:
        super().__init__()
        self.pretrained = pretrained


class DA3Net(nn.Module):
    """Module tree of the official ``DepthAnything3Net`` (names = checkpoint names)."""

    def __init__(self, cfg: DA3Config) -> None:
        super().__init__()
        self.backbone = _Backbone(DinoViT(
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            patch_size=cfg.patch_size, img_size=cfg.img_size, num_register_tokens=0, ffn=cfg.ffn, init_values=1.0,
            norm_eps=1e-6, final_norm_eps=1e-5, interpolate_antialias=False, interpolate_offset=0.1,
            with_mask_token=False, camera_token=True, qk_norm_start=cfg.alt_start, rope_start=cfg.alt_start,
            rope_freq=cfg.rope_freq,
        ))
        self.head = DualDPTHead(cfg.head_dim_in, cfg.head_features, cfg.head_out_channels, cfg.head_frames_chunk)
        self.cam_dec = CameraDecoder(cfg.head_dim_in)
        self.cam_enc = CameraEncoderWeights(cfg.embed_dim, cfg.cam_enc_depth, cfg.cam_enc_num_heads) if cfg.enable_cam_enc else None
        self.gs_head = (GaussianHeadWeights(cfg.head_dim_in, cfg.head_features, cfg.head_out_channels, cfg.gs_output_dim)
                        if cfg.enable_gs_head else None)


class DepthAnything3(BackboneModel):
    """DA3 multi-view depth + camera model. See :meth:`forward`."""

    HEAD_NAMES = HEAD_NAMES
    # Pose conditioning and the Gaussian-splat head are never run.
    UNUSED_MODULES = {"enable_cam_enc": False, "enable_gs_head": False}

    def __init__(self, config: DA3Config = DA3Config(), preset: Optional[str] = None) -> None:
        super().__init__()
        self.config = config
        self.preset = preset
        self.model = DA3Net(config)

    @property
    def vit(self) -> DinoViT:
        return self.model.backbone.pretrained

    # -- hook, cache and checkpoint API ---------------------------------------------------------

    def global_attention_modules(self) -> list[Attention]:
        """Attention of the multi-view blocks (odd blocks from ``alt_start``), in layer order."""
        return [self.vit.blocks[i].attn for i in self.config.global_blocks]

    def head_state_dict_prefixes(self) -> tuple[str, ...]:
        """Entries the official inference runs in float32 (``load_weights(head_dtype=...)``)."""
        return ("model.head.", "model.cam_dec.", "model.gs_head.")

    def disabled_head_prefixes(self) -> tuple[str, ...]:
        off = {"model.cam_enc.": self.model.cam_enc, "model.gs_head.": self.model.gs_head}
        return tuple(k for k, v in off.items() if v is None)

    def weight_dtype(self) -> torch.dtype:
        return self.vit.cls_token.dtype

    def patch_token_shape(self, batch: int, frames: int, grid: tuple[int, int]) -> tuple[int, ...]:
        return (batch, frames, 1 + grid[0] * grid[1], self.config.embed_dim)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Per-frame tokens ``[B, S, 1 + Np, C]`` (CLS + patches) after the purely frame-local
        blocks ``0 .. alt_start-2``, for images in [0, 1]. Frames are processed one at a time, so
        tokens of different calls can be combined (``forward(images, patch_tokens=...)``)."""
        images = batched_images(images, self.config.patch_size)
        b, s, _, h, w = images.shape
        vit = self.vit
        flat = normalize_images(images).to(vit.cls_token.dtype).reshape(b * s, 3, h, w)
        step = b * s if flat.is_meta else self.config.encoder_frames_chunk
        chunks = []
        for i in range(0, b * s, step):
            x = vit.prepare_tokens(flat[i : i + step])
            for blk in vit.blocks[: self.config.alt_start - 1]:
                x = blk(x)
            chunks.append(x)
        tokens = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
        return tokens.reshape(b, s, tokens.shape[1], tokens.shape[2])

    def run_backbone(
        self, tokens: torch.Tensor, grid: tuple[int, int], ref_view_strategy: Optional[str] = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Tokens from :meth:`encode_patches` -> (per out layer ``[B, S, 1 + Np, 2C]`` = cat(last
        frame-local output, current output), raw, in input view order; reference view ``[B]``,
        -1 where no selection ran)."""
        cfg = self.config
        vit = self.vit
        b, s, p, c = tokens.shape
        strategy = cfg.ref_view_strategy if ref_view_strategy is None else ref_view_strategy
        if strategy not in REF_VIEW_STRATEGIES:
            raise ValueError(f"ref_view_strategy must be one of {REF_VIEW_STRATEGIES}, got {strategy!r}")
        x = tokens
        restore = None
        ref = torch.full((b,), -1, dtype=torch.long, device=tokens.device)
        if s >= cfg.ref_view_min_frames:
            ref = select_reference_view(x, strategy)
            order = reference_first_order(ref, s)
            x = take_views(x, order)
            restore = torch.argsort(order, dim=1)
        local_pos = grid_positions(grid[0], grid[1], 1, device=x.device)
        # In multi-view blocks every patch sits at (1, 1): RoPE only separates camera from patches.
        global_pos = torch.ones_like(local_pos)
        global_pos[0] = 0
        global_index = {blk: n for n, blk in enumerate(cfg.global_blocks)}
        outputs = []
        local_x = x
        for i in range(cfg.alt_start - 1, cfg.depth):
            blk = vit.blocks[i]
            if i == cfg.alt_start:
                camera = torch.cat([vit.camera_token[:, :1].expand(b, 1, c), vit.camera_token[:, 1:].expand(b, s - 1, c)], 1)
                x = torch.cat([camera[:, :, None].to(x.dtype), x[:, :, 1:]], dim=2)
            if i in global_index:
                layout = TokenLayout(frames=s, tokens_per_frame=p, special_tokens=1, grid=(int(grid[0]), int(grid[1])),
                                     reference_frame=0, layer=global_index[i], num_layers=len(global_index))
                x = blk(x.reshape(b, s * p, c), pos=global_pos, layout=layout).reshape(b, s, p, c)
            else:
                pos = local_pos if i >= cfg.alt_start else None
                x = blk(x.reshape(b * s, p, c), pos=pos).reshape(b, s, p, c)
                local_x = x
            if i in cfg.out_layers:
                out = torch.cat([local_x, x], dim=-1)
                outputs.append(out if restore is None else take_views(out, restore))
        return outputs, ref

    def aggregate(self, tokens: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """The multi-view part alone (benchmarks): :meth:`run_backbone`'s out-layer features."""
        return self.run_backbone(tokens, grid)[0]

    def head_features(self, outputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Out-layer features -> (patch features ``[B, S, Np, 2C]`` with the second half final-
        normed, raw camera tokens ``[B, S, 2C]`` of the last out layer)."""
        c = self.config.embed_dim
        norm = self.vit.norm
        feats = [torch.cat([o[..., :c], norm(o[..., c:])], dim=-1)[:, :, 1:] for o in outputs]
        return feats, outputs[-1][:, :, 0]

    # -- forward ---------------------------------------------------------------------------------

    def forward_prepared(self, inputs: ForwardInputs, ref_view_strategy: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Multi-view blocks and the requested heads (``forward(images, patch_tokens=...,
        heads=..., ref_view_strategy=...)``; heads from ``("camera", "depth")``, default both).

        ``ref_view_strategy``: ``saddle_balanced`` (default of the config), ``first``, ``middle``
        or ``saddle_sim_range``; used for >= 3 views. Outputs are always in input order.

        Returns (official names, float32): ``depth`` [B,S,H,W], ``depth_conf`` [B,S,H,W],
        ``extrinsics`` [B,S,3,4] (world-to-camera, OpenCV; the world is the reference view's
        camera), ``intrinsics`` [B,S,3,3] (input pixels), plus ``pose_enc`` [B,S,9] (the
        camera-to-world encoding the extrinsics come from) and ``ref_view_index`` [B] (-1: none).
        """
        h, w = inputs.images.shape[-2:]
        wanted = inputs.heads
        outputs, ref = self.run_backbone(inputs.patch_tokens, inputs.grid, ref_view_strategy)
        feats, cam_tokens = self.head_features(outputs)
        out: dict[str, torch.Tensor] = {"ref_view_index": ref}
        if "depth" in wanted:
            head_dtype = self.model.head.norm.weight.dtype
            depth, conf = self.model.head([f.to(head_dtype) for f in feats], (h, w), 0)
            out["depth"], out["depth_conf"] = depth[..., 0].float(), conf.float()
        if "camera" in wanted:
            pose_enc = self.model.cam_dec(cam_tokens.to(self.model.cam_dec.fc_t.weight.dtype))
            out["pose_enc"] = pose_enc
            out["extrinsics"], out["intrinsics"] = decode_camera(pose_enc, (h, w))
        return out

    def decode(self, outputs: dict, image_hw: tuple[int, int]) -> BackboneOutputs:
        """``extrinsics`` (world-to-camera 3x4; world = the reference view's camera) -> c2w;
        ``intrinsics`` are already in network pixels; ``depth`` / ``depth_conf`` (``1 + exp``)."""
        c2w = intrinsics = depth = conf = None
        if "extrinsics" in outputs:
            c2w = camera_to_world(outputs["extrinsics"].detach().double())
            intrinsics = outputs["intrinsics"].detach().double()
        if "depth" in outputs:
            depth = outputs["depth"].detach().float()
            conf = outputs["depth_conf"].detach().float()
        return BackboneOutputs(c2w, intrinsics, depth, conf)
