"""Multi-head self-attention: the only place in spark3r where attention is computed.

Global (multi-view) layers are the plug-in point for token reduction: an :class:`Attention`
module whose ``global_op`` is set hands q, k, v (after qk-norm and RoPE) together with a
:class:`~spark3r.models.layers.layout.TokenLayout` to that operation instead of running dense SDPA. With
``global_op = None`` the exact dense path runs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layout import GlobalAttentionOp, TokenLayout

from .rope import RoPE2D


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Exact softmax attention ``[B, heads, N, d]`` -> ``[B, heads, N, d]`` (PyTorch SDPA)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class Attention(nn.Module):
    """Fused-qkv attention with optional per-head qk LayerNorm and 2-D RoPE.

    Parameter names (``qkv``, ``q_norm``, ``k_norm``, ``proj``) follow the official checkpoints.

    Attributes:
        global_op: ``None`` (dense SDPA) or a :class:`GlobalAttentionOp`. Only modules returned
            by a backbone's ``global_attention_modules()`` receive a layout; setting it on any
            other module makes its forward fail with a clear error.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-5,
        rope: Optional[RoPE2D] = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope
        self.global_op: Optional[GlobalAttentionOp] = None

    def project_qkv(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None):
        """q, k, v as ``[B, heads, N, head_dim]`` after qk-norm and RoPE."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if pos is None:
                raise ValueError("this attention layer uses RoPE and needs token positions (pos)")
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        return q, k, v

    def forward(
        self, x: torch.Tensor, pos: Optional[torch.Tensor] = None, layout: Optional[TokenLayout] = None
    ) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.project_qkv(x, pos)
        if self.global_op is None:
            out = dense_attention(q, k, v)
        else:
            if layout is None:
                raise RuntimeError(
                    "global_op is set on an attention layer that receives no TokenLayout; only the "
                    "modules listed by model.global_attention_modules() can take a global op"
                )
            if layout.num_tokens != n:
                raise ValueError(f"TokenLayout describes {layout.num_tokens} tokens but the layer sees {n}")
            out = self.global_op(q, k, v, layout, scale=None)
            if out.shape != q.shape:
                raise ValueError(f"global_op returned shape {tuple(out.shape)}, expected {tuple(q.shape)}")
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
