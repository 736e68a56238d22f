"""Speed3R: dual-branch sparse global attention (arXiv 2603.08055).

Tokens are grouped into *blocks*: the patches of one ``block_size`` window (4x4 by default) of
one frame. Per global layer and head two branches run (the tensor functions live with the model
layer, :mod:`spark3r.models.layers.sparse_attention`):

* **compression**: q, k, v mean-pooled over every block, then dense softmax attention over the
  pooled tokens (``blocks^2`` pairs instead of ``tokens^2``). The same pooled logits pick, per
  head and per query block, the ``top_k`` key blocks with the largest logit (ties to the lower
  block index; nothing forced in).
* **selection**: every full-resolution query of a block attends, in one softmax, to all tokens
  of its selected key blocks (``top_k * block tokens`` keys).

Two modes share these pieces:

**Learned (the official Speed3R-π3, ``pi3-speed3r``; the VGGT student ``vggt-nano-speed3r``).**
Where the layer has gates, the op runs the model's own learned layer,
:func:`spark3r.models.layers.sparse_attention.gated_sparse_attention` (documented there), with
this op's ``block_size``, ``top_k`` and ``anchor_every``: the official layer on window-major tokens
(:class:`TokenLayout` ``window``, no special tokens), or on a VGGT-family row-major layout
:func:`~spark3r.models.layers.sparse_attention.gated_block_attention` (special tokens and the
reference frame dense and always selected; the blocks, top-k and selection tiles of the
training-free mode below).

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

Memory: the pooled logits exist only for a chunk of query blocks at a time (``chunk_elements``
floats per intermediate), the gathered keys of the selected blocks for one cache-sized tile
(:func:`~spark3r.models.layers.sparse_attention.selected_block_tiles`), so 8k+ tokens never
materialise a tokens x tokens or blocks x top_k x tokens tensor. PyTorch on any device/dtype
(the spec); the pooled branch and all softmax statistics are computed in fp32. On CPU in fp32
without autograd the block queries (always-selected keys, selected blocks, pooled part and the
merge) run in one fused C kernel instead (``native/block_attention.c``, off with
``SPARK3R_NATIVE=0``), which also serves the learned layer's selection branch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from spark3r.models.layers.layout import TokenLayout
from spark3r.models.layers.sparse_attention import (CHUNK_ELEMENTS, TILE_ELEMENTS, BlockTable, attend_with_lse,
                                                    block_table, chunk_ranges, gated_sparse_attention,
                                                    merge_partial_attention, padding_bias, selected_blocks_attention,
                                                    topk_key_blocks)

from . import native
from .common import Workspace, check_qkv, exact_attention, gather_rows
from .op import AttentionCost, attention_matmul_flops, dense_cost


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

    block_size: tuple[int, int] = field(default=(4, 4), metadata={
        "doc": "speed3r: patch window (rows, cols) forming one block, each >= 1 (the learned pi3-speed3r runs only with 4x4)"})
    top_k: int = field(default=32, metadata={
        "doc": "speed3r: key blocks attended exactly per query block (>= the number of blocks: dense in the training-free mode)",
        "range": (1, 1_000_000)})
    anchor_every: int = field(default=0, metadata={
        "doc": "speed3r training-free: frames 0, n, 2n, ... are always selected as exact keys (0 = none; the paper uses 100 "
               "for VGGT)", "range": (0, 1_000_000)})

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
# Training-free mode


def _scratch(buffer, name: str, shape: tuple, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device) if buffer is torch.empty else buffer(name, shape, dtype, device)


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
    buffer = torch.empty if workspace is None else workspace.buffer
    flat = table.tokens.reshape(-1).expand(b, h, -1)
    qb, kb, vb = (gather_rows(t, flat, None if workspace is None else workspace.buffer(f"speed3r.{name}b", (b, h, nb * bt, d),
                                                                                        t.dtype, t.device))
                  .view(b, h, nb, bt, d) for name, t in (("q", q), ("k", k), ("v", v)))
    # Masked block means as one batched mat-vec per block (no [B, H, nb, bt, d] product temporary).
    slot_weight = table.slot_weights  # [nb, 1, bt]
    q_pool = torch.matmul(slot_weight, qb.float()).squeeze(-2)
    all_keys = nk == nb  # no anchor frames: every block is a key block
    key_weight = slot_weight if all_keys else slot_weight.index_select(0, table.key_blocks)
    k_pool, v_pool = (torch.matmul(key_weight, (t if all_keys else t.index_select(2, table.key_blocks)).float()).squeeze(-2)
                      for t in (kb, vb))
    log_sizes = table.sizes.index_select(0, table.key_blocks).log()
    key_bias = padding_bias(table)
    top = min(config.top_k, nk)
    out = torch.empty_like(q)
    if out.stride(-1) != 1:  # q's own layout, unless its rows are not unit-stride (the kernel writes rows)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if table.dense.numel():
        out[:, :, table.dense] = exact_attention(q.index_select(2, table.dense), k, v, scale)
    if native.block_attention_usable(q, k, v):
        _fused_block_queries(qb, kb, vb, k, v, q_pool, k_pool, v_pool, log_sizes, table, top, scale, chunk_elements,
                             workspace, out)
        return out
    always = None
    if table.always.numel():
        # The always-selected keys for all block queries in one call (merged per chunk below).
        o_always, lse_always = attend_with_lse(qb.view(b, h, nb * bt, d), k.index_select(2, table.always),
                                               v.index_select(2, table.always), scale)
        always = (o_always.view(b, h, nb, bt, d), lse_always.view(b, h, nb, bt))
    k_pool_t = k_pool.transpose(-1, -2)
    per_block = b * h * (2 * nk + 4 * bt * d)
    kb_heads, vb_heads = kb.view(b * h, nb, bt, d), vb.view(b * h, nb, bt, d)
    tile = min(TILE_ELEMENTS, chunk_elements)
    for s, e in chunk_ranges(nb, per_block, chunk_elements):
        c = e - s
        parts = []
        if always is not None:
            parts.append((always[0][:, :, s:e], always[1][:, :, s:e]))
        if top:
            logits = torch.matmul(q_pool[:, :, s:e], k_pool_t)  # [B, H, c, nk], mean logits of block pairs
            index = topk_key_blocks(logits, top)
            rows = table.key_blocks[index].view(b * h, c, top)
            o_sel = _scratch(buffer, "speed3r.o_sel", (b * h * c, bt, d), q.dtype, q.device)
            lse_sel = _scratch(buffer, "speed3r.lse_sel", (b * h * c, bt), torch.float32, q.device)
            selected_blocks_attention(qb[:, :, s:e].reshape(b * h * c, bt, d), kb_heads, vb_heads, rows, scale, key_bias,
                                      None if workspace is None else workspace.buffer, tile, o_sel, lse_sel)
            parts.append((o_sel.view(b, h, c, bt, d), lse_sel.view(b, h, c, bt)))
            if top < nk:
                o, lse = _pooled_part(logits, index, log_sizes, v_pool, scale)
                parts.append((o[:, :, :, None, :], lse[:, :, :, None]))
        merged = merge_partial_attention(parts, None if workspace is None else  # [B, H, c, bt, d]
                                         workspace.buffer("speed3r.merged", (b, h, c, bt, d), torch.float32, q.device))
        if table.padded:
            valid = table.valid[s:e]
            out[:, :, table.tokens[s:e][valid]] = merged[:, :, valid]
        else:
            out[:, :, table.tokens[s:e].reshape(-1)] = merged.reshape(b, h, c * bt, d)
    return out


def _pooled_part(logits: torch.Tensor, index: torch.Tensor, log_sizes: torch.Tensor, v_pool: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unselected block as one key (logit = mean logit + log(size), value = mean value):
    ``(out [B, H, c, d], lse [B, H, c])`` of the pooled part; overwrites ``logits``."""
    w = logits.mul_(scale).add_(log_sizes).scatter_(-1, index, float("-inf"))
    return torch.matmul(torch.softmax(w, dim=-1), v_pool), torch.logsumexp(w, dim=-1)


def _fused_block_queries(qb, kb, vb, k, v, q_pool, k_pool, v_pool, log_sizes, table: BlockTable, top: int,
                         scale: float, chunk_elements: int, workspace: Optional[Workspace], out: torch.Tensor) -> None:
    """The block queries' rows of ``out`` through the fused CPU kernel (``native/block_attention.c``):
    always-selected keys, selected blocks and pooled part in one online softmax per query block,
    read from the block-major gathers — the same result as the eager chunk loop."""
    b, h, nb, bt, d = qb.shape
    nk = table.key_blocks.numel()
    always = None
    if table.always.numel():
        index = table.always.expand(b, h, -1)
        always = tuple(gather_rows(t, index, None if workspace is None else workspace.buffer(
            f"speed3r.always_{name}", (b, h, index.shape[-1], d), t.dtype, t.device)).view(b * h, -1, d)
            for name, t in (("k", k), ("v", v)))
    kv_blocks = [t.view(b * h, nb, bt, d) for t in (qb, kb, vb)]
    valid = table.valid if table.padded else None
    k_pool_t = k_pool.transpose(-1, -2)
    for s, e in chunk_ranges(nb, b * h * (2 * nk + 2 * d), chunk_elements):
        c = e - s
        extra = None
        if top:
            logits = torch.matmul(q_pool[:, :, s:e], k_pool_t)
            index = topk_key_blocks(logits, top)
            rows = table.key_blocks[index].view(b * h, c, top)
            if top < nk:
                o, lse = _pooled_part(logits, index, log_sizes, v_pool, scale)
                extra = (o.reshape(b * h, c, d), lse.reshape(b * h, c))
        else:
            rows = torch.zeros(b * h, c, 0, dtype=torch.int64, device=qb.device)
        native.block_attention(*kv_blocks, rows, s, out, scale, key_valid=valid, always=always, extra=extra,
                               query_tokens=table.tokens, query_valid=valid)


def fused_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                                 block_tokens: int, scale: float) -> Optional[torch.Tensor]:
    """The learned layer's selection branch through the fused CPU kernel, as the ``kernel`` of
    :func:`~spark3r.models.layers.sparse_attention.block_sparse_attention` (same arguments, same
    result); None where the kernel cannot run."""
    if not native.block_attention_usable(q, k, v):
        return None
    b, h, n_tok, d = q.shape
    blocks = [t.reshape(b * h, n_tok // block_tokens, block_tokens, d).contiguous() for t in (q, k, v)]
    out = torch.empty(b, h, n_tok, d, dtype=q.dtype, device=q.device)
    native.block_attention(*blocks, index.reshape(b * h, blocks[0].shape[1], -1).contiguous(), 0, out, scale)
    return out


# ---------------------------------------------------------------------------------------------
# The op


class Speed3ROp:
    """The ``speed3r`` global-attention op: the learned layer where the layer has gates, the
    training-free combination everywhere else (``attend_layer``); ``__call__`` is the
    training-free op on q, k, v (op-level benchmarks; on a window-major layout its windows are
    the blocks, while :meth:`attention_flops` prices such a layout as the learned layer)."""

    def __init__(self, config: Speed3RConfig = Speed3RConfig(), chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.config = config
        self.chunk_elements = int(chunk_elements)
        # Gather buffers shared by the chunks and layers of a forward (per thread).
        self.workspace = Workspace()
        # Build the fused kernel now (a cache hit after the first time), not inside the first forward.
        native.load("block_attention")

    def is_identity(self, layer: int) -> bool:
        return False

    def attend_layer(self, inputs) -> torch.Tensor:
        if inputs.has_gates:
            grad = torch.is_grad_enabled()  # out= gathers are not differentiable
            return gated_sparse_attention(inputs, self.config.block_size, self.config.top_k, self.chunk_elements,
                                          None if grad else self.workspace.buffer, self.config.anchor_every,
                                          fused_block_sparse_attention)
        q, k, v = inputs.qkv()
        return self(q, k, v, inputs.layout)

    def __call__(self, q, k, v, layout: TokenLayout, scale: Optional[float] = None) -> torch.Tensor:
        check_qkv(q, k, v, layout)
        if self._selects_everything(layout):
            # Every key would be exact: the same result, bit for bit dense, without the pooled branch.
            return exact_attention(q, k, v, scale)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return training_free_attention(q, k, v, layout, self.config, scale, self.chunk_elements,
                                       None if grad else self.workspace)

    def _selects_everything(self, layout: TokenLayout) -> bool:
        table = block_table(layout, self.config.block_size, "cpu", self.config.anchor_every)
        return self.config.top_k >= table.key_blocks.numel()

    def attention_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> AttentionCost:
        """What the op computes on a layer of ``layout``.

        Attention matmuls: every block query against the always-selected tokens and ``top_k``
        blocks (padding slots of edge windows included — they are computed), the protected
        queries against all tokens. Overhead: pooling q/k/v (3 N d), the pooled logits and the
        pooled attention or fold (4 n_q n_k d), and the merge of the partial results (6 N d) or,
        in a learned layer, the branch mix (3 N d) plus the gate Linear (2 N C 2H)."""
        n_tok, d, bh = layout.num_tokens, head_dim, batch * heads
        if layout.window is not None:  # the learned layer (pi3-speed3r)
            nb = n_tok // self.config.block_tokens
            keys = self.config.top_k * self.config.block_tokens
            overhead = bh * (3 * n_tok * d + 4 * nb * nb * d + 3 * n_tok * d) + batch * 2 * n_tok * heads * d * 2 * heads
            return AttentionCost(attention_matmul_flops(n_tok, keys, heads, d, batch), overhead, n_tok, keys)
        table = block_table(layout, self.config.block_size, "cpu", self.config.anchor_every)
        nb, bt = table.tokens.shape
        if self._selects_everything(layout):
            return dense_cost(layout, heads, head_dim, batch)
        nk = table.key_blocks.numel()
        block_queries = nb * bt
        block_keys = table.always.numel() + min(self.config.top_k, nk) * bt
        protected = table.dense.numel()
        pairs = block_queries * block_keys + protected * n_tok
        overhead = bh * (3 * n_tok * d + 4 * nb * nk * d + 6 * n_tok * d)
        queries = block_queries + protected
        return AttentionCost(attention_matmul_flops(1, pairs, heads, d, batch), overhead, queries, pairs / queries)


__all__ = ["Speed3RConfig", "Speed3ROp", "training_free_attention", "attend_with_lse", "merge_partial_attention",
           "block_table", "BlockTable"]
