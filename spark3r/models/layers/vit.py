"""DINOv2 vision transformer with register tokens, as the frame encoder of VGGT, π3 and DA3.

Token order after :meth:`DinoViT.prepare_tokens`: ``[CLS, registers..., patches...]``. The
learned position embedding covers CLS + a square grid of patches (37x37 for img_size 518) and is
resized to the actual patch grid (see :func:`interpolate_pos_embed`); registers get none.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .rope import RoPE2D


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution; key ``proj``. Output ``[N, rows*cols, dim]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], *, antialias: bool, offset: float
) -> torch.Tensor:
    """Resize a ``[1, 1 + M*M, C]`` (CLS + square grid) embedding to ``[1, 1 + rows*cols, C]``.

    Two conventions exist in the official models, both bicubic in float32:

    * ``offset == 0`` (VGGT, π3): an explicit target size, with or without antialiasing.
    * ``offset > 0`` (DINOv2 default, DA3): a scale factor ``(n + offset) / M`` per axis, the
      historical work-around for floating-point rounding of the output size.

    The CLS row is kept as-is. Returns the embedding in the input dtype.
    """
    rows, cols = grid
    n = pos_embed.shape[1] - 1
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    dtype = pos_embed.dtype
    pe = pos_embed.float()
    cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
    dim = pe.shape[-1]
    image = patch_pe.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((rows + offset) / m, (cols + offset) / m)}
    else:
        kwargs = {"size": (rows, cols)}
    image = F.interpolate(image, mode="bicubic", antialias=antialias, **kwargs)
    if tuple(image.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"position-embedding resize produced {tuple(image.shape[-2:])}, expected {(rows, cols)}")
    patch_pe = image.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([cls_pe, patch_pe], dim=1).to(dtype)


class DinoViT(nn.Module):
    """DINOv2 ViT (flat ``blocks.N``) with optional registers, mask token and SwiGLU FFN.

    Defaults are those of the VGGT/π3 encoders: LayerNorm eps 1e-6, LayerScale init 1.0, no
    qk-norm and no RoPE, antialiased explicit-size position-embedding interpolation.

    Depth-Anything-3 extends the ViT into a multi-view network: ``camera_token=True`` adds its
    ``camera_token`` [1, 2, C] (reference view / other views), and blocks from
    ``qk_norm_start`` / ``rope_start`` on get per-head qk LayerNorm / 2-D RoPE (the caller then
    drives the blocks itself and passes positions).
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        patch_size: int = 14,
        img_size: int = 518,
        num_register_tokens: int = 4,
        ffn: str = "mlp",
        init_values: Optional[float] = 1.0,
        norm_eps: float = 1e-6,
        final_norm_eps: Optional[float] = None,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
        with_mask_token: bool = True,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        camera_token: bool = False,
        qk_norm_start: Optional[int] = None,
        rope_start: Optional[int] = None,
        rope_freq: float = 100.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        base_grid = img_size // patch_size
        # Own parameters first, in the official registration order (state-dict order).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, embed_dim)) if camera_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + base_grid * base_grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        # Unused at inference (masked-image training); kept so official checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False) if with_mask_token else None
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.rope = RoPE2D(rope_freq) if rope_start is not None else None
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                norm_eps=norm_eps,
                init_values=init_values,
                ffn=ffn,
                qk_norm=qk_norm_start is not None and i >= qk_norm_start,
                rope=self.rope if rope_start is not None and i >= rope_start else None,
            )
            for i in range(depth)
        )
        # DA3 pairs eps-1e-6 blocks with an eps-1e-5 final norm; VGGT/π3 use 1e-6 throughout.
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps if final_norm_eps is None else final_norm_eps)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1, 1 + rows*cols, C]`` for a patch grid; the stored one when it already fits."""
        n = self.pos_embed.shape[1] - 1
        rows, cols = grid
        # The official code only skips the resize for a square grid of the stored size.
        if rows * cols == n and rows == cols:
            return self.pos_embed
        return interpolate_pos_embed(
            self.pos_embed, grid, antialias=self.interpolate_antialias, offset=self.interpolate_offset
        )

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` (already normalised) -> ``[N, 1 + registers + patches, C]``."""
        n, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = x + self.position_embedding((h // p, w // p))
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final-normed CLS, register and patch tokens (official DINOv2 dict names)."""
        x = self.prepare_tokens(images)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x[:, 0],
            "x_norm_regtokens": x[:, 1 : 1 + r],
            "x_norm_patchtokens": x[:, 1 + r :],
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed patch tokens ``[N, rows*cols, C]`` (what VGGT and π3 consume)."""
        return self.forward_features(images)["x_norm_patchtokens"]
