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

The same layer on VGGT's row-major tokens (camera/register tokens, a reference frame, grids of
any size) is :func:`gated_block_attention`, the layer of the ``vggt-nano-speed3r`` student; it
and the training-free op share the row-major :class:`BlockTable` (:func:`block_table`), the
selection branch with its log-sum-exp (:func:`selected_blocks_attention`) and the merge of
partial softmaxes (:func:`merge_partial_attention`), all kept here because backbones never import
``spark3r.accel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
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
                           buffer: Optional[Buffer] = None, anchor_every: int = 0,
                           kernel: Optional[BlockKernel] = None) -> torch.Tensor:
    """A layer with learned Speed3R gates, from the layer's
    :class:`~spark3r.models.layers.attention.AttentionLayerInputs`: ``[B, H, N, d]`` before the
    output projection. Window-major tokens (Speed3R-π3): the official layer (module docstring),
    ``kernel`` handed to :func:`block_sparse_attention`; row-major tokens (VGGT family):
    :func:`gated_block_attention` (eager). ``buffer(name, shape, dtype, device)`` may hand out
    reusable gather buffers."""
    layout: TokenLayout = inputs.layout
    if layout.window is None:
        return gated_block_attention(inputs, window, top_k, anchor_every, chunk_elements, buffer)
    bt = window[0] * window[1]
    if anchor_every:
        raise ValueError("anchor frames (anchor_every) need a row-major layout with a reference frame")
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


# ---------------------------------------------------------------------------------------------
# Row-major blocks: VGGT-family layouts (special tokens, a reference frame, grids of any size).
# Shared by the training-free op (spark3r.accel.speed3r) and the learned VGGT layer below.


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

    @property
    def slot_weights(self) -> torch.Tensor:
        """``[nb, 1, bt]`` float32: the weight of each slot in its block's mean (0 for padding)."""
        return (self.valid.float() / self.sizes[:, None])[:, None, :]


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


@lru_cache(maxsize=16)
def _window_major_table(num_tokens: int, block_tokens: int, device: str) -> BlockTable:
    tokens = torch.arange(num_tokens).view(-1, block_tokens)
    nb = tokens.shape[0]
    empty = torch.zeros(0, dtype=torch.int64)
    return BlockTable(tokens.to(device), torch.ones(nb, block_tokens, dtype=torch.bool, device=device),
                      torch.full((nb,), float(block_tokens), device=device), torch.arange(nb, device=device),
                      empty.to(device), empty.to(device), False)


def block_table(layout: TokenLayout, window: tuple[int, int], device, anchor_every: int = 0) -> BlockTable:
    """The blocks of ``layout``: windows of its row-major patch grids, or — for a window-major
    layout (Speed3R-π3's decoder, no special tokens, no reference frame) — its consecutive
    windows, which must then be ``window``."""
    window = tuple(window)
    # Cached tables are shared by later calls; built outside inference mode they stay usable
    # by autograd (a table first built under torch.inference_mode would poison a training step).
    with torch.inference_mode(False):
        return _cached_block_table(layout, window, device, anchor_every)


def _cached_block_table(layout: TokenLayout, window: tuple[int, int], device, anchor_every: int) -> BlockTable:
    if layout.window is not None:
        if layout.window != window or layout.special_tokens or layout.reference_frame is not None or anchor_every:
            raise ValueError(f"a window-major layout ({layout.window} windows) takes block_size={layout.window}, no "
                             f"special tokens, reference frame or anchors (got block_size={window}, "
                             f"special_tokens={layout.special_tokens}, reference_frame={layout.reference_frame}, "
                             f"anchor_every={anchor_every})")
        return _window_major_table(layout.num_tokens, window[0] * window[1], str(torch.device(device)))
    key = (layout.frames, layout.tokens_per_frame, layout.special_tokens, layout.grid, layout.reference_frame)
    return _block_table(key, window, int(anchor_every), str(torch.device(device)))


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


def merge_partial_attention(parts: list[tuple[torch.Tensor, torch.Tensor]], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention over the union of disjoint key sets from each set's ``(out, lse)``
    (shapes broadcastable to the first part's): ``sum_i exp(lse_i - L) out_i / sum_i exp(lse_i - L)``,
    accumulated in fp32 in place (into ``out`` when given: an fp32 buffer of the first part's shape)."""
    top = parts[0][1]
    for _, lse in parts[1:]:
        top = torch.maximum(top, lse)
    weights = [(lse - top).exp() for _, lse in parts]
    den = weights[0]
    for w in weights[1:]:
        den = den + w
    first = parts[0][0]
    num = torch.mul(first.float(), weights[0][..., None], out=out)
    for (o, _), w in zip(parts[1:], weights[1:]):
        num.addcmul_(o.float(), w[..., None])
    return num.div_(den[..., None]).to(first.dtype)



def selected_blocks_attention(q_blocks: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, rows: torch.Tensor, scale: float,
                              key_bias: Optional[torch.Tensor] = None, buffer: Optional[Buffer] = None,
                              tile_elements: int = TILE_ELEMENTS, out: Optional[torch.Tensor] = None,
                              lse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection branch with its log-sum-exp: the queries of each block attend, in one softmax,
    to every token of their selected key blocks (:func:`selected_block_tiles`, one tile at a time).

    ``q_blocks [G*c, bt, d]`` (G = batch x heads, c query blocks per head), ``kb, vb [G, n, bt, d]``,
    ``rows [G, c, k]`` key blocks; ``key_bias [n, bt]`` an additive per-slot logit (``-inf`` for the
    padding slots of edge windows) or None. Returns ``(out [G*c, bt, d], lse [G*c, bt] fp32)``,
    written into ``out``/``lse`` when given."""
    gc, bt, d = q_blocks.shape
    top = rows.shape[-1]
    if out is None:
        out = torch.empty(gc, bt, d, dtype=q_blocks.dtype, device=q_blocks.device)
    if lse is None:
        lse = torch.empty(gc, bt, dtype=torch.float32, device=q_blocks.device)
    flat_rows = rows.reshape(gc, top)
    for ts, te, ks, vs in selected_block_tiles(kb, vb, rows, buffer, tile_elements):
        bias = None
        if key_bias is not None:
            bias = key_bias.index_select(0, flat_rows[ts:te].reshape(-1)).view(1, te - ts, 1, top * bt)
        o_t, lse_t = attend_with_lse(q_blocks[ts:te][None], ks[None], vs[None], scale, bias)
        out[ts:te], lse[ts:te] = o_t[0], lse_t[0]
    return out, lse


def padding_bias(table: BlockTable) -> Optional[torch.Tensor]:
    """``[nb, bt]`` additive logits masking the padding slots of edge windows (None without any)."""
    if not table.padded:
        return None
    return torch.zeros(table.valid.shape, device=table.valid.device).masked_fill_(~table.valid, float("-inf"))


def pooled_block_positions(pos: torch.Tensor, table: BlockTable, tokens_per_frame: int) -> torch.Tensor:
    """Integer positions of the blocks of ``table``: the mean (row, col) of each block's real
    tokens, truncated like :func:`pooled_positions`. ``pos [..., tokens_per_frame, 2]`` (one
    frame's positions, repeating every frame) -> ``[..., nb, 2]`` int64."""
    local = table.tokens % tokens_per_frame  # [nb, bt]
    slot_pos = pos[..., local.reshape(-1), :].unflatten(-2, local.shape).float()  # [..., nb, bt, 2]
    weight = table.slot_weights[:, 0, :, None]  # [nb, bt, 1]
    return (slot_pos * weight).sum(-2).to(torch.int64)


def gated_block_attention(inputs, window: tuple[int, int], top_k: int, anchor_every: int = 0,
                          chunk_elements: int = CHUNK_ELEMENTS, buffer: Optional[Buffer] = None) -> torch.Tensor:
    """The learned Speed3R layer on a row-major VGGT-family layout (camera/register tokens, a
    reference frame, any grid): ``[B, H, N, d]`` before the output projection.

    The paper's VGGT variant is not released; this is our design, the π3 layer carried over:

    * **dense tokens**: every frame's special tokens and all tokens of the reference frame are
      queries of dense attention over all keys (no gates) — they define the cameras and the
      world frame;
    * **blocks**: ``window`` windows of every non-reference frame's row-major patch grid (edge
      windows smaller, masked) — the training-free op's :func:`block_table`;
    * **compression**: as in the π3 layer, the *pre-norm* q/k/v projections mean-pooled per
      block, the layer's qk-norm, RoPE at the truncated mean block position, one softmax over all
      pooled key blocks; the same unscaled pooled logits choose each query block's ``top_k`` key
      blocks per head (:func:`topk_key_blocks`; ``top_k`` capped at the number of key blocks —
      no block is repeated, so ``top_k`` >= all blocks selects every key exactly once);
    * **selection**: the block's normed, RoPE'd queries attend in *one* softmax to the tokens of
      the selected blocks *and* to the always-selected tokens (specials of every frame,
      the reference frame and, with ``anchor_every = n``, frames 0, n, 2n, ...);
    * ``out = g_c * O_comp[block] + g_s * O_sel`` with the layer's gates ``sigmoid(Linear(C ->
      2*heads))`` of its input (channel 2h = g_c, 2h+1 = g_s), as in the π3 layer.

    So gates at ``(g_c, g_s) = (0, 1)`` with ``top_k`` >= all blocks are dense attention up to fp32
    rounding. ``buffer`` may hand out reusable gather buffers (no autograd then)."""
    layout: TokenLayout = inputs.layout
    if layout.window is not None:
        raise ValueError("gated_block_attention takes row-major layouts; window-major ones run gated_sparse_attention")
    q, k, v = inputs.qkv()
    b, h, _, d = q.shape
    scale = inputs.scale
    table = block_table(layout, window, q.device, anchor_every)
    nb, bt = table.tokens.shape
    if nb == 0:  # a single frame: only the reference frame, which attends densely
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    keys = table.key_blocks
    nk = keys.numel()
    flat = table.tokens.reshape(-1)

    # Compression tokens from the pre-norm projections (v has no norm: the same tensor).
    q_raw, k_raw, _ = inputs.projections()
    weights = table.slot_weights
    q_c = torch.matmul(weights, q_raw.index_select(2, flat).view(b, h, nb, bt, d).float()).squeeze(-2)
    key_raw = k_raw.index_select(2, table.tokens[keys].reshape(-1)).view(b, h, nk, bt, d)
    key_weights = weights.index_select(0, keys)
    k_c = torch.matmul(key_weights, key_raw.float()).squeeze(-2)
    v_c = torch.matmul(key_weights, v.index_select(2, table.tokens[keys].reshape(-1)).view(b, h, nk, bt, d).float()).squeeze(-2)
    q_c, k_c = inputs.normalize(q_c.to(q_raw.dtype), k_c.to(k_raw.dtype))
    if inputs.pos is not None:
        pos_c = pooled_block_positions(inputs.pos, table, layout.tokens_per_frame)
        q_c, k_c = inputs.rotate(q_c, pos_c), inputs.rotate(k_c, pos_c[..., keys, :])
    k_c_t, v_c = k_c.float().transpose(-1, -2), v_c.float()

    gates = inputs.gates().unflatten(-1, (h, 2)).permute(0, 2, 1, 3)  # [B, H, N, 2]
    gates = gates.index_select(2, flat).view(b, h, nb, bt, 2)
    out = torch.empty_like(q)
    if table.dense.numel():
        out[:, :, table.dense] = F.scaled_dot_product_attention(q.index_select(2, table.dense), k, v, scale=scale)
    qb, kb, vb = (t.index_select(2, flat).view(b, h, nb, bt, d) for t in (q, k, v))
    always = None
    if table.always.numel():
        o_always, lse_always = attend_with_lse(qb.view(b, h, nb * bt, d), k.index_select(2, table.always),
                                               v.index_select(2, table.always), scale)
        always = (o_always.view(b, h, nb, bt, d), lse_always.view(b, h, nb, bt))
    key_bias = padding_bias(table)
    top = min(int(top_k), nk)
    kb_heads, vb_heads = kb.view(b * h, nb, bt, d), vb.view(b * h, nb, bt, d)
    per_block = b * h * (2 * nk + 4 * bt * d)
    for s, e in chunk_ranges(nb, per_block, chunk_elements):
        c = e - s
        parts = [] if always is None else [(always[0][:, :, s:e], always[1][:, :, s:e])]
        if top:
            logits = torch.matmul(q_c[:, :, s:e].float(), k_c_t)  # [B, H, c, nk]
            index = topk_key_blocks(logits, top)
            o_comp = torch.matmul(torch.softmax(logits * scale, dim=-1), v_c)
            rows = keys[index].view(b * h, c, top)
            o_sel, lse_sel = selected_blocks_attention(qb[:, :, s:e].reshape(b * h * c, bt, d), kb_heads, vb_heads, rows,
                                                       scale, key_bias, buffer, min(TILE_ELEMENTS, chunk_elements))
            parts.append((o_sel.view(b, h, c, bt, d), lse_sel.view(b, h, c, bt)))
        else:  # every frame an anchor: no blocks to pool or select
            o_comp = q.new_zeros(b, h, c, d, dtype=torch.float32)
        selected = parts[0][0] if len(parts) == 1 else merge_partial_attention(parts)
        g = gates[:, :, s:e].to(selected.dtype)
        mixed = g[..., 0:1] * o_comp[:, :, :, None, :].to(selected.dtype) + g[..., 1:2] * selected
        if table.padded:
            valid = table.valid[s:e]
            out[:, :, table.tokens[s:e][valid]] = mixed[:, :, valid]
        else:
            out[:, :, table.tokens[s:e].reshape(-1)] = mixed.reshape(b, h, c * bt, d)
    return out


class LearnedSparseAttention:
    """The global op a Speed3R backbone installs on its own gated layers: the learned layer
    (:func:`gated_sparse_attention`: the official one on Speed3R-π3's window-major tokens,
    :func:`gated_block_attention` on a VGGT student's row-major tokens) with the window and top-k
    it was trained with. It needs the
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
