"""Spark3R: asymmetric token reduction in global attention.

Queries carry view-specific requests and are reduced mildly: the patch tokens of every
non-reference frame are cut into small spatial groups (``query_group`` = rows x cols of the patch
grid, 2x2 by default) and each group is merged to exactly ``query_keep`` tokens, per head, so
that replacing the members by their cluster means changes the post-RoPE queries least (squared
error; for 2x2 -> 2 the best of the three pairings exactly, otherwise greedy Ward merging). The
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

Data path (what keeps the op near its FLOP bound on CPU): the 2x2 -> 2 merge is one pass of a
fused C kernel (``native/pair_merge.c``; its eager twin decides on strided views of q and
gathers), the reduced queries and keys/values are gathered with one ``index_select`` each into
buffers reused across calls, the scoring mat-vec also yields the camera queries' logits over all
keys, the compensation tokens are folded into the flash kernel's result through its
log-sum-exp instead of a float mask, and the unmerge writes the output in ``[B, N, H, d]``
memory order, which the attention module's output projection reads without a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import torch

from spark3r.models.layers.layout import TokenLayout

from . import native
from .common import (Workspace, attention_with_extra_keys, check_qkv, exact_attention, gather_rows, layout_key,
                     row_view, static_index)
from .op import AttentionCost, attention_matmul_flops
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


# Output slot (0/1) of members 0..3 under each of the three pairings (member 0 is in slot 0).
_PAIR_SLOTS = ((0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 1, 0))
# Members (first, second) of slot 0 and of slot 1 under each pairing.
_PAIR_MEMBERS = (((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2)))


def pair_choice(members: Sequence[torch.Tensor]) -> torch.Tensor:
    """The split of four queries ``m0..m3 [..., d]`` into two pairs that changes them least when
    each pair is replaced by its mean: 0 = {01, 23}, 1 = {02, 13}, 2 = {03, 12} (ties go to the
    lower option). Returns ``[...]`` int64.

    Averaging a pair (a, b) costs ||a - b||^2 / 2 of squared error, so over a split the norms
    cancel and the best split has the largest <a, b> + <c, d>. The differences of those sums are
    two dot products — <m0 - m3, m1 - m2> (split 0 vs 1) and <m0 - m2, m1 - m3> (0 vs 2) — so
    the choice costs four subtractions and two dot products per group, elementwise over all
    groups at once (per-group 4x4 Gram matmuls would be tens of thousands of tiny GEMMs).
    The members may be strided views (no gather needed)."""
    m0, m1, m2, m3 = members
    a_minus_b = (m0 - m3).mul_(m1 - m2).sum(-1)
    a_minus_c = (m0 - m2).mul_(m1 - m3).sum(-1)
    b_wins = a_minus_c >= a_minus_b  # B - C = (A - C) - (A - B)
    a_wins = (a_minus_b >= 0) & (a_minus_c >= 0)
    return torch.where(a_wins, 0, torch.where(b_wins, 1, 2))


def merge_greedy(x: torch.Tensor, valid: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Agglomerative (Ward) merge inside each group down to ``min(keep, valid members)`` clusters.

    ``x [B, H, G, g, d]``, ``valid [G, g]`` -> (cluster means ``[B, H, G, keep, d]`` with the
    clusters in slots ``0..min(keep, size)-1``, member slot ``[B, H, G, g]``). Each step joins, in
    every group that still has more than ``keep`` clusters, the two clusters whose merge adds the
    least squared error, ``n_a n_b / (n_a + n_b) ||mean_a - mean_b||^2`` — the criterion
    :func:`pair_choice` optimises exactly for 2x2 -> 2. Cost O(G * g^2 * d) per step; ``g - keep`` steps."""
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
        n = sizes.clamp_min(1)
        means = sums / n[..., None]
        cost = torch.cdist(means, means).square_() * (n[..., :, None] * n[..., None, :] / (n[..., :, None] + n[..., None, :]))
        ok = alive[..., :, None] & alive[..., None, :] & ~eye
        flat = cost.masked_fill(~ok, float("inf")).flatten(-2).argmin(-1)
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


def group_member_views(q: torch.Tensor, layout: TokenLayout, group: tuple[int, int]) -> list[torch.Tensor]:
    """The members of every full group as strided views of q, one per position in the group
    (row-major), each ``[B, H, S, rows // gh, cols // gw, d]`` over *all* frames (the caller
    selects the reducible ones from the small per-group results)."""
    rows, cols = layout.grid
    gh, gw = group
    r2, c2 = rows // gh, cols // gw
    patches = q.unflatten(2, (layout.frames, layout.tokens_per_frame))[:, :, :, layout.special_tokens:]
    grid = patches.unflatten(3, (rows, cols))[:, :, :, : r2 * gh, : c2 * gw]
    cells = grid.unflatten(4, (c2, gw)).unflatten(3, (r2, gh))  # [B, H, S, r2, gh, c2, gw, d]
    return [cells[:, :, :, :, a, :, c] for a in range(gh) for c in range(gw)]


def merge_queries(q: torch.Tensor, layout: TokenLayout, group: tuple[int, int], keep: int,
                  workspace: Optional[Workspace] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced queries and the unmerge map.

    Returns ``q_red [B, H, Nq, d]`` (protected queries first, in token order, then the members of
    edge groups too small to reduce, then slot 0 of every full group, slot 1, ..., then the merged
    edge groups) and ``rows [B, H, N]``: for every original token, the row of ``q_red`` whose
    attention output it receives. ``gather_rows(out_red, rows)`` unmerges. With a workspace both
    live in its buffers (valid until the op's next call); without one they are fresh tensors and
    q_red is differentiable."""
    b, h, n, d = q.shape
    dev = q.device
    ws = workspace
    plan = merge_plan(layout, group, keep, dev)
    g = group[0] * group[1]
    gf, npass = plan.full.shape[0], plan.passthrough.numel()
    q_red = None if ws is None else ws.buffer("q_red", (b, h, plan.num_rows, d), q.dtype, dev)
    rows = _scratch(ws, "q_rows", (b, h, n), torch.long, dev)
    rows.copy_(plan.static_rows.expand(b, h, n))
    pairs = bool(gf) and g == 4 and keep == 2  # the default 2x2 -> 2: optimal pairing
    if pairs and ws is not None and native.pair_merge_usable(q):
        # Fused kernel: one pass reads each group's four queries and writes both pair means
        # (the eager branch below is its reference).
        q_red[:, :, :npass] = gather_rows(q, plan.passthrough.expand(b, h, npass),
                                          out=ws.buffer("q_pass", (b, h, npass, d), q.dtype, dev))
        best = _scratch(ws, "q_best", (b, h, gf), torch.long, dev)
        q_rows, head_row, step = row_view(q)
        native.pair_merge(q_rows, head_row.reshape(-1), step, plan.full, q_red, npass, best)
    else:
        # Every row starts as a copy of one token: pass-through tokens, and for pairs the first
        # member of each slot, which the second member is then averaged into.
        first = _scratch(ws, "q_first", (b, h, plan.num_rows), torch.long, dev)
        first[..., :npass] = plan.passthrough
        first[..., npass:] = 0  # rows of the other merges: written below
        if pairs:
            best = pair_choice(group_member_views(q, layout, group)).index_select(2, plan.frames).reshape(b, h, gf)
            order = plan.pair_members[best]  # [B, H, Gf, 4]: slot 0 first/second, slot 1 first/second
            members = plan.full.expand(b, h, gf, 4).gather(3, order)
            first[..., npass:npass + gf] = members[..., 0]
            first[..., npass + gf:npass + 2 * gf] = members[..., 2]
        q_red = gather_rows(q, first, out=q_red)
        if pairs:
            second = _scratch(ws, "q_second", (b, h, 2 * gf), torch.long, dev)
            second[..., :gf] = members[..., 1]
            second[..., gf:] = members[..., 3]
            partners = gather_rows(q, second, out=None if ws is None else
                                   ws.buffer("q_partner", (b, h, 2 * gf, d), q.dtype, dev))
            q_red[:, :, npass:npass + 2 * gf].lerp_(partners, 0.5)
    if pairs:
        slot = plan.pair_slots[best]  # [B, H, Gf, 4]
    elif gf:
        if keep == 1:
            means = group_means(q, layout, group, plan.frames)
            slot = torch.zeros(b, h, gf, g, dtype=torch.long, device=dev)
        else:
            xf = gather_rows(q, plan.full.reshape(1, 1, -1).expand(b, h, gf * g)).view(b, h, gf, g, d)
            means, slot = merge_greedy(xf, torch.ones(gf, g, dtype=torch.bool, device=dev), keep)
        q_red[:, :, npass:npass + gf * keep] = means.transpose(2, 3).reshape(b, h, keep * gf, d)
    if gf:
        pos = npass + slot * gf + torch.arange(gf, device=dev).view(1, 1, gf, 1)
        rows.index_copy_(2, plan.full.reshape(-1), pos.reshape(b, h, gf * g))
    gp = plan.partial.shape[0]
    if gp:
        offset = npass + gf * keep
        xp = gather_rows(q, plan.partial.reshape(1, 1, -1).expand(b, h, gp * g)).view(b, h, gp, g, d)
        merged, pslot = merge_greedy(xp, plan.partial_valid, keep)
        # Keep only the real output slots (a partial group of size s has min(keep, s) of them).
        real = (torch.arange(keep, device=dev)[None, :] < plan.partial_keep[:, None]).reshape(-1)
        q_red[:, :, offset:] = merged.reshape(b, h, gp * keep, d)[:, :, real]
        starts = torch.cumsum(plan.partial_keep, 0) - plan.partial_keep
        pos = offset + starts.view(1, 1, gp, 1) + pslot
        rows[:, :, plan.partial[plan.partial_valid]] = pos[:, :, plan.partial_valid]
    return q_red, rows


@dataclass(frozen=True)
class MergePlan:
    """Everything about the query reduction that depends only on the layout."""

    passthrough: torch.Tensor     # [Npass] tokens that keep a row of their own (protected first)
    full: torch.Tensor            # [Gf, g] full groups
    partial: torch.Tensor         # [Gp, g] edge groups larger than `keep` (padded)
    partial_valid: torch.Tensor   # [Gp, g]
    partial_keep: torch.Tensor    # [Gp]
    frames: torch.Tensor          # reducible frames (full groups are frame-major over them)
    static_rows: torch.Tensor     # [N] row of every pass-through token (-1 elsewhere)
    pair_members: torch.Tensor    # [3, 4] members in (slot 0 first, second, slot 1 first, second) order
    pair_slots: torch.Tensor      # [3, 4] slot of each member
    num_rows: int


@lru_cache(maxsize=64)
def _merge_plan(key: tuple, group: tuple[int, int], keep: int, device: str) -> MergePlan:
    frames, tpf, special, grid, ref = key
    layout = TokenLayout(frames, tpf, special, grid, ref)
    idx = static_index(layout, "cpu")
    groups = query_groups(layout, group, keep, "cpu")
    small = groups.partial_valid.sum(1) <= keep  # edge groups that keep every member
    passthrough = torch.cat((idx.protected, groups.partial[small][groups.partial_valid[small]]))
    rows = torch.full((layout.num_tokens,), -1, dtype=torch.long)
    rows[passthrough] = torch.arange(passthrough.numel())
    partial, valid = groups.partial[~small], groups.partial_valid[~small]
    part_keep = valid.sum(1).clamp(max=keep)
    num_rows = passthrough.numel() + groups.full.shape[0] * keep + int(part_keep.sum())
    members = torch.tensor([[*s0, *s1] for s0, s1 in _PAIR_MEMBERS])
    plan = MergePlan(passthrough, groups.full, partial, valid, part_keep, torch.tensor(idx.frames, dtype=torch.long),
                     rows, members, torch.tensor(_PAIR_SLOTS), num_rows)
    return MergePlan(**{f: (getattr(plan, f).to(device) if isinstance(getattr(plan, f), torch.Tensor) else getattr(plan, f))
                        for f in plan.__dataclass_fields__})


def merge_plan(layout: TokenLayout, group: tuple[int, int], keep: int, device) -> MergePlan:
    return _merge_plan(layout_key(layout), tuple(group), int(keep), str(torch.device(device)))


def group_means(q: torch.Tensor, layout: TokenLayout, group: tuple[int, int], frames: torch.Tensor) -> torch.Tensor:
    """Means of the full groups of the given frames, ``[B, H, G, 1, d]`` in the order of
    :class:`QueryGroups` ``.full``, read straight from strided views of q (no gather)."""
    b, h, _, d = q.shape
    views = group_member_views(q, layout, group)
    means = torch.stack(views).mean(0).index_select(2, frames)  # [B, H, F, r2, c2, d]
    return means.reshape(b, h, -1, 1, d)


def _scratch(ws: Optional[Workspace], name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device) if ws is None else ws.buffer(name, shape, dtype, device)


def unmerge(out_red: torch.Tensor, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Copy every token's output row back: ``out_red [B, H, Nq, d]``, ``rows [B, H, N]`` -> the
    ``[B, H, N, d]`` view of a ``[B, N, H, d]`` tensor (``out`` if given)."""
    b, h, n = rows.shape
    d = out_red.shape[-1]
    src, head_row, step = row_view(out_red)
    index = (rows * step + head_row).permute(0, 2, 1).reshape(-1)
    if out is None:
        return src.index_select(0, index).view(b, n, h, d).permute(0, 2, 1, 3)
    torch.index_select(src, 0, index, out=out.view(-1, d))
    return out.permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Key/value pruning


def special_index(layout: TokenLayout, count: int, device) -> torch.Tensor:
    """Token indices of the first ``count`` special tokens of every frame."""
    tokens = torch.arange(count, device=device)
    return (torch.arange(layout.frames, device=device)[:, None] * layout.tokens_per_frame + tokens).reshape(-1)


def summary_queries(q: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``[B, H, special_tokens + 1, d]``: the mean over frames of each special-token slot
    (camera, registers), and the mean of all queries."""
    b, h, n, d = q.shape
    special = q.unflatten(2, (layout.frames, layout.tokens_per_frame))[:, :, :, : layout.special_tokens].mean(2)
    return torch.cat((special, q.mean(2, keepdim=True)), 2)


def score_queries(q: torch.Tensor, q_red: torch.Tensor, layout: TokenLayout, score: str) -> Optional[torch.Tensor]:
    """The queries whose logits score the keys, ``[B, H, T, d]`` (None for ``key_norm``):
    ``query_mean`` = the mean of the queries that actually attend (merging keeps pair means, so
    this is the plain query mean up to the weighting of merged groups — half the read of q);
    ``query_summary`` = :func:`summary_queries`."""
    if score == "query_mean":
        return q_red.mean(2, keepdim=True)
    if score == "query_summary":
        return summary_queries(q, layout)
    if score == "key_norm":
        return None
    raise ValueError(f"kv_score must be one of {KV_SCORES}, got {score!r}")


def kv_scores(logits: Optional[torch.Tensor], k: torch.Tensor, layout: TokenLayout, score: str) -> torch.Tensor:
    """Score of every patch token of every frame as a key, ``[B, H, S, patches]`` (higher = keep),
    from the score queries' logits ``[B, H, T, N]`` (``logits = score_queries(...) @ k^T``).

    ``query_summary``: a key's score is its best per-frame log-softmax weight under any summary
    query, so keys that matter to the camera and register tokens survive even when the patch
    queries ignore them."""
    b, h, n, d = k.shape
    s, tpf, sp = layout.frames, layout.tokens_per_frame, layout.special_tokens
    if score == "query_mean":
        return logits[:, :, 0].reshape(b, h, s, tpf)[..., sp:]
    if score == "query_summary":
        per_frame = logits.unflatten(3, (s, tpf))[..., sp:]  # [B, H, T, S, P]
        return (per_frame - torch.logsumexp(per_frame, dim=-1, keepdim=True)).amax(2)
    if score == "key_norm":
        return torch.linalg.vector_norm(k, dim=-1).reshape(b, h, s, tpf)[..., sp:]
    raise ValueError(f"kv_score must be one of {KV_SCORES}, got {score!r}")


@dataclass
class PrunedKV:
    """Pruned keys/values: ``k/v [B, H, Nk, d]`` = protected tokens (token order), then ``budget``
    kept patch tokens per reducible frame; ``k_extra/v_extra [B, H, F, d]`` the compensation
    tokens (mean of each frame's pruned tokens) whose logits get ``+ bias = log(pruned count)``,
    or None; ``kept [B, H, F, budget]`` the kept token indices."""

    k: torch.Tensor
    v: torch.Tensor
    k_extra: Optional[torch.Tensor]
    v_extra: Optional[torch.Tensor]
    bias: Optional[float]
    kept: torch.Tensor


def prune_kv(scores: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, budget: int,
             compensation: bool = True, workspace: Optional[Workspace] = None) -> PrunedKV:
    """Keep the ``budget`` best-scoring patch tokens (``scores [B, H, S, patches]``, see
    :func:`kv_scores`) of every reducible frame, per head, plus every protected token."""
    b, h, n, d = k.shape
    dev = k.device
    idx = static_index(layout, dev)
    patches = layout.patches_per_frame
    if not 1 <= budget <= patches:
        raise ValueError(f"K/V budget must be in 1..{patches} (patch tokens per frame), got {budget}")
    nf, npro = len(idx.frames), idx.protected.numel()
    frames = torch.tensor(idx.frames, dtype=torch.long, device=dev)
    if budget == patches:
        kept = idx.reducible.expand(b, h, nf, patches)
    else:
        local = scores.index_select(2, frames).topk(budget, dim=-1, sorted=False).indices
        kept = local + (frames * layout.tokens_per_frame + layout.special_tokens).view(1, 1, nf, 1)
    ws = workspace
    nk = npro + nf * budget
    index = _scratch(ws, "kv_index", (b, h, nk), torch.long, dev)
    index[..., :npro] = idx.protected
    index[..., npro:] = kept.reshape(b, h, nf * budget)
    k_red = gather_rows(k, index, out=None if ws is None else ws.buffer("k_red", (b, h, nk, d), k.dtype, dev))
    v_red = gather_rows(v, index, out=None if ws is None else ws.buffer("v_red", (b, h, nk, d), v.dtype, dev))
    if not compensation or budget == patches or nf == 0:
        return PrunedKV(k_red, v_red, None, None, None, kept)
    pruned = patches - budget
    extra = []
    for x, x_red in ((k, k_red), (v, v_red)):
        # fp32 sums: total - kept cancels, which half precision would not survive
        patch_sums = x.unflatten(2, (layout.frames, layout.tokens_per_frame))[:, :, :, layout.special_tokens:]
        total = patch_sums.sum(3, dtype=torch.float32).index_select(2, frames)
        kept_sum = x_red[:, :, npro:].unflatten(2, (nf, budget)).sum(3, dtype=torch.float32)
        extra.append(total.sub_(kept_sum).div_(pruned).to(x.dtype))
    return PrunedKV(k_red, v_red, extra[0], extra[1], math.log(pruned), kept)


# ---------------------------------------------------------------------------------------------
# The reduced attention of one layer


def spark3r_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, config: Spark3RConfig,
    budget: int, scale: Optional[float] = None, workspace: Optional[Workspace] = None,
) -> torch.Tensor:
    """The reduced attention of one layer, output in original token order (``[B, H, N, d]``; with
    reduced queries a view of a ``[B, N, H, d]`` buffer). ``workspace``: reuse buffers across
    calls (see :class:`Workspace`)."""
    patches = layout.patches_per_frame
    prunes = budget < patches
    if (not config.reduces_queries and not prunes) or not static_index(layout, q.device).frames:
        return exact_attention(q, k, v, scale)
    # Reused buffers are written with out= ops, which autograd cannot follow: with gradients
    # the same computation runs on fresh tensors.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ws = None if grad else (workspace if workspace is not None else Workspace())
    b, h, n, d = q.shape
    if config.reduces_queries:
        q_red, rows = merge_queries(q, layout, config.query_group, config.query_keep, ws)
    else:
        q_red, rows = q, None
    dense = min(config.dense_queries, layout.special_tokens) if prunes else 0
    if prunes:
        # One matmul over all keys gives the score queries' logits and, for the dense queries,
        # their exact logits (the camera tokens see every key).
        scorers = score_queries(q, q_red, layout, config.kv_score)
        cams = special_index(layout, dense, q.device) if dense else None
        probes = [p for p in (scorers, None if cams is None else q.index_select(2, cams)) if p is not None]
        logits = torch.matmul(torch.cat(probes, 2), k.transpose(-1, -2)) if probes else None
        score_logits = None if scorers is None else logits[:, :, : scorers.shape[2]]
        kv = prune_kv(kv_scores(score_logits, k, layout, config.kv_score), k, v, layout, budget,
                      config.kv_compensation, ws)
        if dense:  # while v is still in cache from the pruning
            cam_logits = logits[:, :, logits.shape[2] - cams.numel():].float() * (d ** -0.5 if scale is None else scale)
            cam_out = torch.matmul(torch.softmax(cam_logits, -1).to(v.dtype), v)
        if kv.k_extra is None:
            out_red = exact_attention(q_red, kv.k, kv.v, scale)
        else:
            out_red = attention_with_extra_keys(q_red, kv.k, kv.v, kv.k_extra, kv.v_extra, kv.bias, scale)
    else:
        out_red = exact_attention(q_red, k, v, scale)
    out = out_red if rows is None else unmerge(out_red, rows, None if ws is None else ws.output((b, n, h, d), q.dtype, q.device))
    if dense:
        out[:, :, cams] = cam_out
    return out


class Spark3ROp:
    """The global-attention op (``GlobalAttentionOp``) for one model: config + resolved schedule."""

    def __init__(self, config: Spark3RConfig, schedule: KVSchedule) -> None:
        self.config = config
        self.schedule = schedule
        # Buffers shared by all layers of a forward (same shapes); per thread. The op's result
        # buffer is recycled only once the caller has dropped the previous result.
        self.workspace = Workspace()
        # Build the fused merge kernel now (a cache hit after the first time), not inside the
        # first forward — a node would otherwise stall on the compiler with a camera streaming in.
        native.load("pair_merge")

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
        return spark3r_attention(q, k, v, layout, self.config, self.budget(layout), scale, self.workspace)

    def attention_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> AttentionCost:
        """Attention of the merged queries over the kept keys (+ compensation tokens) — the sizes
        are closed form and match the op exactly — plus the op's own overhead."""
        budget = self.budget(layout)
        nq, nk = spark3r_sizes(layout, self.config, budget)
        return AttentionCost(attention_matmul_flops(nq, nk, heads, head_dim, batch),
                             spark3r_overhead_flops(layout, self.config, budget, heads, head_dim, batch), nq, nk)


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
    the pairing decision (four differences, two dot products) and the pair means per 4-group
    (greedy: g^2 distances per step), the mean query and the score mat-vec, the dense queries'
    softmax and value product, and the per-frame sums for the compensation tokens."""
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
            flops += groups * (4 * d + 2 * 2 * d + 2 * 3 * d)
        else:
            flops += groups * (g - keep) * (g * g * 3 * d + 3 * g * d)
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
