"""``uniform``: the symmetric baseline — FastVGGT-style similarity merging of q, k and v alike.

Per layer the tokens are split into destinations — every protected token (all special tokens,
the whole reference frame) plus one token per ``cell`` (2x2 by default) of every other frame's
patch grid, drawn with a seeded generator — and sources (the remaining patch tokens). Each
source finds its most similar destination (cosine similarity of its keys, all heads
concatenated, as the token's feature); the ``ratio`` fraction of sources with the highest
similarity is merged into their destination by averaging q, k and v with the same assignment;
the rest stay as they are. Attention runs on the merged set for queries and keys alike, and every
merged source receives its destination's output (unmerge by copy).

The matching is a (sources x destinations) matrix product — quadratic in tokens, which is the
overhead Spark3R's group-local merging avoids; the FLOP model counts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from spark3r.models.layers.layout import TokenLayout

from .common import check_qkv, exact_attention, layout_key, static_index
from .op import AttentionCost, attention_matmul_flops


@dataclass(frozen=True)
class UniformConfig:
    """Parameters of the ``uniform`` method (CLI ``--ratio``..., ROS ``reduction.ratio``...)."""

    ratio: float = 0.9
    cell: tuple[int, int] = (2, 2)
    destination_seed: int = 33

    def __post_init__(self) -> None:
        cell = tuple(int(x) for x in self.cell)
        object.__setattr__(self, "cell", cell)
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise ValueError(f"ratio (fraction of source tokens merged) must be in [0, 1], got {self.ratio}")
        if len(cell) != 2 or min(cell) < 1:
            raise ValueError(f"cell must be two positive ints (rows, cols), got {self.cell}")


@lru_cache(maxsize=64)
def _partition(key: tuple, cell: tuple[int, int], seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    frames, tpf, special, grid, ref = key
    layout = TokenLayout(frames, tpf, special, grid, ref)
    idx = static_index(layout, "cpu")
    rows, cols = grid
    ch, cw = cell
    gen = torch.Generator().manual_seed(seed)
    cells = [[r * cols + c for r in range(r0, min(r0 + ch, rows)) for c in range(c0, min(c0 + cw, cols))]
             for r0 in range(0, rows, ch) for c0 in range(0, cols, cw)]
    picks = []
    for _ in idx.frames:
        choice = torch.randint(0, 1 << 30, (len(cells),), generator=gen)
        picks.append([members[int(c) % len(members)] for members, c in zip(cells, choice)])
    if ref is None and picks:
        # Reference-free backbones (pi3) are permutation-equivariant; a per-frame draw would tie
        # each frame's partition to its position, so every frame gets the same pattern.
        picks = [picks[0]] * len(picks)
    if idx.frames:
        local = torch.tensor(picks, dtype=torch.long)  # [F, cells]
        chosen = idx.reducible.gather(1, local)
        is_dst = torch.zeros_like(idx.reducible, dtype=torch.bool).scatter(1, local, True)
        src = idx.reducible[~is_dst]
        dst = torch.cat((idx.protected, chosen.reshape(-1)))
    else:
        src = torch.zeros(0, dtype=torch.long)
        dst = idx.protected
    return dst.to(device), src.to(device)


def partition(layout: TokenLayout, cell: tuple[int, int], seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) token indices; the seed is offset by the layer so layers differ."""
    return _partition(layout_key(layout), tuple(cell), int(seed) + layout.layer, str(torch.device(device)))


def match_sources(k: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one batch element ``k [H, N, d]``: (merged sources, their destination row, kept sources)."""
    h, n, d = k.shape
    feat = torch.nn.functional.normalize(k.permute(1, 0, 2).reshape(n, h * d), dim=-1)
    sim = feat.index_select(0, src) @ feat.index_select(0, dst).T
    best, target = sim.max(dim=-1)
    n_merge = int(round(ratio * src.numel()))
    order = best.argsort(descending=True)
    merged = order[:n_merge]
    return src[merged], target[merged], src[order[n_merge:]]


def uniform_attention(q, k, v, layout: TokenLayout, config: UniformConfig, scale: Optional[float] = None) -> torch.Tensor:
    """Symmetric merged attention, output in original token order."""
    if config.ratio == 0:
        return exact_attention(q, k, v, scale)
    b, h, n, d = q.shape
    dst, src = partition(layout, config.cell, config.destination_seed, q.device)
    if src.numel() == 0:
        return exact_attention(q, k, v, scale)
    outs = []
    for i in range(b):
        merged_src, target, kept_src = match_sources(k[i], dst, src, config.ratio)
        count = torch.ones(dst.numel(), dtype=q.dtype, device=q.device).index_add(
            0, target, torch.ones_like(target, dtype=q.dtype))

        def reduce(x):
            xd = x.index_select(1, dst).index_add(1, target, x.index_select(1, merged_src))
            return torch.cat((xd / count[None, :, None], x.index_select(1, kept_src)), dim=1)

        out_red = exact_attention(reduce(q[i])[None], reduce(k[i])[None], reduce(v[i])[None], scale)[0]
        source = torch.empty(n, dtype=torch.long, device=q.device)
        source[dst] = torch.arange(dst.numel(), device=q.device)
        source[merged_src] = target
        source[kept_src] = dst.numel() + torch.arange(kept_src.numel(), device=q.device)
        outs.append(out_red.index_select(1, source))
    return torch.stack(outs)


def uniform_sizes(layout: TokenLayout, config: UniformConfig) -> int:
    """Tokens the reduced attention runs on (queries = keys)."""
    if config.ratio == 0:
        return layout.num_tokens
    dst, src = partition(layout, config.cell, config.destination_seed, "cpu")
    return dst.numel() + src.numel() - int(round(config.ratio * src.numel()))


def uniform_overhead_flops(layout: TokenLayout, config: UniformConfig, heads: int, head_dim: int, batch: int = 1) -> int:
    """Matching matmul (2 * sources * destinations * feature) + normalisation + merge adds."""
    if config.ratio == 0:
        return 0
    dst, src = partition(layout, config.cell, config.destination_seed, "cpu")
    c = heads * head_dim
    n = layout.num_tokens
    return batch * (2 * src.numel() * dst.numel() * c + 3 * n * c + 3 * src.numel() * c)


class UniformOp:
    def __init__(self, config: UniformConfig) -> None:
        self.config = config

    def is_identity(self, layer: int) -> bool:
        return self.config.ratio == 0

    def __call__(self, q, k, v, layout: TokenLayout, scale: Optional[float] = None) -> torch.Tensor:
        check_qkv(q, k, v, layout)
        return uniform_attention(q, k, v, layout, self.config, scale)

    def attention_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> AttentionCost:
        """Dense attention over the merged tokens (queries = keys) plus the matching and merging."""
        m = uniform_sizes(layout, self.config)
        return AttentionCost(attention_matmul_flops(m, m, heads, head_dim, batch),
                             uniform_overhead_flops(layout, self.config, heads, head_dim, batch), m, m)
