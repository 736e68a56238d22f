"""VGGT (Visual Geometry Grounded Transformer) built from the shared layers.

Numerically the official ``facebookresearch/vggt`` model (commit a288dd0); its ``state_dict()``
has the official entry names and shapes, so released checkpoints load strictly.

Data flow: images ``[B, S, 3, H, W]`` in [0, 1] -> ImageNet normalisation -> per-frame DINOv2
patch tokens (:meth:`VGGT.encode_patches`, cacheable) -> ``[camera, 4 registers, patches]`` per
frame -> ``depth`` x (frame block, global block) with qk-norm + 2-D RoPE -> heads. Global
attention layers hand q, k, v to ``Attention.global_op`` when one is set (token reduction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .layers.layout import TokenLayout

from .base import BackboneModel, BackboneOutputs, ForwardInputs, camera_to_world
from .camera import pose_encoding_to_extrinsics_intrinsics
from .images import batched_images, normalize_images
from .layers.attention import Attention
from .layers.block import Block
from .layers.dpt import DPTHead
from .layers.mlp import Mlp
from .layers.rope import RoPE2D, grid_positions
from .layers.vit import DinoViT

HEAD_NAMES = ("camera", "depth", "point")


@dataclass(frozen=True)
class VGGTConfig:
    """Architecture numbers of a VGGT model (defaults = the released VGGT-1B)."""

    img_size: int = 518  # size the learned DINO position embedding was trained for
    patch_size: int = 14
    # Alternating-attention aggregator (its width is also the encoder width)
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    # DINOv2 encoder (ViT with registers)
    encoder_depth: int = 24
    encoder_num_heads: int = 16
    encoder_mlp_ratio: float = 4.0
    encoder_ffn: str = "mlp"
    # Frames per DINO call. 1 makes each frame's patch tokens independent of which other frames
    # were encoded with it (bitwise), which is what patch-token caching relies on.
    encoder_frames_chunk: int = 1
    # Camera head
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_mlp_ratio: float = 4.0
    camera_iterations: int = 4
    # DPT heads (depth, point map)
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, ...] = (4, 11, 17, 23)
    dpt_frames_chunk: int = 8
    # Track head (weights only; never run)
    track_features: int = 128
    enable_camera: bool = True
    enable_point: bool = True
    enable_depth: bool = True
    enable_track: bool = True

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or self.embed_dim % self.encoder_num_heads:
            raise ValueError("embed_dim must be divisible by num_heads and encoder_num_heads")
        if any(not 0 <= i < self.depth for i in self.dpt_layers):
            raise ValueError(f"dpt_layers {self.dpt_layers} must lie in 0..{self.depth - 1}")
        if self.encoder_frames_chunk < 1:
            raise ValueError("encoder_frames_chunk must be >= 1")

    @property
    def encoder_embed_dim(self) -> int:
        return self.embed_dim

    @property
    def special_tokens(self) -> int:
        """Camera token + registers at the start of every frame."""
        return 1 + self.num_register_tokens

    @property
    def head_dim_in(self) -> int:
        """Channels the heads see: frame-block output ‖ global-block output."""
        return 2 * self.embed_dim

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Aggregator layers whose outputs the heads read."""
        return tuple(sorted(set(self.dpt_layers) | {self.depth - 1}))


def _per_frame_special(token: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """``[1, 2, k, C]`` -> ``[B, S, k, C]``: slot 0 for the first frame, slot 1 for all others."""
    first = token[:, :1].expand(b, 1, -1, -1)
    rest = token[:, 1:].expand(b, s - 1, -1, -1)
    return torch.cat([first, rest], dim=1)


class Aggregator(nn.Module):
    """Alternating frame/global attention over per-frame DINO patch tokens."""

    def __init__(self, cfg: VGGTConfig, global_gates: bool = False) -> None:
        """``global_gates``: the global blocks' attention gets learned Speed3R branch gates
        (``attn.gate.0``; :mod:`.vggt_speed3r`)."""
        super().__init__()
        c = cfg.embed_dim
        self.cfg = cfg
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, c))
        self.patch_embed = DinoViT(
            embed_dim=c,
            depth=cfg.encoder_depth,
            num_heads=cfg.encoder_num_heads,
            mlp_ratio=cfg.encoder_mlp_ratio,
            patch_size=cfg.patch_size,
            img_size=cfg.img_size,
            num_register_tokens=4,  # DINOv2 "reg" backbones always carry 4
            ffn=cfg.encoder_ffn,
            init_values=1.0,
            norm_eps=1e-6,
            interpolate_antialias=True,
            interpolate_offset=0.0,
        )
        self.rope = RoPE2D(cfg.rope_freq) if cfg.rope_freq > 0 else None

        def make_block(gated: bool = False) -> Block:
            return Block(
                c,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                norm_eps=1e-5,
                init_values=cfg.init_values,
                qk_norm=cfg.qk_norm,
                qk_norm_eps=1e-5,
                rope=self.rope,
                attn_gates=gated,
            )

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.global_blocks = nn.ModuleList(make_block(global_gates) for _ in range(cfg.depth))

    @property
    def patch_start_idx(self) -> int:
        return self.cfg.special_tokens

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, S, 3, H, W]`` in [0, 1] -> final-normed DINO patch tokens ``[B, S, Np, C]``."""
        b, s, _, h, w = images.shape
        # Normalise at the input precision, then cast: bf16 weights should not see bf16-rounded
        # raw pixels shifted by the mean.
        flat = normalize_images(images).to(self.camera_token.dtype).reshape(b * s, 3, h, w)
        # On the meta device nothing is computed, so chunking would only add per-op overhead
        # (e.g. when counting FLOPs of a 1000-frame forward).
        step = b * s if flat.is_meta else self.cfg.encoder_frames_chunk
        tokens = [self.patch_embed(flat[i : i + step]) for i in range(0, b * s, step)]
        tokens = tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=0)
        return tokens.reshape(b, s, tokens.shape[1], tokens.shape[2])

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> list[Optional[torch.Tensor]]:
        """Patch tokens ``[B, S, Np, C]`` -> list (one slot per layer) of ``[B, S, P, 2C]``
        outputs; only ``cfg.kept_layers`` are filled, the others are None."""
        cfg = self.cfg
        b, s, n_patch, c = patch_tokens.shape
        tokens = torch.cat(
            [
                _per_frame_special(self.camera_token, b, s),
                _per_frame_special(self.register_token, b, s),
                patch_tokens,
            ],
            dim=2,
        )
        p = tokens.shape[2]
        # One frame's positions; RoPE repeats them for every frame in global attention.
        pos = grid_positions(grid[0], grid[1], cfg.special_tokens, device=tokens.device) if self.rope else None
        kept = set(cfg.kept_layers)
        outputs: list[Optional[torch.Tensor]] = [None] * cfg.depth
        for i in range(cfg.depth):
            x = self.frame_blocks[i](tokens.reshape(b * s, p, c), pos=pos)
            frame_out = x.reshape(b, s, p, c)
            layout = TokenLayout(
                frames=s,
                tokens_per_frame=p,
                special_tokens=cfg.special_tokens,
                grid=(int(grid[0]), int(grid[1])),
                reference_frame=0,
                layer=i,
                num_layers=cfg.depth,
            )
            x = self.global_blocks[i](x.reshape(b, s * p, c), pos=pos, layout=layout)
            tokens = x.reshape(b, s, p, c)
            if i in kept:
                outputs[i] = torch.cat([frame_out, tokens], dim=-1)
        return outputs


class CameraHead(nn.Module):
    """Iterative pose regression from the camera tokens (4 refinement steps, adaLN-modulated)."""

    def __init__(self, dim_in: int, trunk_depth: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 0.01, iterations: int = 4) -> None:
        super().__init__()
        self.iterations = iterations
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, 9))
        self.trunk = nn.Sequential(
            *(Block(dim_in, num_heads, mlp_ratio=mlp_ratio, norm_eps=1e-5, init_values=init_values) for _ in range(trunk_depth))
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.embed_pose = nn.Linear(9, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, 9)

    @staticmethod
    def activate(raw: torch.Tensor) -> torch.Tensor:
        """Translation and quaternion linear, FoV ReLU (keeps FoVs non-negative)."""
        return torch.cat([raw[..., :7], torch.relu(raw[..., 7:])], dim=-1)

    def forward(self, last_tokens: torch.Tensor, iterations: Optional[int] = None) -> list[torch.Tensor]:
        """``[B, S, P, dim_in]`` (last aggregator layer) -> one ``[B, S, 9]`` per iteration."""
        cam = self.token_norm(last_tokens[:, :, 0])
        b, s, _ = cam.shape
        raw: Optional[torch.Tensor] = None
        results = []
        for _ in range(iterations or self.iterations):
            cond = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1) if raw is None else raw.detach())
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(cam) * (1 + scale) + shift) + cam
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            raw = delta if raw is None else raw + delta
            results.append(self.activate(raw))
        return results


class _AttnBlockWeights(nn.Module):
    """Self-attention block of the tracker (weights only)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = Mlp(dim, hidden)


class _CrossAttnBlockWeights(nn.Module):
    """Cross-attention block of the tracker (weights only)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = Mlp(dim, hidden)


class _UpdateFormerWeights(nn.Module):
    def __init__(self, input_dim: int, hidden: int, output_dim: int, depth: int = 6, virtual_tracks: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.virual_tracks = nn.Parameter(torch.zeros(1, virtual_tracks, 1, hidden))  # sic: official key
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden)
        self.output_norm = nn.LayerNorm(hidden)
        self.flow_head = nn.Linear(hidden, output_dim)
        mlp = 4 * hidden
        self.time_blocks = nn.ModuleList(_AttnBlockWeights(hidden, heads, mlp) for _ in range(depth))
        self.space_virtual_blocks = nn.ModuleList(_AttnBlockWeights(hidden, heads, mlp) for _ in range(depth))
        self.space_point2virtual_blocks = nn.ModuleList(_CrossAttnBlockWeights(hidden, heads, mlp) for _ in range(depth))
        self.space_virtual2point_blocks = nn.ModuleList(_CrossAttnBlockWeights(hidden, heads, mlp) for _ in range(depth))


class _TrackerWeights(nn.Module):
    def __init__(self, latent: int = 128, hidden: int = 384, corr_levels: int = 7, corr_radius: int = 4) -> None:
        super().__init__()
        transformer_dim = 3 * latent + 4
        self.query_ref_token = nn.Parameter(torch.zeros(1, 2, transformer_dim))
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden, latent)
        self.updateformer = _UpdateFormerWeights(transformer_dim, hidden, latent + 2)
        self.fmap_norm = nn.LayerNorm(latent)
        self.ffeat_norm = nn.GroupNorm(1, latent)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent, latent), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent, 1))


class TrackHead(nn.Module):
    """Point-tracking head: present so official checkpoints load strictly; not implemented."""

    def __init__(self, dim_in: int, patch_size: int, features: int = 128) -> None:
        super().__init__()
        self.feature_extractor = DPTHead(
            dim_in, patch_size=patch_size, features=features, feature_only=True, down_ratio=2, pos_embed=False
        )
        self.tracker = _TrackerWeights(latent=features)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("VGGT point tracking is not implemented in spark3r; only its weights are loaded")


class VGGT(BackboneModel):
    """VGGT backbone + heads. See :meth:`forward` for inputs and outputs."""

    HEAD_NAMES = HEAD_NAMES
    UNUSED_MODULES = {"enable_track": False}
    _HEAD_FLAGS = {"camera": "enable_camera", "depth": "enable_depth", "point": "enable_point"}
    # Global blocks with learned Speed3R gates (the VGGT Speed3R student, .vggt_speed3r).
    GATED_GLOBAL_ATTENTION = False

    def __init__(self, config: VGGTConfig = VGGTConfig(), preset: Optional[str] = None) -> None:
        super().__init__()
        self.config = config
        self.preset = preset
        dim_in = config.head_dim_in
        self.aggregator = Aggregator(config, global_gates=self.GATED_GLOBAL_ATTENTION)
        self.camera_head = (
            CameraHead(dim_in, config.camera_trunk_depth, config.camera_num_heads, config.camera_mlp_ratio,
                       config.init_values, config.camera_iterations)
            if config.enable_camera else None
        )

        def dpt(output_dim: int, activation: str) -> DPTHead:
            return DPTHead(
                dim_in, patch_size=config.patch_size, output_dim=output_dim, activation=activation,
                conf_activation="expp1", features=config.dpt_features, out_channels=config.dpt_out_channels,
                layer_indices=config.dpt_layers, pos_embed=True, relu_skip=True, frames_chunk=config.dpt_frames_chunk,
            )

        self.point_head = dpt(4, "inv_log") if config.enable_point else None
        self.depth_head = dpt(2, "exp") if config.enable_depth else None
        self.track_head = TrackHead(dim_in, config.patch_size, config.track_features) if config.enable_track else None

    # -- hook and cache API ---------------------------------------------------------------------

    def global_attention_modules(self) -> list[Attention]:
        """The attention module of every global block, in layer order."""
        return [blk.attn for blk in self.aggregator.global_blocks]

    def disabled_head_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of heads switched off in this model (ignored when loading)."""
        names = {"camera_head": self.camera_head, "point_head": self.point_head,
                 "depth_head": self.depth_head, "track_head": self.track_head}
        return tuple(f"{k}." for k, v in names.items() if v is None)

    def enabled_heads(self) -> set[str]:
        heads = {"camera": self.camera_head, "depth": self.depth_head, "point": self.point_head}
        return {name for name, mod in heads.items() if mod is not None}

    @classmethod
    def inference_overrides(cls, outputs: Optional[Iterable[str]] = None) -> dict:
        """No track head; with ``outputs`` (subset of camera/depth/point) also no unlisted head."""
        overrides = dict(cls.UNUSED_MODULES)
        if outputs is not None:
            wanted = set(outputs)
            overrides.update({flag: False for head, flag in cls._HEAD_FLAGS.items() if head not in wanted})
        return overrides

    def weight_dtype(self) -> torch.dtype:
        return self.aggregator.camera_token.dtype

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Per-frame DINO patch tokens ``[B, S, Np, C]`` for images ``[S,3,H,W]``/``[B,S,3,H,W]``
        in [0, 1]. Passing them back as ``forward(images, patch_tokens=...)`` gives bitwise the
        same outputs as recomputing; frames are encoded independently (``encoder_frames_chunk=1``),
        so tokens cached from earlier calls can be concatenated with new ones."""
        return self.aggregator.encode_patches(batched_images(images, self.config.patch_size))

    def patch_token_shape(self, batch: int, frames: int, grid: tuple[int, int]) -> tuple[int, ...]:
        return (batch, frames, grid[0] * grid[1], self.config.embed_dim)

    def aggregate(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> list[Optional[torch.Tensor]]:
        """The alternating-attention aggregator (see :meth:`Aggregator.forward`)."""
        return self.aggregator(patch_tokens, grid)

    def decode(self, outputs: dict, image_hw: tuple[int, int]) -> BackboneOutputs:
        """``pose_enc`` (world-to-camera + FoV) -> c2w and intrinsics; ``depth``/``depth_conf``
        (confidence ``1 + exp``, already >= 1); ``world_points`` as the points."""
        c2w = intrinsics = depth = conf = None
        if "pose_enc" in outputs:
            w2c, intrinsics = pose_encoding_to_extrinsics_intrinsics(outputs["pose_enc"].detach().double(), image_hw)
            c2w = camera_to_world(w2c)
        if "depth" in outputs:
            depth = outputs["depth"].detach()[..., 0].float()
            conf = outputs["depth_conf"].detach().float()
        points = outputs.get("world_points")
        return BackboneOutputs(c2w, intrinsics, depth, conf, None if points is None else points.detach())

    # -- forward ---------------------------------------------------------------------------------

    def forward_prepared(self, inputs: ForwardInputs) -> dict[str, torch.Tensor]:
        """Aggregator and the requested heads (``forward(images, patch_tokens=..., heads=...)``
        with heads from ``("camera", "depth", "point")``; default all enabled).

        Returns (official names; B is always present):
            ``pose_enc`` [B,S,9] and ``pose_enc_list`` (per iteration), ``depth`` [B,S,H,W,1],
            ``depth_conf`` [B,S,H,W], ``world_points`` [B,S,H,W,3], ``world_points_conf``
            [B,S,H,W], ``images`` (the batched input).
        """
        images, wanted = inputs.images, inputs.heads
        h, w = images.shape[-2:]
        tokens = self.aggregate(inputs.patch_tokens, inputs.grid)
        start = self.aggregator.patch_start_idx
        out: dict[str, torch.Tensor] = {}
        if "camera" in wanted:
            last = tokens[-1]
            poses = self.camera_head(last.to(self.camera_head.embed_pose.weight.dtype))
            out["pose_enc"] = poses[-1]
            out["pose_enc_list"] = poses
        if "depth" in wanted:
            head_tokens = self._tokens_for(self.depth_head, tokens)
            out["depth"], out["depth_conf"] = self.depth_head(head_tokens, (h, w), start)
        if "point" in wanted:
            head_tokens = self._tokens_for(self.point_head, tokens)
            out["world_points"], out["world_points_conf"] = self.point_head(head_tokens, (h, w), start)
        out["images"] = images
        return out

    @staticmethod
    def _tokens_for(head: DPTHead, tokens: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        dtype = head.norm.weight.dtype
        return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tokens]
