"""Multi-head self-attention: the only place in spark3r where attention is computed.

Global (multi-view) layers are the plug-in point for token reduction: an :class:`Attention`
module whose ``global_op`` is set hands q, k, v (after qk-norm and RoPE) together with a
:class:`~spark3r.models.layers.layout.TokenLayout` to that operation instead of running dense SDPA. With
``global_op = None`` the exact dense path runs.

An op that needs more of the layer than q, k, v (Speed3R pools the *pre-norm* projections, then
applies the layer's qk-norm and RoPE at positions of its own, and gates its branches from the
block's attention input) defines ``attend_layer(inputs)`` instead: it receives an
:class:`AttentionLayerInputs`, the one view of the layer's internals, and computes nothing the
op does not ask for.
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


class AttentionLayerInputs:
    """What a layer-level global op (one with ``attend_layer``) may use of the calling layer.

    ``x`` is the layer input ``[B, N, C]`` (the block's normed hidden state), ``pos`` the token
    positions the layer was called with, ``layout`` its :class:`TokenLayout`. The fused qkv
    projection runs at most once, on the first request.
    """

    def __init__(self, module: "Attention", x: torch.Tensor, pos: Optional[torch.Tensor], layout: TokenLayout) -> None:
        self.module = module
        self.x = x
        self.pos = pos
        self.layout = layout
        self._raw: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    @property
    def head_dim(self) -> int:
        return self.module.head_dim

    @property
    def scale(self) -> float:
        return self.module.scale

    def projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, heads, N, head_dim]`` straight from the qkv Linear (bias included),
        before qk-norm and RoPE (strided views of one projection)."""
        if self._raw is None:
            self._raw = self.module.raw_qkv(self.x)
        return self._raw

    def normalize(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's qk-norm (identity when it has none) on any ``[..., head_dim]`` tensors."""
        return self.module.q_norm(q), self.module.k_norm(k)

    def rotate(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The layer's RoPE at ``pos`` (``[M, 2]`` repeating every M tokens, or ``[B, M, 2]``)."""
        return t if self.module.rope is None else self.module.rope(t, pos)

    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v exactly as the dense path computes them (after qk-norm and RoPE)."""
        q, k, v = self.projections()
        q, k = self.normalize(q, k)
        if self.module.rope is not None:
            if self.pos is None:
                raise ValueError("this attention layer uses RoPE and needs token positions (pos)")
            q, k = self.rotate(q, self.pos), self.rotate(k, self.pos)
        return q, k, v

    @property
    def has_gates(self) -> bool:
        return self.module.gate is not None

    def gates(self) -> Optional[torch.Tensor]:
        """The layer's learned branch gates ``[B, N, 2*heads]`` in (0, 1) (sigmoid of a Linear of
        ``x``), or None for a layer without gates."""
        return None if self.module.gate is None else self.module.gate(self.x)


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
        gates: bool = False,
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
        # Speed3R layers: Linear(C -> 2*heads) + sigmoid on the layer input; channel 2h gates
        # head h's compression branch, 2h+1 its selection branch (key ``gate.0``).
        self.gate = nn.Sequential(nn.Linear(dim, 2 * num_heads), nn.Sigmoid()) if gates else None
        self.global_op: Optional[GlobalAttentionOp] = None

    def raw_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, heads, N, head_dim]`` before qk-norm and RoPE."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def project_qkv(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None):
        """q, k, v as ``[B, heads, N, head_dim]`` after qk-norm and RoPE."""
        q, k, v = self.raw_qkv(x)
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
        op = self.global_op
        if op is None:
            out = dense_attention(*self.project_qkv(x, pos))
        else:
            if layout is None:
                raise RuntimeError(
                    "global_op is set on an attention layer that receives no TokenLayout; only the "
                    "modules listed by model.global_attention_modules() can take a global op"
                )
            if layout.num_tokens != n:
                raise ValueError(f"TokenLayout describes {layout.num_tokens} tokens but the layer sees {n}")
            attend_layer = getattr(op, "attend_layer", None)
            if attend_layer is not None:
                out = attend_layer(AttentionLayerInputs(self, x, pos, layout))
            else:
                out = op(*self.project_qkv(x, pos), layout, scale=None)
            expected = (b, self.num_heads, n, self.head_dim)
            if tuple(out.shape) != expected:
                raise ValueError(f"global_op returned shape {tuple(out.shape)}, expected {expected}")
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
