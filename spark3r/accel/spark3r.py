"""Spark3R: asymmetric token reduction in global attention.

Queries carry view-specific requests and are reduced mildly: the patch tokens of every
non-reference frame are cut into small spatial groups (``query_group`` = rows x cols of the patch
grid, 2x2 by default) and each group is merged to exactly ``query_keep`` tokens, per head, by
greedily joining its most similar members (cosine similarity of the post-RoPE queries). The
attention output of a merged query is copied back to every member. Cost: O(tokens * group size).

Keys/values carry shared scene context and are pruned aggressively: per head and per
non-reference frame the ``budget`` patch tokens with the highest score are kept, where the score
is the logit the *mean query* of the layer gives the key (``kv_score="query_mean"``; one
mat-vec, linear in tokens) or the key norm (``"key_norm"``). Each frame also gets one
compensation token — the mean key/value of its pruned tokens with an additive logit bias of
``log(count)`` — so the softmax mass of the dropped tokens is approximately preserved and every
view stays represented. The budget per layer comes from a :class:`KVSchedule`.

Protected in both roles: the special tokens of every frame and all tokens of the reference frame.
q/k arrive after RoPE, so merged and kept tokens need no new positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

import torch

from .common import check_qkv, exact_attention, gather_per_head, layout_key, static_index
from .layout import TokenLayout
from .schedule import KVSchedule

KV_SCORES = ("query_mean", "query_summary", "key_norm")


@dataclass(frozen=True)
class Spark3RConfig:
    """Parameters of the ``spark3r`` method (CLI ``--query-group`` etc., ROS ``reduction.query_group``...)."""

    query_group: tuple[int, int] = (2, 2)
    query_keep: int = 2
    # None/"default" = the backbone's default schedule, else a schedule file path or a KVSchedule.
    schedule: Union[None, str, KVSchedule] = None
    kv_score: str = "query_mean"
    kv_compensation: bool = True
    # The first `dense_queries` special tokens of every frame (1 = the camera token) query the
    # full, unpruned keys/values: one token per view carries the camera estimate, which K/V
    # pruning hurts most, and it costs 1/tokens_per_frame of dense attention.
    dense_queries: int = 1

    def __post_init__(self) -> None:
        group = tuple(int(x) for x in self.query_group)
        object.__setattr__(self, "query_group", group)
        if len(group) != 2 or min(group) < 1:
            raise ValueError(f"query_group must be two positive ints (rows, cols), got {self.query_group}")
        if not 1 <= int(self.query_keep) <= group[0] * group[1]:
            raise ValueError(f"query_keep must be in 1..{group[0] * group[1]} for query_group {group}, got {self.query_keep}")
        if int(self.dense_queries) < 0:
            raise ValueError(f"dense_queries must be >= 0 (leading special tokens per frame), got {self.dense_queries}")
        if self.kv_score not in KV_SCORES:
            raise ValueError(f"kv_score must be one of {KV_SCORES}, got {self.kv_score!r}")

    @property
    def group_size(self) -> int:
        return self.query_group[0] * self.query_group[1]

    @property
    def reduces_queries(self) -> bool:
        return self.query_keep < self.group_size


# ---------------------------------------------------------------------------------------------
# Query groups (static, from the layout)


@dataclass(frozen=True)
class QueryGroups:
    """Spatial groups of the reducible frames' patch tokens.

    ``full`` groups have exactly ``group_size`` members; ``partial`` ones (at the right/bottom
    edge when the grid is not divisible) fewer, padded with their first member (``partial_valid``
    marks the real ones) and reduced to ``min(keep, size)`` tokens."""

    full: torch.Tensor           # [Gf, g] token indices
    partial: torch.Tensor        # [Gp, g] token indices (padded)
    partial_valid: torch.Tensor  # [Gp, g] bool
    partial_keep: torch.Tensor   # [Gp] tokens kept per partial group
    keep: int

    @property
    def num_outputs(self) -> int:
        return self.full.shape[0] * self.keep + int(self.partial_keep.sum())


@lru_cache(maxsize=64)
def _query_groups(key: tuple, group: tuple[int, int], keep: int, device: str) -> QueryGroups:
    frames, tpf, special, grid, ref = key
    layout = TokenLayout(frames, tpf, special, grid, ref)
    reducible = static_index(layout, "cpu").reducible  # [F, rows*cols]
    rows, cols = grid
    gh, gw = group
    g = gh * gw
    full, partial, valid = [], [], []
    for r0 in range(0, rows, gh):
        for c0 in range(0, cols, gw):
            cells = [(r, c) for r in range(r0, min(r0 + gh, rows)) for c in range(c0, min(c0 + gw, cols))]
            local = [r * cols + c for r, c in cells]
            if len(local) == g:
                full.append(local)
            else:
                partial.append(local + [local[0]] * (g - len(local)))
                valid.append([True] * len(local) + [False] * (g - len(local)))
    nf = reducible.shape[0]
    full_t = reducible[:, torch.tensor(full, dtype=torch.long).reshape(-1)].reshape(nf * len(full), g) if full \
        else torch.zeros(0, g, dtype=torch.long)
    if partial:
        part_t = reducible[:, torch.tensor(partial, dtype=torch.long).reshape(-1)].reshape(nf * len(partial), g)
        valid_t = torch.tensor(valid, dtype=torch.bool).repeat(nf, 1)
    else:
        part_t = torch.zeros(0, g, dtype=torch.long)
        valid_t = torch.zeros(0, g, dtype=torch.bool)
    part_keep = valid_t.sum(1).clamp(max=keep)
    return QueryGroups(full_t.to(device), part_t.to(device), valid_t.to(device), part_keep.to(device), keep)


def query_groups(layout: TokenLayout, group: tuple[int, int], keep: int, device) -> QueryGroups:
    return _query_groups(layout_key(layout), tuple(group), int(keep), str(torch.device(device)))


# ---------------------------------------------------------------------------------------------
# Pure merging functions


# Output slot (0/1) of members 0..3 when member 0 is paired with member 1, 2 or 3.
_PAIR_SLOTS = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]])


def merge_four_to_two(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, G, 4, d]`` -> (pair means ``[B, H, G, 2, d]``, member slot ``[B, H, G, 4]``).

    Picks, per head and group, the split into two pairs with the largest summed cosine
    similarity (the optimum for 4 -> 2). Slot 0 holds member 0 and its partner, slot 1 the other
    two. Everything is elementwise over all groups at once: per-group 4x4 matmuls would be tens of
    thousands of tiny batched GEMMs, slower than the attention they save."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    x0, x1, x2, x3 = xn.unbind(-2)

    def cos(a, b):
        return (a * b).sum(-1)

    score = torch.stack((cos(x0, x1) + cos(x2, x3), cos(x0, x2) + cos(x1, x3), cos(x0, x3) + cos(x1, x2)), dim=-1)
    best = score.argmax(-1)  # partner of member 0 is member best + 1
    first = x[..., 0, :]
    partner = x.gather(-2, (best + 1)[..., None, None].expand(*best.shape, 1, x.shape[-1])).squeeze(-2)
    pair = first + partner
    means = torch.stack((pair, x.sum(-2) - pair), dim=-2) * 0.5
    return means, _PAIR_SLOTS.to(x.device)[best]


def merge_greedy(x: torch.Tensor, valid: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Agglomerative merge inside each group down to ``min(keep, valid members)`` clusters.

    ``x [B, H, G, g, d]``, ``valid [G, g]`` -> (cluster means ``[B, H, G, keep, d]`` with the
    clusters in slots ``0..min(keep, size)-1``, member slot ``[B, H, G, g]``). Each step joins, in
    every group that still has more than ``keep`` clusters, the pair of clusters whose means are
    most similar (cosine). Cost O(G * g^2 * d) per step; ``g - keep`` steps."""
    b, h, gcount, g, d = x.shape
    dev = x.device
    alive = valid.expand(b, h, gcount, g).clone()
    sums = x * valid[..., None].to(x.dtype)
    sizes = valid.to(x.dtype).expand(b, h, gcount, g).clone()
    label = torch.arange(g, device=dev).expand(b, h, gcount, g).clone()
    eye = torch.eye(g, dtype=torch.bool, device=dev)
    for _ in range(max(0, g - keep)):
        need = alive.sum(-1) > keep  # [B, H, G]
        if not bool(need.any()):
            break
        means = torch.nn.functional.normalize(sums / sizes.clamp_min(1)[..., None], dim=-1)
        sim = means @ means.transpose(-1, -2)
        ok = alive[..., :, None] & alive[..., None, :] & ~eye
        flat = sim.masked_fill(~ok, float("-inf")).flatten(-2).argmax(-1)
        i, j = flat // g, flat % g
        root, gone = torch.minimum(i, j), torch.maximum(i, j)
        root_sum = sums.gather(-2, root[..., None, None].expand(b, h, gcount, 1, d))
        gone_sum = sums.gather(-2, gone[..., None, None].expand(b, h, gcount, 1, d))
        new_sum = torch.where(need[..., None, None], root_sum + gone_sum, root_sum)
        sums = sums.scatter(-2, root[..., None, None].expand(b, h, gcount, 1, d), new_sum)
        root_size = sizes.gather(-1, root[..., None]) + torch.where(need[..., None], sizes.gather(-1, gone[..., None]), 0)
        sizes = sizes.scatter(-1, root[..., None], root_size)
        kill = torch.nn.functional.one_hot(gone, g).bool() & need[..., None]
        alive = alive & ~kill
        relabel = (label == gone[..., None]) & need[..., None]
        label = torch.where(relabel, root[..., None].expand_as(label), label)
    rank = alive.long().cumsum(-1) - 1  # slot of each alive cluster root
    slot = rank.gather(-1, label)
    order = torch.argsort((~alive).to(torch.int8), dim=-1, stable=True)[..., :keep]
    means = (sums / sizes.clamp_min(1)[..., None]).gather(-2, order[..., None].expand(b, h, gcount, keep, d))
    return means, slot


def merge_queries(q: torch.Tensor, layout: TokenLayout, group: tuple[int, int], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced queries and the unmerge map.

    Returns ``q_red [B, H, Nq, d]`` (protected queries first, in token order, then the merged
    groups) and ``source [B, H, N]``: for every original token, the row of ``q_red`` whose
    attention output it receives. ``out = gather_per_head(out_red, source)`` unmerges."""
    b, h, n, d = q.shape
    dev = q.device
    idx = static_index(layout, dev)
    groups = query_groups(layout, group, keep, dev)
    g = group[0] * group[1]
    npro = idx.protected.numel()
    # Written in place into one buffer (no concatenation pass over the reduced queries).
    q_red = torch.empty(b, h, npro + groups.num_outputs, d, dtype=q.dtype, device=dev)
    q_red[:, :, :npro] = q.index_select(2, idx.protected)
    source = torch.empty(b, h, n, dtype=torch.long, device=dev)
    source[:, :, idx.protected] = torch.arange(npro, device=dev)
    offset = npro
    gf = groups.full.shape[0]
    if gf:
        if keep == 1:  # plain means, read from strided views (no member gather)
            merged = group_means(q, layout, group, idx.frames)
            slot = torch.zeros(b, h, gf, g, dtype=torch.long, device=dev)
        else:
            xf = q.index_select(2, groups.full.reshape(-1)).view(b, h, gf, g, d)
            if keep == g:
                merged, slot = xf, torch.arange(g, device=dev).expand(b, h, gf, g)
            elif g == 4 and keep == 2:
                merged, slot = merge_four_to_two(xf)
            else:
                merged, slot = merge_greedy(xf, torch.ones(gf, g, dtype=torch.bool, device=dev), keep)
        q_red[:, :, offset:offset + gf * keep] = merged.reshape(b, h, gf * keep, d)
        pos = offset + torch.arange(gf, device=dev).view(1, 1, gf, 1) * keep + slot
        source[:, :, groups.full.reshape(-1)] = pos.reshape(b, h, gf * g)
        offset += gf * keep
    gp = groups.partial.shape[0]
    if gp:
        xp = q.index_select(2, groups.partial.reshape(-1)).view(b, h, gp, g, d)
        merged, slot = merge_greedy(xp, groups.partial_valid, keep)
        # Keep only the real output slots (a partial group of size s has min(keep, s) of them).
        real = (torch.arange(keep, device=dev)[None, :] < groups.partial_keep[:, None]).reshape(-1)
        q_red[:, :, offset:] = merged.reshape(b, h, gp * keep, d)[:, :, real]
        starts = torch.cumsum(groups.partial_keep, 0) - groups.partial_keep
        pos = offset + starts.view(1, 1, gp, 1) + slot
        members = groups.partial[groups.partial_valid]
        source[:, :, members] = pos[:, :, groups.partial_valid]
    return q_red, source


def group_means(q: torch.Tensor, layout: TokenLayout, group: tuple[int, int], frames: tuple[int, ...]) -> torch.Tensor:
    """Means of the full groups of the reducible frames, ``[B, H, G, 1, d]`` in the order of
    :class:`QueryGroups` ``.full``, read straight from strided views of q (no gather)."""
    b, h, n, d = q.shape
    rows, cols = layout.grid
    gh, gw = group
    r2, c2 = rows // gh, cols // gw
    patches = q.reshape(b, h, layout.frames, layout.tokens_per_frame, d)[:, :, :, layout.special_tokens:]
    grid = patches.unflatten(3, (rows, cols))[:, :, :, : r2 * gh, : c2 * gw]
    means = grid.unflatten(4, (c2, gw)).unflatten(3, (r2, gh)).mean(dim=(4, 6))  # [B, H, S, r2, c2, d]
    if len(frames) != layout.frames:
        means = means.index_select(2, torch.tensor(frames, dtype=torch.long, device=q.device))
    return means.reshape(b, h, len(frames) * r2 * c2, 1, d)


def kv_scores(qbar: torch.Tensor, k: torch.Tensor, layout: TokenLayout, score: str) -> torch.Tensor:
    """Score of every patch token of every frame as a key, ``[B, H, S, patches]`` (higher = keep).

    ``qbar`` is the mean query ``[B, H, d]`` for ``"query_mean"`` or the summary queries
    ``[B, H, d, T]`` for ``"query_summary"`` (see :func:`summary_queries`)."""
    b, h, n, d = k.shape
    if score == "query_mean":
        s = (k @ qbar[..., None]).view(b, h, layout.frames, layout.tokens_per_frame)
    elif score == "query_summary":
        # qbar [B, H, d, T]: one summary query per token type; a key's score is its best
        # per-frame log-softmax weight under any summary, so keys that matter to the camera
        # and register tokens survive even when the patch queries ignore them.
        logits = (k @ qbar).view(b, h, layout.frames, layout.tokens_per_frame, -1)[..., layout.special_tokens:, :]
        return (logits - torch.logsumexp(logits, dim=3, keepdim=True)).amax(-1)
    elif score == "key_norm":
        s = torch.linalg.vector_norm(k, dim=-1).view(b, h, layout.frames, layout.tokens_per_frame)
    else:
        raise ValueError(f"kv_score must be one of {KV_SCORES}, got {score!r}")
    return s[..., layout.special_tokens:]


def summary_queries(q: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``[B, H, d, special_tokens + 1]``: the mean over frames of each special-token slot
    (camera, registers), and the mean of all queries."""
    b, h, n, d = q.shape
    special = q.view(b, h, layout.frames, layout.tokens_per_frame, d)[:, :, :, : layout.special_tokens].mean(2)
    return torch.cat((special, q.mean(2, keepdim=True)), 2).transpose(-1, -2)


def frame_patch_sums(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Sum of each frame's patch tokens, ``[B, H, S, d]`` (a mat-vec per frame, so one read of x)."""
    b, h, n, d = x.shape
    x5 = x.reshape(b, h, layout.frames, layout.tokens_per_frame, d)
    if not x.is_contiguous():  # a matmul would first copy a strided x (v from the fused qkv)
        return x5[:, :, :, layout.special_tokens:].sum(3)
    w = torch.ones(1, layout.tokens_per_frame, dtype=x.dtype, device=x.device)
    w[:, : layout.special_tokens] = 0
    return (w @ x5).squeeze(-2)


def prune_kv(
    qbar: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, budget: int,
    score: str = "query_mean", compensation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Pruned keys/values.

    ``qbar [B, H, d]``: the mean query (score input). Returns ``(k_red, v_red, attn_mask, kept)``:
    ``k_red/v_red [B, H, Nk, d]`` = protected tokens, then ``budget`` kept patch tokens per
    reducible frame, then (if ``compensation`` and anything was pruned) one compensation token per
    reducible frame; ``attn_mask [1, 1, 1, Nk]`` is the float logit bias (``log(count)`` on the
    compensation tokens, 0 elsewhere) or None; ``kept [B, H, F, budget]`` are the kept token
    indices (for tests and diagnostics)."""
    b, h, n, d = k.shape
    dev = k.device
    idx = static_index(layout, dev)
    patches = layout.patches_per_frame
    if not 1 <= budget <= patches:
        raise ValueError(f"K/V budget must be in 1..{patches} (patch tokens per frame), got {budget}")
    nf = len(idx.frames)
    frames = torch.tensor(idx.frames, dtype=torch.long, device=dev)
    k_pro, v_pro = k.index_select(2, idx.protected), v.index_select(2, idx.protected)
    if nf == 0 or budget == patches:
        kept = idx.reducible.expand(b, h, nf, patches)
        return (torch.cat((k_pro, k.index_select(2, idx.reducible.reshape(-1))), 2),
                torch.cat((v_pro, v.index_select(2, idx.reducible.reshape(-1))), 2), None, kept)
    scores = kv_scores(qbar, k, layout, score).index_select(2, frames)  # [B, H, F, P]
    local = scores.topk(budget, dim=-1, sorted=False).indices
    kept = local + (frames * layout.tokens_per_frame + layout.special_tokens).view(1, 1, nf, 1)
    k_keep = gather_per_head(k, kept.reshape(b, h, nf * budget))
    v_keep = gather_per_head(v, kept.reshape(b, h, nf * budget))
    parts_k, parts_v, mask = [k_pro, k_keep], [v_pro, v_keep], None
    if compensation:
        pruned = patches - budget
        for x, x_keep, parts in ((k, k_keep, parts_k), (v, v_keep, parts_v)):
            total = frame_patch_sums(x, layout).index_select(2, frames)
            parts.append((total - x_keep.view(b, h, nf, budget, d).sum(3)) / pruned)
        nk = k_pro.shape[2] + nf * budget + nf
        mask = torch.zeros(1, 1, 1, nk, dtype=k.dtype, device=dev)
        mask[..., nk - nf:] = math.log(pruned)
    return torch.cat(parts_k, 2), torch.cat(parts_v, 2), mask, kept


def spark3r_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, config: Spark3RConfig,
    budget: int, scale: Optional[float] = None,
) -> torch.Tensor:
    """The reduced attention of one layer, output in original token order."""
    patches = layout.patches_per_frame
    if not config.reduces_queries and budget >= patches:
        return exact_attention(q, k, v, scale)
    if config.reduces_queries:
        q_red, source = merge_queries(q, layout, config.query_group, config.query_keep)
    else:
        q_red, source = q, None
    if budget < patches:
        # The mean of the queries that actually attend (merging keeps pair means, so this is
        # the plain query mean up to the weighting of merged groups) — half the read of q.
        qbar = summary_queries(q, layout) if config.kv_score == "query_summary" else q_red.mean(dim=2)
        k_red, v_red, mask, _ = prune_kv(qbar, k, v, layout, budget, config.kv_score, config.kv_compensation)
    else:
        k_red, v_red, mask = k, v, None
    out = exact_attention(q_red, k_red, v_red, scale, attn_mask=mask)
    out = out if source is None else gather_per_head(out, source)
    if config.dense_queries and budget < patches:
        special = special_index(layout, min(config.dense_queries, layout.special_tokens), q.device)
        out[:, :, special] = exact_attention(q.index_select(2, special), k, v, scale)
    return out


def special_index(layout: TokenLayout, count: int, device) -> torch.Tensor:
    """Token indices of the first ``count`` special tokens of every frame."""
    tokens = torch.arange(count, device=device)
    return (torch.arange(layout.frames, device=device)[:, None] * layout.tokens_per_frame + tokens).reshape(-1)


class Spark3ROp:
    """The global-attention op (``GlobalAttentionOp``) for one model: config + resolved schedule."""

    def __init__(self, config: Spark3RConfig, schedule: KVSchedule) -> None:
        self.config = config
        self.schedule = schedule

    def budget(self, layout: TokenLayout) -> int:
        return self.schedule.kv_budget(layout.layer, layout.frames, layout.patches_per_frame)

    def is_identity(self, layer: int) -> bool:
        """True when this layer is computed exactly (the hook is then left unset)."""
        return not self.config.reduces_queries and not self.schedule.prunes(layer)

    def __call__(self, q, k, v, layout: TokenLayout, scale: Optional[float] = None) -> torch.Tensor:
        check_qkv(q, k, v, layout)
        if layout.num_layers != self.schedule.num_layers:
            raise ValueError(f"the schedule has {self.schedule.num_layers} layers but the model reports "
                             f"{layout.num_layers} global layers")
        return spark3r_attention(q, k, v, layout, self.config, self.budget(layout), scale)

    def reduced_sizes(self, layout: TokenLayout) -> tuple[int, int]:
        """(queries, keys) the layer's attention runs on — closed form, matches the op exactly."""
        return spark3r_sizes(layout, self.config, self.budget(layout))

    def overhead_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> int:
        return spark3r_overhead_flops(layout, self.config, self.budget(layout), heads, head_dim, batch)


def spark3r_sizes(layout: TokenLayout, config: Spark3RConfig, budget: int) -> tuple[int, int]:
    n = layout.num_tokens
    patches = layout.patches_per_frame
    if not config.reduces_queries and budget >= patches:
        return n, n
    npro = int(layout.protected_mask().sum())
    nq = n
    if config.reduces_queries:
        nq = npro + query_groups(layout, config.query_group, config.query_keep, "cpu").num_outputs
    nk = n
    if budget < patches:
        nf = len(static_index(layout, "cpu").frames)
        nk = npro + nf * budget + (nf if config.kv_compensation else 0)
    return nq, nk


def spark3r_overhead_flops(layout: TokenLayout, config: Spark3RConfig, budget: int, heads: int, head_dim: int,
                           batch: int = 1) -> int:
    """Arithmetic outside the attention matmuls, per layer (counted so the FLOP model is honest):
    the 4x4 Gram matrix, cosine and pair-mean matmul per 4-group (greedy: g^2 dots per step), the
    mean query and the score mat-vec, and the per-frame sums for the compensation tokens."""
    bh = batch * heads
    d = head_dim
    n = layout.num_tokens
    patches = layout.patches_per_frame
    nf = len(static_index(layout, "cpu").frames)
    reducible = nf * patches
    flops = 0
    if config.reduces_queries:
        g, keep = config.group_size, config.query_keep
        groups = reducible // g + (1 if reducible % g else 0)
        if keep == 1:
            flops += reducible * d
        elif g == 4 and keep == 2:
            flops += groups * (16 * 2 * d + 3 * 16 + 2 * 4 * 2 * d)
        else:
            flops += groups * (g - keep) * (g * g * 2 * d + 3 * g * d)
    if budget < patches and config.dense_queries:
        flops += 4 * layout.frames * min(config.dense_queries, layout.special_tokens) * n * d  # over all keys
    if budget < patches and config.kv_score == "query_summary":
        t = layout.special_tokens + 1
        flops += n * d + n * 2 * d * (t - 1) + 3 * layout.frames * patches * t  # summaries, extra mat-vecs, log-softmax
    if budget < patches:
        flops += spark3r_sizes(layout, config, budget)[0] * d  # mean of the reduced queries
        flops += n * 2 * d  # scores (mat-vec over all tokens)
        if config.kv_compensation:
            flops += 2 * (layout.frames * patches * d + nf * budget * d + 2 * nf * d)
    return bh * flops
