"""Spark3R as the paper describes it (``Spark3RConfig(recipe="paper")``), next to our design.

The recipe, from a paper note (not checked against the PDF; /work/shared/notes/methods.md):

* **Queries** are merged ToMe/FastVGGT-style by bipartite matching *inside temporal groups* of
  ``temporal_group`` (G = 20) consecutive frames, never across a group boundary. The query factor
  grows with the frame count S (:func:`query_factor`: 1 up to 100 frames, 2 up to 300, 3 up to
  500, 4 beyond). With factor r, the destinations of a group are the patch tokens ``p`` of frame
  ``f`` with ``(p + f) % r == 0`` (1/r of every frame, staggered so neighbouring frames offer
  different positions); every other patch token of the group (a source) joins the destination
  whose query is most cosine-similar (all heads concatenated, one assignment for every head). A
  destination's query becomes the mean of itself and its sources; its attention output is copied
  back to all of them. The merge metric and the copy-back are not stated in the note; these are
  the FastVGGT choices.
* **Keys/values** are pruned by temporal stride without scoring or averaging: with factor r only
  frames ``f % r == 0`` keep their patch tokens as keys/values (:func:`kv_factor`: r = ceil(S/40)
  for S > 100, i.e. about 40 frames' worth of keys whatever S is, else 1; times
  ``low_sensitivity_factor`` (3) on low-sensitivity layers, so those prune even short inputs).
* **Layers** come in two tiers (:class:`~spark3r.accel.schedule.LayerTiers`): high-sensitivity
  layers keep the base K/V factor, the others get x3. The tiers are measured once per backbone by
  `spark3r calibrate --recipe paper` (one layer's K/V factor raised 32 -> 256 with the others
  at 32; > 1.05x worse output = high-sensitivity).

Protected, as in our design (the note is silent; kept until a measurement says otherwise):
the special tokens (camera, registers) of every frame and every token of the reference frame
are never merged as queries and always kept as keys/values — the camera token carries the pose
estimate and the reference frame defines the world frame.

At S <= 100 on a high-sensitivity layer both factors are 1 and the op computes exact dense
attention (the same SDPA call as the model's dense path). The factors depend on S, which is not
known when the op is installed, so ``is_identity`` is False on every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch

from spark3r.models.layers.layout import TokenLayout

from .common import check_qkv, exact_attention, layout_key, static_index
from .op import AttentionCost, attention_matmul_flops, dense_cost
from .schedule import LayerTiers

# (largest frame count, query factor); beyond the last bound the factor is QUERY_FACTOR_MAX.
QUERY_FACTOR_TABLE = ((100, 1), (300, 2), (500, 3))
QUERY_FACTOR_MAX = 4
KV_DENSE_UP_TO = 100  # frames up to which the base K/V factor is 1
KV_FRAMES_KEPT = 40   # beyond: factor ceil(S / 40), about this many frames' worth of keys


def query_factor(frames: int) -> int:
    """The paper's query factor r_Q for S frames."""
    for bound, factor in QUERY_FACTOR_TABLE:
        if frames <= bound:
            return factor
    return QUERY_FACTOR_MAX


def kv_factor(frames: int, low_sensitivity: bool, low_sensitivity_factor: int = 3) -> int:
    """The paper's K/V factor r_KV for S frames on a layer of either tier."""
    base = 1 if frames <= KV_DENSE_UP_TO else math.ceil(frames / KV_FRAMES_KEPT)
    return base * (low_sensitivity_factor if low_sensitivity else 1)


# ---------------------------------------------------------------------------------------------
# Temporal query groups and bipartite merging


def temporal_groups(frames: int, group: int) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` frame ranges of consecutive groups of ``group`` frames (the last may be
    shorter)."""
    if group < 1:
        raise ValueError(f"temporal group must be >= 1 frame, got {group}")
    return tuple((s, min(s + group, frames)) for s in range(0, frames, group))


@dataclass(frozen=True)
class GroupPlan:
    """Static token indices of the temporal query merge for one layout and factor."""

    protected: torch.Tensor               # [Np] protected tokens (token order)
    destinations: tuple[torch.Tensor, ...]  # per group, destination token indices
    sources: tuple[torch.Tensor, ...]       # per group, source token indices

    @property
    def num_queries(self) -> int:
        return self.protected.numel() + sum(d.numel() for d in self.destinations)


@lru_cache(maxsize=64)
def _group_plan(key: tuple, group: int, factor: int, device: str) -> GroupPlan:
    frames, tpf, special, grid, ref = key
    layout = TokenLayout(frames, tpf, special, grid, ref)
    idx = static_index(layout, "cpu")
    patches = torch.arange(layout.patches_per_frame)
    row_of = {f: i for i, f in enumerate(idx.frames)}
    dsts, srcs = [], []
    for start, stop in temporal_groups(frames, group):
        d, s = [], []
        for f in range(start, stop):
            if f not in row_of:  # the reference frame is protected
                continue
            tokens = idx.reducible[row_of[f]]
            is_dst = (patches + f) % factor == 0
            d.append(tokens[is_dst])
            s.append(tokens[~is_dst])
        if d:
            dst, src = torch.cat(d), torch.cat(s)
            if dst.numel() == 0:  # a group smaller than the factor (tiny grid, G = 1): keep one query
                dst, src = src[:1], src[1:]
            dsts.append(dst.to(device))
            srcs.append(src.to(device))
    return GroupPlan(idx.protected.to(device), tuple(dsts), tuple(srcs))


def group_plan(layout: TokenLayout, group: int, factor: int, device) -> GroupPlan:
    return _group_plan(layout_key(layout), int(group), int(factor), str(torch.device(device)))


def match_to_destinations(features: torch.Tensor, destinations: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """For one group: the position (in ``destinations``) of each source's most cosine-similar
    destination. ``features [N, C]`` are already L2-normalised."""
    if sources.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    sim = features.index_select(0, sources) @ features.index_select(0, destinations).T
    return sim.argmax(dim=1)


def merge_queries_temporal(q: torch.Tensor, layout: TokenLayout, group: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries merged inside temporal groups and the unmerge map.

    ``q [B, H, N, d]`` -> ``q_red [B, H, Nq, d]`` (protected tokens in token order, then every
    group's destinations) and ``rows [B, N]``: the row of ``q_red`` whose output each token
    receives (one assignment for all heads, per batch element)."""
    b, h, n, d = q.shape
    plan = group_plan(layout, group, factor, q.device)
    npro = plan.protected.numel()
    dst_all = torch.cat(plan.destinations) if plan.destinations else plan.protected[:0]
    src_all = torch.cat(plan.sources) if plan.sources else plan.protected[:0]
    rows = torch.empty(b, n, dtype=torch.long, device=q.device)
    q_red = torch.empty(b, h, npro + dst_all.numel(), d, dtype=q.dtype, device=q.device)
    for i in range(b):
        features = torch.nn.functional.normalize(q[i].permute(1, 0, 2).reshape(n, h * d), dim=-1)
        offset, targets = npro, []
        for dst, src in zip(plan.destinations, plan.sources):
            targets.append(offset + match_to_destinations(features, dst, src))
            offset += dst.numel()
        target = torch.cat(targets) if targets else src_all
        rows[i, plan.protected] = torch.arange(npro, device=q.device)
        rows[i, dst_all] = torch.arange(npro, npro + dst_all.numel(), device=q.device)
        rows[i, src_all] = target
        sums = q[i].index_select(1, torch.cat((plan.protected, dst_all)))
        sums = sums.index_add(1, target, q[i].index_select(1, src_all))
        count = torch.ones(sums.shape[1], dtype=q.dtype, device=q.device).index_add(
            0, target, torch.ones_like(target, dtype=q.dtype))
        q_red[i] = sums / count[None, :, None]
    return q_red, rows


def unmerge_rows(out_red: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out_red [B, H, Nq, d]``, ``rows [B, N]`` -> ``[B, H, N, d]`` (copy-back)."""
    b, h, _, d = out_red.shape
    return out_red.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))


# ---------------------------------------------------------------------------------------------
# Temporal-stride key/value pruning


def stride_kept_frames(frames: int, factor: int, reference_frame: Optional[int]) -> tuple[int, ...]:
    """Frames whose patch tokens stay as keys/values: every ``factor``-th frame from frame 0, and
    the reference frame."""
    if factor < 1:
        raise ValueError(f"K/V factor must be >= 1, got {factor}")
    kept = set(range(0, frames, factor))
    if reference_frame is not None:
        kept.add(reference_frame)
    return tuple(sorted(kept))


def stride_kv_index(layout: TokenLayout, factor: int, device) -> torch.Tensor:
    """Token indices kept as keys/values (token order): every frame's special tokens and all
    tokens of the kept frames."""
    return _stride_kv_index(layout_key(layout), int(factor), str(torch.device(device)))


@lru_cache(maxsize=64)
def _stride_kv_index(key: tuple, factor: int, device: str) -> torch.Tensor:
    frames, tpf, special, grid, ref = key
    keep = torch.zeros(frames, tpf, dtype=torch.bool)
    keep[:, :special] = True
    keep[list(stride_kept_frames(frames, factor, ref))] = True
    return torch.nonzero(keep.reshape(-1), as_tuple=False).flatten().to(device)


# ---------------------------------------------------------------------------------------------
# One layer


def paper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, q_factor: int,
                    kv_factor_: int, group: int, scale: Optional[float] = None) -> torch.Tensor:
    """The paper recipe's attention of one layer at the given factors, output in token order."""
    if (q_factor == 1 and kv_factor_ == 1) or not static_index(layout, q.device).frames:
        return exact_attention(q, k, v, scale)
    if kv_factor_ > 1:
        index = stride_kv_index(layout, kv_factor_, q.device)
        k, v = k.index_select(2, index), v.index_select(2, index)
    if q_factor == 1:
        return exact_attention(q, k, v, scale)
    q_red, rows = merge_queries_temporal(q, layout, group, q_factor)
    return unmerge_rows(exact_attention(q_red, k, v, scale), rows)


def paper_sizes(layout: TokenLayout, q_factor: int, kv_factor_: int, group: int) -> tuple[int, int]:
    """(queries, keys) the reduced attention runs on."""
    if not static_index(layout, "cpu").frames:
        return layout.num_tokens, layout.num_tokens
    nq = layout.num_tokens if q_factor == 1 else group_plan(layout, group, q_factor, "cpu").num_queries
    nk = layout.num_tokens if kv_factor_ == 1 else stride_kv_index(layout, kv_factor_, "cpu").numel()
    return nq, nk


def paper_overhead_flops(layout: TokenLayout, q_factor: int, group: int, heads: int, head_dim: int,
                         batch: int = 1) -> int:
    """The query merge's arithmetic: normalising the features (3 per element), the cosine
    similarities of every source with its group's destinations (2 C each) and the merge sums
    (one add per source element + the divide). Stride pruning computes nothing."""
    if q_factor == 1 or not static_index(layout, "cpu").frames:
        return 0
    c = heads * head_dim
    plan = group_plan(layout, group, q_factor, "cpu")
    matching = sum(2 * s.numel() * d.numel() * c for d, s in zip(plan.destinations, plan.sources))
    merged = sum(s.numel() for s in plan.sources) + plan.num_queries
    return batch * (3 * layout.num_tokens * c + matching + merged * c)


class Spark3RPaperOp:
    """The global-attention op of ``spark3r`` with ``recipe="paper"``: config + layer tiers.

    ``fixed_kv_factors`` (one per global layer) replaces the frame-count rule for keys/values;
    the sensitivity probe of `spark3r calibrate --recipe paper` uses it."""

    def __init__(self, config, tiers: LayerTiers, fixed_kv_factors: Optional[Sequence[int]] = None) -> None:
        self.config = config
        self.schedule = tiers
        if fixed_kv_factors is not None:
            fixed_kv_factors = tuple(int(f) for f in fixed_kv_factors)
            if len(fixed_kv_factors) != tiers.num_layers or min(fixed_kv_factors) < 1:
                raise ValueError(f"fixed_kv_factors must give a factor >= 1 for each of the {tiers.num_layers} layers, "
                                 f"got {fixed_kv_factors}")
        self.fixed_kv_factors = fixed_kv_factors

    def factors(self, layout: TokenLayout) -> tuple[int, int]:
        """(r_Q, r_KV) on this layer at this frame count."""
        if self.fixed_kv_factors is not None:
            kv = self.fixed_kv_factors[layout.layer]
        else:
            kv = kv_factor(layout.frames, self.schedule.is_low_sensitivity(layout.layer),
                           self.config.low_sensitivity_factor)
        return query_factor(layout.frames), kv

    def is_identity(self, layer: int) -> bool:
        return False  # the factors depend on the frame count, known only at call time

    def __call__(self, q, k, v, layout: TokenLayout, scale: Optional[float] = None) -> torch.Tensor:
        check_qkv(q, k, v, layout)
        if layout.num_layers != self.schedule.num_layers:
            raise ValueError(f"the layer tiers cover {self.schedule.num_layers} layers but the model reports "
                             f"{layout.num_layers} global layers")
        rq, rkv = self.factors(layout)
        return paper_attention(q, k, v, layout, rq, rkv, self.config.temporal_group, scale)

    def attention_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> AttentionCost:
        rq, rkv = self.factors(layout)
        if rq == 1 and rkv == 1:
            return dense_cost(layout, heads, head_dim, batch)
        nq, nk = paper_sizes(layout, rq, rkv, self.config.temporal_group)
        return AttentionCost(attention_matmul_flops(nq, nk, heads, head_dim, batch),
                             paper_overhead_flops(layout, rq, self.config.temporal_group, heads, head_dim, batch), nq, nk)
