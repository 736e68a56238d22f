"""Pieces shared by the reduction methods: exact attention, input checks, static token indices,
row gathers and reusable buffers.

Everything here is a pure function of tensors and a :class:`TokenLayout`; index tensors that
depend only on the layout are cached (a layout differs between layers only in ``layer``, which
the cache key leaves out, so all global layers of a forward share them).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from spark3r.models.layers.layout import TokenLayout


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


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius), in float64."""
    a, e = approx.double(), exact.double()
    return float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Memory traffic helpers for the reduced ops
#
# On CPU the reduced attention leaves little time for everything around it (at 8k tokens a
# Spark3R layer's SDPA runs ~6x faster than dense), so the ops gather rows with one
# ``index_select`` into buffers that live across calls: a fresh multi-megabyte tensor per call
# costs a page fault per 4 KiB page, which on Linux is as much time as the copy itself.


class Workspace:
    """Scratch buffers of one op, reused across calls (and across the layers of a forward).

    ``buffer`` hands out a named buffer that only the op itself uses between two calls.
    ``output`` hands out the op's result buffer, recycled only when nothing outside the
    workspace still references its storage (the previous result was consumed and dropped), so a
    caller that keeps a result never sees it overwritten. Buffers are per thread and per
    inference mode (inference tensors cannot be written outside ``torch.inference_mode``)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _store(self) -> dict:
        store = getattr(self._local, "buffers", None)
        if store is None:
            store = self._local.buffers = {}
        return store

    def _key(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple:
        return name, dtype, str(device), torch.is_inference_mode_enabled()

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        store = self._store()
        key = self._key(name, dtype, device)
        numel = math.prod(shape)
        buf = store.get(key)
        if buf is None or buf.numel() < numel:
            buf = store[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def output(self, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        store = self._store()
        key = self._key("<output>", dtype, device)
        buf = store.get(key)
        if buf is None or tuple(buf.shape) != tuple(shape) or _storage_users(buf) > 1:
            buf = store[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf.view(buf.shape)  # a new tensor object, so a caller holding it counts as a user

    def clear(self) -> None:
        """Free every buffer of the calling thread."""
        self._store().clear()


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s storage, ``t`` included (a large number when unknown, so
    the caller allocates instead of recycling)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return 1 << 30
    storage = t.untyped_storage()
    return int(use_count(storage._cdata)) - 1  # minus the temporary `storage` object itself


def row_view(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``x [B, H, N, d]`` as rows of its storage: ``(rows [R, d], head_row [B, H, 1], token_step)``
    with ``x[b, h, n] == rows[head_row[b, h] + n * token_step]``, without copying — also for
    strided views such as ``v`` taken from the fused qkv projection ``[B, N, 3, H, d]``."""
    b, h, n, d = x.shape
    strides = x.stride()
    if strides[3] != 1 or any(s % d for s in strides[:3]) or x.storage_offset() % d:
        x = x.contiguous()
        strides = x.stride()
    sb, sh, sn = (s // d for s in strides[:3])
    count = (b - 1) * sb + (h - 1) * sh + (n - 1) * sn + 1
    rows = torch.as_strided(x, (count, d), (d, 1), x.storage_offset())
    head_row = (torch.arange(b, device=x.device)[:, None] * sb + torch.arange(h, device=x.device)[None, :] * sh)
    return rows, head_row[..., None], sn


def gather_rows(x: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [B, H, N, d]``, ``index [B, H, M]`` -> ``[B, H, M, d]`` (``out`` if given, contiguous):
    one ``index_select`` over the rows of x's storage."""
    b, h, _, d = x.shape
    rows, head_row, step = row_view(x)
    flat = (index * step + head_row).reshape(-1)
    if out is None:
        return rows.index_select(0, flat).view(b, h, index.shape[-1], d)
    torch.index_select(rows, 0, flat, out=out.view(-1, d))
    return out


# ---------------------------------------------------------------------------------------------
# Attention over a key set plus a few extra keys with a logit bias


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_extra_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_extra: torch.Tensor, v_extra: torch.Tensor,
    bias: float, scale: Optional[float] = None,
) -> torch.Tensor:
    """Softmax attention of q over ``k/v`` plus ``k_extra/v_extra [B, H, E, d]`` whose logits get
    ``+ bias`` (e.g. compensation tokens standing for ``exp(bias)`` pruned tokens).

    On CPU: the flash kernel on k/v returns the log-sum-exp, and the E extra keys are folded in
    afterwards (``combine_extra_keys``) — a float mask in the kernel would cost ~7 % of the
    reduced attention. Elsewhere: one SDPA call over the concatenation with a float mask."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_extra, v_extra))
    if _CPU_FLASH is not None and q.device.type == "cpu" and not needs_grad:  # combine works in place
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, scale=scale)
        return combine_extra_keys(out, lse, q, k_extra, v_extra, bias, scale)
    return masked_attention_with_extra_keys(q, k, v, k_extra, v_extra, bias, scale)


def masked_attention_with_extra_keys(q, k, v, k_extra, v_extra, bias: float, scale: Optional[float] = None):
    """The same result as :func:`attention_with_extra_keys` through one masked SDPA call."""
    nk, ne = k.shape[2], k_extra.shape[2]
    mask = torch.zeros(1, 1, 1, nk + ne, dtype=q.dtype, device=q.device)
    mask[..., nk:] = bias
    return exact_attention(q, torch.cat((k, k_extra), 2), torch.cat((v, v_extra), 2), scale, attn_mask=mask)


def combine_extra_keys(out, lse, q, k_extra, v_extra, bias: float, scale: Optional[float] = None) -> torch.Tensor:
    """Fold extra keys into an attention result in place: ``out [B, H, M, d]`` and its
    log-sum-exp ``lse [B, H, M]`` over the main keys -> attention over main + extra keys."""
    b, h, m, d = out.shape
    e = k_extra.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q3, o3 = q.reshape(b * h, m, d), out.view(b * h, m, d)
    logits = torch.bmm(q3, k_extra.reshape(b * h, e, d).transpose(1, 2)).float().mul_(scale).add_(bias)
    lse = lse.reshape(b * h, m).float()
    top = torch.maximum(logits.amax(-1), lse)
    w_extra = logits.sub_(top[..., None]).exp_()
    w_main = lse.sub(top).exp_()
    inv = (w_extra.sum(-1) + w_main).reciprocal_()
    o3.mul_(w_main.mul_(inv)[..., None].to(out.dtype))
    o3.baddbmm_(w_extra.mul_(inv[..., None]).to(out.dtype), v_extra.reshape(b * h, e, d))
    return out
