"""Pre-norm transformer block with LayerScale (DINOv2 / VGGT / π3 / DA3 layout)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layout import TokenLayout

from .attention import Attention
from .mlp import make_ffn
from .rope import RoPE2D


class LayerScale(nn.Module):
    """Per-channel learned scale ``x * gamma`` (key ``gamma``)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))``.

    Args:
        norm_eps: LayerNorm eps of norm1/norm2 (1e-6 in DINOv2 and π3, 1e-5 in VGGT's aggregator).
        init_values: LayerScale init; ``None``/0 disables LayerScale (no ``ls*`` keys).
        qk_norm / qk_norm_eps: per-head LayerNorm on q and k (eps 1e-5 in all official models).
        rope: shared :class:`RoPE2D` or None.
        ffn: ``"mlp"`` or ``"swiglu"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        norm_eps: float = 1e-5,
        init_values: Optional[float] = None,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-5,
        rope: Optional[RoPE2D] = None,
        ffn: str = "mlp",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, rope=rope
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = make_ffn(ffn, dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(
        self, x: torch.Tensor, pos: Optional[torch.Tensor] = None, layout: Optional[TokenLayout] = None
    ) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos, layout=layout))
        return x + self.ls2(self.mlp(self.norm2(x)))
