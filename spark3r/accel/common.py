"""Pieces shared by the reduction methods: exact attention, input checks, static token indices
and per-head token gathers.

Everything here is a pure function of tensors and a :class:`TokenLayout`; index tensors that
depend only on the layout are cached (a layout differs between layers only in ``layer``, which
the cache key leaves out, so all global layers of a forward share them).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from .layout import TokenLayout


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention through PyTorch SDPA — the same call as the model's dense path, so a
    method that falls back to it is bit-for-bit dense."""
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> None:
    """Raise a clear error when q/k/v do not match the layout (``[B, heads, N, head_dim]``)."""
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, N, head_dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != layout.num_tokens:
        raise ValueError(f"q has {q.shape[2]} tokens but the layout describes {layout.num_tokens} "
                         f"({layout.frames} frames x {layout.tokens_per_frame})")


def layout_key(layout: TokenLayout) -> tuple:
    """The part of a layout that decides token indices (everything but the layer number)."""
    return (layout.frames, layout.tokens_per_frame, layout.special_tokens, layout.grid, layout.reference_frame)


def reduced_frames(layout: TokenLayout) -> list[int]:
    """Frames whose patch tokens a method may reduce: all but the reference frame."""
    return [f for f in range(layout.frames) if f != layout.reference_frame]


@dataclass(frozen=True)
class StaticIndex:
    """Token indices that depend only on the layout (int64, on one device)."""

    protected: torch.Tensor  # [Np] protected tokens in token order (specials of all frames + reference frame)
    reducible: torch.Tensor  # [F, patches] patch tokens of the reducible frames, row-major per frame
    frames: tuple[int, ...]  # which frame each row of `reducible` is


@lru_cache(maxsize=64)
def _static_index(key: tuple, device: str) -> StaticIndex:
    frames, tpf, special, grid, ref = key
    layout = TokenLayout(frames, tpf, special, grid, ref)
    protected = torch.nonzero(layout.protected_mask(), as_tuple=False).flatten()
    rf = reduced_frames(layout)
    patch = torch.arange(special, tpf)
    reducible = (torch.tensor(rf, dtype=torch.long)[:, None] * tpf + patch[None, :]) if rf else \
        torch.zeros(0, tpf - special, dtype=torch.long)
    return StaticIndex(protected.to(device), reducible.to(device), tuple(rf))


def static_index(layout: TokenLayout, device: torch.device | str) -> StaticIndex:
    return _static_index(layout_key(layout), str(torch.device(device)))


def gather_per_head(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, H, N, d]``, ``index [B, H, M]`` (per-head token indices) -> ``[B, H, M, d]``.

    One flat ``index_select`` instead of ``torch.gather`` with an index expanded over ``d``,
    which would materialise an int64 tensor as large as the output."""
    b, h, n, d = x.shape
    m = index.shape[-1]
    if not x.is_contiguous():  # e.g. v as a view into the fused qkv projection: don't copy all of x
        return x.gather(2, index[..., None].expand(b, h, m, d))
    offset = (torch.arange(b * h, device=x.device) * n).view(b, h, 1)
    flat = (index + offset).reshape(-1)
    return x.reshape(b * h * n, d).index_select(0, flat).view(b, h, m, d)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius), in float64."""
    a, e = approx.double(), exact.double()
    return float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp_min(1e-30))
