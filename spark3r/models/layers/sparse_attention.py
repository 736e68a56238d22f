"""Speed3R's learned sparse global attention (arXiv 2603.08055, ``Visual-AI/speed3r``): the
layer of the ``pi3-speed3r`` backbone, as small tensor functions.

Every frame's patches are grouped into blocks — the ``window x window`` patches of one window,
consecutive in the window-major token order the model runs its decoder in. Per head:

* **compression**: the *pre-norm* q, k, v projections (bias included) mean-pooled per block, the
  layer's qk-norm on the pooled q/k, RoPE at the pooled position ``mean(positions).int()``
  (truncated: (4i+1, 4j+1) for the window at (4i, 4j)), dense softmax attention over all pooled
  tokens (scale ``head_dim**-0.5``); from the same raw (unscaled) pooled logits the ``top_k`` key
  blocks of each query block, largest first, ties to the lower index, nothing forced in;
* **selection**: the normed, RoPE'd tokens of a query block attend, in one softmax, to all tokens
  of its selected key blocks;
* ``out = g_c * O_comp[block] + g_s * O_sel`` with the layer's gates ``sigmoid(Linear(C ->
  2*heads))`` of its input (channel 2h = g_c, 2h+1 = g_s of head h): two separate softmaxes.

With fewer than ``top_k`` blocks the official kernel fills the missing slots with the last block
(index ``blocks - 1``), which is then attended ``top_k - blocks + 1`` times — reproduced, because
the checkpoint was trained with it.

Memory: pooled logits exist for a chunk of query blocks at a time (``chunk_elements`` floats
per intermediate), gathered keys for one cache-sized tile of one head; pure PyTorch, any device and dtype; pooled logits,
top-k and the pooled softmax in fp32. ``spark3r.accel.speed3r`` reuses these pieces for its
training-free mode on other backbones, and hands :func:`block_sparse_attention` its fused CPU
``kernel`` (the model's own op, :class:`LearnedSparseAttention`, runs this eager code).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .layout import TokenLayout

# Floats per chunk intermediate (pooled logits, gathered keys): 64 MiB in fp32.
CHUNK_ELEMENTS = 1 << 24

# (name, shape, dtype, device) -> a scratch tensor that may be reused across calls.
Buffer = Callable[[str, tuple, torch.dtype, torch.device], torch.Tensor]
# A faster implementation of block_sparse_attention: (q, k, v, index, block_tokens, scale) -> its
# result, or None where it cannot run.
BlockKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], Optional[torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Token order and pooling


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


def chunk_ranges(count: int, per_item: int, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, end) ranges of ``count`` items, ``budget // per_item`` (>= 1) at a time."""
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
    for s, e in chunk_ranges(n, b * h * n, chunk_elements):
        logits = torch.matmul(q_c[:, :, s:e].float(), kt)
        index[:, :, s:e] = topk_key_blocks(logits, top_k)
        out[:, :, s:e] = torch.matmul(torch.softmax(logits * scale, dim=-1), vf).to(out.dtype)
    return out, index


# Floats per gathered key (and value) tile of the selection branch and thread: 2 MiB in fp32. The
# gathered keys are top_k times the size of a block's own keys (32x at the defaults); gathered for
# a whole chunk of all heads they stream through main memory twice (written by the gather, read by
# the attention kernel), and on CPU that made the branch ~2x slower than its arithmetic. A tile
# of a few query blocks per thread is read back while it is still in the cache.
TILE_ELEMENTS = 1 << 19


def selected_block_tiles(kb: torch.Tensor, vb: torch.Tensor, index: torch.Tensor, buffer: Optional[Buffer] = None,
                         tile_elements: int = TILE_ELEMENTS) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The selected keys/values of every query block, one cache-sized tile at a time.

    ``kb, vb [G, n, bt, d]`` key/value blocks per head (G = batch x heads), ``index [G, c, k]``
    the key blocks of c query blocks per head. Yields ``(s, e, keys, values)``: the query blocks
    ``s:e`` of the flattened ``[G * c]`` and their gathered ``[e - s, k*bt, d]`` keys and values
    (the blocks concatenated in ``index`` order), written into ``buffer`` tensors reused by the
    next tile when given — consume each tile before advancing. A tile holds ``tile_elements``
    floats per thread (at least one query block)."""
    g_count, n, bt, d = kb.shape
    c, k = index.shape[1], index.shape[2]
    step = max(1, tile_elements * max(1, torch.get_num_threads()) // (k * bt * d))
    head = torch.arange(g_count, device=index.device).view(g_count, 1, 1) * n
    flat = (index + head).reshape(g_count * c, k)
    rows_k, rows_v = kb.reshape(g_count * n, bt * d), vb.reshape(g_count * n, bt * d)
    for s in range(0, g_count * c, step):
        e = min(g_count * c, s + step)
        rows = flat[s:e].reshape(-1)
        if buffer is None:
            ks, vs = rows_k.index_select(0, rows), rows_v.index_select(0, rows)
        else:
            ks = torch.index_select(rows_k, 0, rows, out=buffer("speed3r.k", (rows.numel(), bt * d), kb.dtype, kb.device))
            vs = torch.index_select(rows_v, 0, rows, out=buffer("speed3r.v", (rows.numel(), bt * d), vb.dtype, vb.device))
        yield s, e, ks.view(e - s, k * bt, d), vs.view(e - s, k * bt, d)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, block_tokens: int,
                           scale: float, chunk_elements: int = CHUNK_ELEMENTS,
                           buffer: Optional[Buffer] = None, kernel: Optional[BlockKernel] = None) -> torch.Tensor:
    """The selection branch on consecutive blocks: the queries of block m attend, in one softmax,
    to all tokens of the key blocks ``index[..., m, :]`` (a repeated block counts repeatedly).

    ``q, k, v [B, H, N, d]`` with N a multiple of ``block_tokens``, ``index [B, H, N/bt, k]``
    -> ``[B, H, N, d]``. Gathered keys exist one tile at a time (:func:`selected_block_tiles`;
    ``chunk_elements`` bounds a tile's floats when it is the smaller budget). ``kernel`` (e.g.
    ``spark3r.accel.speed3r``'s fused CPU kernel) is tried first; this function is its spec."""
    if kernel is not None:
        out = kernel(q, k, v, index, block_tokens, scale)
        if out is not None:
            return out
    b, h, n_tok, d = q.shape
    bt = block_tokens
    n = n_tok // bt
    kb = k.reshape(b * h, n, bt, d)
    vb = v.reshape(b * h, n, bt, d)
    qb = q.reshape(b * h * n, bt, d)
    out = torch.empty(b * h * n, bt, d, dtype=q.dtype, device=q.device)
    tiles = selected_block_tiles(kb, vb, index.reshape(b * h, n, -1), buffer, min(TILE_ELEMENTS, chunk_elements))
    for s, e, ks, vs in tiles:
        out[s:e] = F.scaled_dot_product_attention(qb[s:e], ks, vs, scale=scale)
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


def gated_sparse_attention(inputs, window: tuple[int, int], top_k: int, chunk_elements: int = CHUNK_ELEMENTS,
                           buffer: Optional[Buffer] = None, kernel: Optional[BlockKernel] = None) -> torch.Tensor:
    """The official Speed3R layer (module docstring) from the layer's
    :class:`~spark3r.models.layers.attention.AttentionLayerInputs`: ``[B, H, N, d]`` before the
    output projection. ``buffer(name, shape, dtype, device)`` may hand out reusable gather buffers;
    ``kernel`` is handed to :func:`block_sparse_attention`."""
    layout: TokenLayout = inputs.layout
    bt = window[0] * window[1]
    if layout.window != tuple(window) or layout.special_tokens:
        raise ValueError(
            f"a layer with learned Speed3R gates needs window-major tokens in {tuple(window)} windows and no "
            f"special tokens; the layer reports window={layout.window}, special_tokens={layout.special_tokens}")
    if inputs.pos is None:
        raise ValueError("Speed3R needs the token positions (pos) for the pooled RoPE")
    q_raw, k_raw, v = inputs.projections()
    q_c, k_c = inputs.normalize(pool_blocks(q_raw, bt), pool_blocks(k_raw, bt))
    pos_c = pooled_positions(inputs.pos, bt)
    q_c, k_c = inputs.rotate(q_c, pos_c).to(v.dtype), inputs.rotate(k_c, pos_c).to(v.dtype)
    out_pooled, index = pooled_attention(q_c, k_c, pool_blocks(v, bt), top_k, inputs.scale, chunk_elements)
    q, k = inputs.normalize(q_raw, k_raw)
    q, k = inputs.rotate(q, inputs.pos).to(v.dtype), inputs.rotate(k, inputs.pos).to(v.dtype)
    out_selected = block_sparse_attention(q, k, v.contiguous(), index, bt, inputs.scale, chunk_elements, buffer, kernel)
    return gated_combine(out_pooled, out_selected, inputs.gates(), bt)


class LearnedSparseAttention:
    """The global op a Speed3R backbone installs on its own gated layers: the official layer
    (:func:`gated_sparse_attention`) with the window and top-k it was trained with. It needs the
    layer, not just q/k/v (``attend_layer``); ``spark3r.accel.apply(model, "speed3r", ...)``
    replaces it (other window/top-k, pricing), ``spark3r.accel.remove`` makes the layer dense."""

    def __init__(self, window: tuple[int, int], top_k: int, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.window = (int(window[0]), int(window[1]))
        self.top_k = int(top_k)
        self.chunk_elements = int(chunk_elements)

    def attend_layer(self, inputs) -> torch.Tensor:
        return gated_sparse_attention(inputs, self.window, self.top_k, self.chunk_elements)

    def __call__(self, q, k, v, layout, scale=None):
        raise TypeError("the learned Speed3R layer needs the attention layer itself (attend_layer), not q/k/v")
