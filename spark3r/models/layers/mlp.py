"""Feed-forward networks used inside transformer blocks.

Two variants share one slot in :class:`~spark3r.models.layers.block.Block`: the classic
two-layer MLP (``fc1``/``fc2``, VGGT, π3, most DINOv2 sizes) and SwiGLU (``w12``/``w3``, used by
the DINOv2 giant backbone of Depth-Anything-3). Parameter names match the official checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with exact (erf) GELU by default."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        bias: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``a, b = split(w12(x))``.

    ``hidden_features`` is the nominal MLP width (``dim * mlp_ratio``); like DINOv2 the actual
    gated width is ``2/3`` of it rounded up to a multiple of 8.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        bias: bool = True,
        act_layer: Optional[type[nn.Module]] = None,  # accepted for a uniform signature; SwiGLU fixes SiLU
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        gated = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * gated, bias=bias)
        self.w3 = nn.Linear(gated, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN}


def make_ffn(kind: str, dim: int, hidden: int, bias: bool) -> nn.Module:
    if kind not in FFN_LAYERS:
        raise ValueError(f"unknown feed-forward kind {kind!r}; expected one of {sorted(FFN_LAYERS)}")
    return FFN_LAYERS[kind](dim, hidden, bias=bias)
