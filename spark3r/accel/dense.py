"""``dense``: exact attention, the reference every other method is measured against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spark3r.models.layers.layout import TokenLayout

from .common import check_qkv, exact_attention
from .op import AttentionCost, dense_cost


@dataclass(frozen=True)
class DenseConfig:
    """``dense`` has no parameters."""


class DenseOp:
    """Exact SDPA through the hook (same numbers as ``global_op = None``); ``apply`` leaves the
    hook unset for it, this class exists for op-level benchmarks and tests."""

    def __init__(self, config: DenseConfig = DenseConfig()) -> None:
        self.config = config

    def is_identity(self, layer: int) -> bool:
        return True

    def __call__(self, q, k, v, layout: TokenLayout, scale: Optional[float] = None):
        check_qkv(q, k, v, layout)
        return exact_attention(q, k, v, scale)

    def attention_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> AttentionCost:
        return dense_cost(layout, heads, head_dim, batch)
