"""Speed3R: dual-branch sparse global attention (arXiv 2603.08055).

Tokens are grouped into *blocks*: the patches of one ``block_size`` window (4x4 by default) of
one frame. Per global layer and head two branches run:

* **compression**: q, k, v mean-pooled over every block, then dense softmax attention over the
  pooled tokens (``blocks^2`` pairs instead of ``tokens^2``). The same pooled logits pick, per
  head and per query block, the ``top_k`` key blocks with the largest logit (ties to the lower
  block index; nothing forced in).
* **selection**: every full-resolution query of a block attends, in one softmax, to all tokens
  of its selected key blocks (``top_k * block tokens`` keys).

Two modes share these pieces:

**Learned (the official Speed3R-π3, ``pi3-speed3r``).** The layer has gates (``Linear(C ->
2*heads)`` + sigmoid on its input). Exactly the official computation: the *pre-norm* projections
are pooled (bias included), the layer's qk-norm is applied to the pooled q/k, RoPE at the
pooled position ``mean(positions).int()`` (truncated: (4i+1, 4j+1) for the window at (4i, 4j)),
pooled attention with scale ``head_dim**-0.5``, top-k on the raw (unscaled) pooled logits; the
selection branch on the normed, RoPE'd tokens; ``out = g_c * O_comp[block] + g_s * O_sel`` with
channel 2h = g_c, 2h+1 = g_s of head h (two separate softmaxes). Tokens must be window-major
(:class:`TokenLayout` ``window``), with no special tokens. With fewer than ``top_k`` blocks the
official kernel fills the missing slots with the last block (index ``blocks - 1``), so that block
is attended ``top_k - blocks + 1`` times — reproduced here, because the checkpoint was trained
with it.

**Training-free (every backbone; layers without gates).** No gates to learn how to mix two
softmaxes, so the branches are combined into *one* softmax whose key set is partitioned:

* exact keys: the tokens of the selected blocks, plus every *always-selected* token — the
  special tokens (camera/register) of every frame, all tokens of the reference frame and, with
  ``anchor_every = n``, of frames 0, n, 2n, ... (the paper keeps every 100th frame for VGGT);
* every unselected block b stands in as one pooled key with logit ``q_blk . k_b`` (block-mean
  query against block-mean key, which by linearity is the mean of the block pair's exact logits)
  plus ``log |b|`` (it stands for |b| tokens), and value ``mean v_b``.

Each of the three parts is computed with its log-sum-exp and they are merged by log-sum-exp
weights, so nothing is renormalised twice. When ``top_k`` covers all blocks the pooled part is
empty and every query sees every key exactly once: the result is dense attention up to fp32
rounding. The special tokens and the reference frame's tokens are queries of dense attention
over all keys. Pooling is of the post-RoPE q/k the dense path computes (no new positions), blocks
are windows of the row-major patch grid of every non-reference frame; windows at the right and
bottom edge of a grid that is not a multiple of the window are smaller (masked, and their pooled
logit bias uses their true size).

Memory: the pooled logits, the gathered keys and the selection logits exist only for a chunk of
query blocks at a time (``chunk_elements`` floats per intermediate), so 8k+ tokens never
materialise a tokens x tokens or blocks x top_k x tokens tensor. Pure PyTorch, any device/dtype;
the pooled branch and all softmax statistics are computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .common import Workspace, check_qkv, exact_attention, layout_key
from .layout import TokenLayout

# Floats per chunk intermediate (pooled logits, gathered keys, selection logits): 64 MiB in fp32.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Speed3RConfig:
    """Parameters of the ``speed3r`` method (CLI ``--block-size``/``--top-k``, ROS
    ``reduction.block_size``/``reduction.top_k``).

    block_size: (rows, cols) of the patch window that forms one block; each >= 1 (default 4x4,
        the official value; the learned model only runs with the size it was trained with).
    top_k: key blocks each query block attends to exactly, >= 1; values >= the number of blocks
        mean every block (training-free mode: then exactly dense attention).
    anchor_every: training-free mode: frames 0, n, 2n, ... are always selected (every query sees
        all their tokens exactly), >= 0; 0 = none (the paper's VGGT variant uses 100).
    """

    block_size: tuple[int, int] = (4, 4)
    top_k: int = 32
    anchor_every: int = 0

    def __post_init__(self) -> None:
        block = tuple(int(x) for x in self.block_size) if not isinstance(self.block_size, int) else (int(self.block_size),) * 2
        object.__setattr__(self, "block_size", block)
        if len(block) != 2 or min(block) < 1:
            raise ValueError(f"block_size must be two positive ints (rows, cols), got {self.block_size}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or int(self.top_k) < 1:
            raise ValueError(f"top_k (key blocks per query block) must be an int >= 1, got {self.top_k}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if isinstance(self.anchor_every, bool) or int(self.anchor_every) != self.anchor_every or int(self.anchor_every) < 0:
            raise ValueError(f"anchor_every (every n-th frame always selected; 0 = none) must be an int >= 0, got {self.anchor_every}")
        object.__setattr__(self, "anchor_every", int(self.anchor_every))

    @property
    def block_tokens(self) -> int:
        return self.block_size[0] * self.block_size[1]


# ---------------------------------------------------------------------------------------------
# Token order and pooling (learned model)


def window_major_permutation(rows: int, cols: int, window: tuple[int, int], device=None) -> torch.Tensor:
    """``[rows*cols]`` int64: entry i is the row-major patch index of the i-th token in
    window-major order (windows row-major, patches row-major inside a window), so
    ``x[:, perm]`` reorders and ``x[:, perm.argsort()]`` restores."""
    wr, wc = window
    if rows % wr or cols % wc:
        raise ValueError(f"a {rows}x{cols} patch grid is not a multiple of the {wr}x{wc} window")
    grid = torch.arange(rows * cols, device=device).view(rows // wr, wr, cols // wc, wc)
    return grid.permute(0, 2, 1, 3).reshape(-1)


def pool_blocks(x: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Mean over consecutive groups of ``block_tokens`` tokens: ``[..., N, d] -> [..., N/bt, d]``."""
    n = x.shape[-2]
    if n % block_tokens:
        raise ValueError(f"{n} tokens do not split into blocks of {block_tokens}")
    return x.unflatten(-2, (n // block_tokens, block_tokens)).mean(-2)


def pooled_positions(pos: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Integer positions of pooled blocks: the mean (row, col) of each block's tokens, truncated
    toward zero as the official code does (``.float().mean().int()``): ``[..., N, 2] -> [..., N/bt, 2]``."""
    n = pos.shape[-2]
    if n % block_tokens:
        raise ValueError(f"{n} positions do not split into blocks of {block_tokens}")
    return pos.unflatten(-2, (n // block_tokens, block_tokens)).float().mean(-2).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# Block selection and the two branches


def topk_key_blocks(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``logits [..., n]`` the ``k`` largest entries' indices, largest first, ties to
    the lower index. With ``n < k`` the official kernel's padding: all n indices, then ``n - 1``
    repeated ``k - n`` times. Returns int64 ``[..., k]``."""
    n = logits.shape[-1]
    if n <= k:
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        if n == k:
            return order
        pad = order.new_full(order.shape[:-1] + (k - n,), n - 1)
        return torch.cat((order, pad), dim=-1)
    values, index = torch.topk(logits, k + 1, dim=-1)
    index = index[..., :k]
    # torch.topk breaks ties arbitrarily. Across the k-th / (k+1)-th place a tie decides the set;
    # inside the set only the order, which is then made (logit desc, index asc) like the kernel's.
    boundary_tie = values[..., k - 1] == values[..., k]
    if bool(boundary_tie.any()):
        index = index.clone()
        index[boundary_tie] = torch.sort(logits[boundary_tie], dim=-1, descending=True, stable=True).indices[..., :k]
    index = index.sort(dim=-1).values
    order = torch.sort(logits.gather(-1, index), dim=-1, descending=True, stable=True).indices
    return index.gather(-1, order)


def _chunks(count: int, per_item: int, budget: int) -> Iterator[tuple[int, int]]:
    step = max(1, budget // max(1, per_item))
    for start in range(0, count, step):
        yield start, min(count, start + step)


def pooled_attention(q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, top_k: int, scale: float,
                     chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The compression branch: ``softmax(q_c k_c^T * scale) v_c`` over all pooled tokens and, from
    the same raw logits ``q_c k_c^T``, the top-k key blocks (:func:`topk_key_blocks`).

    ``q_c, k_c, v_c [B, H, n, d]`` -> ``(out [B, H, n, d], index [B, H, n, top_k] int64)``;
    logits and softmax in fp32."""
    b, h, n, d = q_c.shape
    out = torch.empty_like(v_c)
    index = torch.empty(b, h, n, top_k, dtype=torch.int64, device=q_c.device)
    kt = k_c.float().transpose(-1, -2)
    vf = v_c.float()
    for s, e in _chunks(n, b * h * n, chunk_elements):
        logits = torch.matmul(q_c[:, :, s:e].float(), kt)
        index[:, :, s:e] = topk_key_blocks(logits, top_k)
        out[:, :, s:e] = torch.matmul(torch.softmax(logits * scale, dim=-1), vf).to(out.dtype)
    return out, index


def _block_rows(blocks: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather whole blocks: ``blocks [B, H, n, bt, d]``, ``index [B, H, c, k]`` -> ``[B, H, c, k*bt, d]``
    (one ``index_select`` over the blocks of all heads; into ``out`` when given — a buffer reused
    across chunks costs no page faults, which on CPU are as slow as the copy itself)."""
    b, h, n, bt, d = blocks.shape
    c, k = index.shape[2], index.shape[3]
    head = torch.arange(b * h, device=index.device).view(b, h, 1, 1) * n
    flat = (index + head).reshape(-1)
    rows = blocks.reshape(b * h * n, bt * d)
    if out is None:
        return rows.index_select(0, flat).view(b, h, c, k * bt, d)
    torch.index_select(rows, 0, flat, out=out.view(-1, bt * d))
    return out.view(b, h, c, k * bt, d)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, block_tokens: int,
                           scale: float, chunk_elements: int = CHUNK_ELEMENTS,
                           workspace: Optional[Workspace] = None) -> torch.Tensor:
    """The selection branch on consecutive blocks: the queries of block m attend, in one softmax,
    to all tokens of the key blocks ``index[..., m, :]`` (a repeated block counts repeatedly).

    ``q, k, v [B, H, N, d]`` with N a multiple of ``block_tokens``, ``index [B, H, N/bt, k]``
    -> ``[B, H, N, d]``."""
    b, h, n_tok, d = q.shape
    bt = block_tokens
    n = n_tok // bt
    top = index.shape[-1]
    kb = k.reshape(b, h, n, bt, d)
    vb = v.reshape(b, h, n, bt, d)
    qb = q.reshape(b * h, n, bt, d)
    out = torch.empty(b * h, n, bt, d, dtype=q.dtype, device=q.device)
    per_block = b * h * top * bt * max(d, bt)
    for s, e in _chunks(n, per_block, chunk_elements):
        idx = index[:, :, s:e]
        shape = (b, h, e - s, top * bt, d)
        if workspace is not None:
            ks = _block_rows(kb, idx, workspace.buffer("speed3r.k", shape, k.dtype, k.device))
            vs = _block_rows(vb, idx, workspace.buffer("speed3r.v", shape, v.dtype, v.device))
        else:
            ks, vs = _block_rows(kb, idx), _block_rows(vb, idx)
        ks, vs = ks.view(b * h, e - s, top * bt, d), vs.view(b * h, e - s, top * bt, d)
        out[:, s:e] = F.scaled_dot_product_attention(qb[:, s:e], ks, vs, scale=scale)
    return out.view(b, h, n_tok, d)


def gated_combine(out_pooled: torch.Tensor, out_selected: torch.Tensor, gates: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """``g_c * out_pooled[block of the token] + g_s * out_selected`` per head.

    ``out_pooled [B, H, n, d]``, ``out_selected [B, H, N, d]``, ``gates [B, N, 2H]`` (channel 2h
    gates head h's pooled branch, 2h+1 its selection branch) -> ``[B, H, N, d]``."""
    b, h, n, d = out_pooled.shape
    g = gates.unflatten(-1, (h, 2)).permute(0, 2, 1, 3).to(out_selected.dtype)  # [B, H, N, 2]
    g = g.unflatten(2, (n, block_tokens))  # [B, H, n, bt, 2]
    mixed = g[..., 0:1] * out_pooled[:, :, :, None, :] + g[..., 1:2] * out_selected.unflatten(2, (n, block_tokens))
    return mixed.flatten(2, 3)


def speed3r_gated_attention(inputs, config: Speed3RConfig, chunk_elements: int = CHUNK_ELEMENTS,
                            workspace: Optional[Workspace] = None) -> torch.Tensor:
    """The official Speed3R layer (see the module docstring) from the layer's
    :class:`~spark3r.models.layers.attention.AttentionLayerInputs`; ``[B, H, N, d]`` before the
    output projection."""
    layout: TokenLayout = inputs.layout
    bt = config.block_tokens
    if layout.window != config.block_size or layout.special_tokens:
        raise ValueError(
            f"a layer with learned Speed3R gates needs window-major tokens in {config.block_size} windows and no "
            f"special tokens; the layer reports window={layout.window}, special_tokens={layout.special_tokens}")
    if inputs.pos is None:
        raise ValueError("Speed3R needs the token positions (pos) for the pooled RoPE")
    q_raw, k_raw, v = inputs.projections()
    q_c, k_c = inputs.normalize(pool_blocks(q_raw, bt), pool_blocks(k_raw, bt))
    pos_c = pooled_positions(inputs.pos, bt)
    q_c, k_c = inputs.rotate(q_c, pos_c).to(v.dtype), inputs.rotate(k_c, pos_c).to(v.dtype)
    out_pooled, index = pooled_attention(q_c, k_c, pool_blocks(v, bt), config.top_k, inputs.scale, chunk_elements)
    q, k = inputs.normalize(q_raw, k_raw)
    q, k = inputs.rotate(q, inputs.pos).to(v.dtype), inputs.rotate(k, inputs.pos).to(v.dtype)
    out_selected = block_sparse_attention(q, k, v.contiguous(), index, bt, inputs.scale, chunk_elements, workspace)
    return gated_combine(out_pooled, out_selected, inputs.gates(), bt)


# ---------------------------------------------------------------------------------------------
# Training-free mode


@dataclass(frozen=True)
class BlockTable:
    """Blocks of a row-major layout (device tensors; depends only on the layout, window and
    anchor stride). Query blocks cover every non-reference frame; key blocks are the query blocks
    of the frames that are not anchors."""

    tokens: torch.Tensor  # [nb, bt] int64 token of each block slot; padding slots repeat the block's first token
    valid: torch.Tensor  # [nb, bt] bool, False for padding slots of edge windows
    sizes: torch.Tensor  # [nb] float32 real tokens per block
    key_blocks: torch.Tensor  # [nk] int64 rows of `tokens` that are selectable key blocks
    dense: torch.Tensor  # [P] int64 queries attending densely: special tokens + reference frame
    always: torch.Tensor  # [A] int64 keys every query sees exactly: `dense` + the anchor frames' patches
    padded: bool


@lru_cache(maxsize=64)
def _block_table(key: tuple, window: tuple[int, int], anchor_every: int, device: str) -> BlockTable:
    frames, tpf, special, grid, ref = key
    layout = TokenLayout(frames, tpf, special, grid, ref)
    rows, cols = grid
    wr, wc = window
    nr, nc = -(-rows // wr), -(-cols // wc)
    r = (torch.arange(nr)[:, None, None, None] * wr + torch.arange(wr)[None, None, :, None]).expand(nr, nc, wr, wc)
    c = (torch.arange(nc)[None, :, None, None] * wc + torch.arange(wc)[None, None, None, :]).expand(nr, nc, wr, wc)
    valid = ((r < rows) & (c < cols)).reshape(nr * nc, wr * wc)
    local = (r * cols + c).reshape(nr * nc, wr * wc)
    local = torch.where(valid, local, local[:, :1])  # slot 0 of a window is always inside the grid
    kept = [f for f in range(frames) if f != ref]
    frames_kept = torch.tensor(kept, dtype=torch.int64)
    tokens = (frames_kept[:, None, None] * tpf + special + local[None]).reshape(-1, wr * wc)
    valid = valid.expand(len(kept), -1, -1).reshape(-1, wr * wc)
    anchor = torch.tensor([bool(anchor_every) and f % anchor_every == 0 for f in kept], dtype=torch.bool)
    per_frame = nr * nc
    key_blocks = torch.nonzero((~anchor).repeat_interleave(per_frame), as_tuple=False).flatten()
    dense = torch.nonzero(layout.protected_mask(), as_tuple=False).flatten()
    anchor_rows = torch.nonzero(anchor.repeat_interleave(per_frame), as_tuple=False).flatten()
    anchor_tokens = tokens[anchor_rows][valid[anchor_rows]]
    always = torch.cat((dense, anchor_tokens)).sort().values
    return BlockTable(tokens.to(device), valid.to(device), valid.sum(-1).float().to(device), key_blocks.to(device),
                      dense.to(device), always.to(device), bool((~valid).any()))


def block_table(layout: TokenLayout, window: tuple[int, int], device, anchor_every: int = 0) -> BlockTable:
    if layout.window is not None:
        raise ValueError("training-free Speed3R expects row-major patch tokens (this layout is window-major)")
    return _block_table(layout_key(layout), tuple(window), int(anchor_every), str(torch.device(device)))


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    key_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp: ``q [B, H, M, d]``, ``k, v [B, H, K, d]``, optional
    additive ``key_bias`` broadcastable to ``[B, H, 1, K]`` -> ``(out [B, H, M, d], lse [B, H, M]
    fp32)``. On CPU without autograd the flash kernel (which returns the log-sum-exp), elsewhere
    an fp32 softmax."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if _CPU_FLASH is not None and q.device.type == "cpu" and not needs_grad:
        mask = None if key_bias is None else key_bias.to(q.dtype)
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse.float()
    logits = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if key_bias is not None:
        logits = logits + key_bias
    top = logits.amax(-1, keepdim=True).detach()
    weights = (logits - top).exp()
    total = weights.sum(-1, keepdim=True)
    out = torch.matmul((weights / total).to(v.dtype), v)
    return out, (top + total.log()).squeeze(-1)


def merge_partial_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax attention over the union of disjoint key sets from each set's ``(out, lse)``
    (shapes broadcastable): ``sum_i exp(lse_i - L) out_i / sum_i exp(lse_i - L)``."""
    top = parts[0][1]
    for _, lse in parts[1:]:
        top = torch.maximum(top, lse)
    num, den = 0, 0
    for out, lse in parts:
        w = (lse - top).exp()
        num = num + w[..., None] * out.float()
        den = den + w
    return (num / den[..., None]).to(parts[0][0].dtype)


def training_free_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                            config: Speed3RConfig, scale: Optional[float] = None,
                            chunk_elements: int = CHUNK_ELEMENTS, workspace: Optional[Workspace] = None) -> torch.Tensor:
    """Speed3R without learned gates (module docstring): ``[B, H, N, d]`` in token order."""
    b, h, n_tok, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    table = block_table(layout, config.block_size, q.device, config.anchor_every)
    nb, bt = table.tokens.shape
    nk = table.key_blocks.numel()
    if nb == 0:
        return exact_attention(q, k, v, scale)
    flat = table.tokens.reshape(-1)
    qb, kb, vb = (t.index_select(2, flat).view(b, h, nb, bt, d) for t in (q, k, v))
    slot_weight = (table.valid.float() / table.sizes[:, None])[..., None]  # masked mean
    q_pool = (qb.float() * slot_weight).sum(-2)
    key_weight = slot_weight.index_select(0, table.key_blocks)
    k_pool, v_pool = ((t.index_select(2, table.key_blocks).float() * key_weight).sum(-2) for t in (kb, vb))
    log_sizes = table.sizes.index_select(0, table.key_blocks).log()
    key_bias = None
    if table.padded:
        key_bias = torch.zeros(nb, bt, device=q.device).masked_fill_(~table.valid, float("-inf"))
    top = min(config.top_k, nk)
    out = torch.empty_like(q)
    if table.dense.numel():
        out[:, :, table.dense] = exact_attention(q.index_select(2, table.dense), k, v, scale)
    always = None
    if table.always.numel():
        # The always-selected keys for all block queries in one call (merged per chunk below).
        o_always, lse_always = attend_with_lse(qb.view(b, h, nb * bt, d), k.index_select(2, table.always),
                                               v.index_select(2, table.always), scale)
        always = (o_always.view(b, h, nb, bt, d), lse_always.view(b, h, nb, bt))
    k_pool_t = k_pool.transpose(-1, -2)
    per_block = b * h * (2 * nk + 2 * top * bt * d + bt * d)
    for s, e in _chunks(nb, per_block, chunk_elements):
        c = e - s
        parts = []
        if always is not None:
            parts.append((always[0][:, :, s:e], always[1][:, :, s:e]))
        if top:
            logits = torch.matmul(q_pool[:, :, s:e], k_pool_t)  # [B, H, c, nk], mean logits of block pairs
            index = topk_key_blocks(logits, top)
            rows = table.key_blocks[index]
            bias = None
            if key_bias is not None:
                bias = key_bias.index_select(0, rows.reshape(-1)).view(b * h, c, 1, top * bt)
            if workspace is not None:
                shape = (b, h, c, top * bt, d)
                ks = _block_rows(kb, rows, workspace.buffer("speed3r.k", shape, k.dtype, k.device))
                vs = _block_rows(vb, rows, workspace.buffer("speed3r.v", shape, v.dtype, v.device))
            else:
                ks, vs = _block_rows(kb, rows), _block_rows(vb, rows)
            o_sel, lse_sel = attend_with_lse(qb[:, :, s:e].reshape(b * h, c, bt, d), ks.view(b * h, c, top * bt, d),
                                             vs.view(b * h, c, top * bt, d), scale, bias)
            parts.append((o_sel.view(b, h, c, bt, d), lse_sel.view(b, h, c, bt)))
            if top < nk:
                # Every unselected block as one key: logit = mean logit + log(size), value = mean value.
                w = logits.mul_(scale).add_(log_sizes).scatter_(-1, index, float("-inf"))
                lse = torch.logsumexp(w, dim=-1)
                o = torch.matmul(torch.softmax(w, dim=-1), v_pool)
                parts.append((o[:, :, :, None, :], lse[:, :, :, None]))
        merged = merge_partial_attention(parts)  # [B, H, c, bt, d]
        if table.padded:
            valid = table.valid[s:e]
            out[:, :, table.tokens[s:e][valid]] = merged[:, :, valid]
        else:
            out[:, :, table.tokens[s:e].reshape(-1)] = merged.reshape(b, h, c * bt, d)
    return out


# ---------------------------------------------------------------------------------------------
# The op


class Speed3ROp:
    """The ``speed3r`` global-attention op: the learned layer where the layer has gates, the
    training-free combination everywhere else (``attend_layer``); ``__call__`` is the
    training-free op on q, k, v (op-level benchmarks)."""

    def __init__(self, config: Speed3RConfig = Speed3RConfig(), chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.config = config
        self.chunk_elements = int(chunk_elements)
        # Gather buffers shared by the chunks and layers of a forward (per thread).
        self.workspace = Workspace()

    def is_identity(self, layer: int) -> bool:
        return False

    def attend_layer(self, inputs) -> torch.Tensor:
        if inputs.has_gates:
            grad = torch.is_grad_enabled()  # out= gathers are not differentiable
            return speed3r_gated_attention(inputs, self.config, self.chunk_elements, None if grad else self.workspace)
        q, k, v = inputs.qkv()
        return self(q, k, v, inputs.layout)

    def __call__(self, q, k, v, layout: TokenLayout, scale: Optional[float] = None) -> torch.Tensor:
        check_qkv(q, k, v, layout)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return training_free_attention(q, k, v, layout, self.config, scale, self.chunk_elements,
                                       None if grad else self.workspace)

    def reduced_sizes(self, layout: TokenLayout) -> tuple[int, int]:
        """(queries, keys per query) of the block queries' exact attention: every block query
        sees the always-selected tokens and ``top_k`` blocks (padding slots of edge windows
        included, they are computed). The protected queries' dense rows, the pooled branch and
        the gates are in :meth:`overhead_flops`."""
        if layout.window is not None:
            return layout.num_tokens, min(self.config.top_k * self.config.block_tokens, layout.num_tokens)
        table = block_table(layout, self.config.block_size, "cpu", self.config.anchor_every)
        nb, bt = table.tokens.shape
        if nb == 0:
            return layout.num_tokens, layout.num_tokens
        return int(table.valid.sum()), table.always.numel() + min(self.config.top_k, table.key_blocks.numel()) * bt

    def overhead_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> int:
        """Per layer: pooling (3 N d), the pooled logits and pooled attention / fold (4 n^2 d),
        merging the partial results (6 N d) or mixing the branches (3 N d) plus the gate Linear
        (2 N C 2H), and the protected queries' dense rows (4 P N d)."""
        n_tok, d = layout.num_tokens, head_dim
        if layout.window is not None:
            nb = n_tok // self.config.block_tokens
            per_head = 3 * n_tok * d + 4 * nb * nb * d + 3 * n_tok * d
            return batch * (heads * per_head + 2 * n_tok * heads * d * 2 * heads)
        table = block_table(layout, self.config.block_size, "cpu", self.config.anchor_every)
        nb, nk = table.tokens.shape[0], table.key_blocks.numel()
        if nb == 0:
            return 0
        per_head = 3 * n_tok * d + 4 * nb * nk * d + 6 * n_tok * d + 4 * table.dense.numel() * n_tok * d
        return batch * heads * per_head


def make_op(config: Speed3RConfig, num_layers: int, backbone: Optional[str]) -> Speed3ROp:
    return Speed3ROp(config)


__all__ = [
    "Speed3RConfig", "Speed3ROp", "window_major_permutation", "pool_blocks", "pooled_positions", "topk_key_blocks",
    "pooled_attention", "block_sparse_attention", "gated_combine", "speed3r_gated_attention",
    "training_free_attention", "merge_partial_attention", "block_table", "CHUNK_ELEMENTS",
]
