"""The contract of a token-reduction op — the one place it is written down.

An op is what :func:`spark3r.accel.apply` installs in a global-attention layer's ``global_op``
hook (the hook's own contract, :class:`~spark3r.models.layers.layout.GlobalAttentionOp` and
:class:`~spark3r.models.layers.layout.TokenLayout`, lives with the hook in
``spark3r.models.layers``). On top of computing attention, an op says on which layers it would be
exact (the hook is then left unset) and **prices itself**: for a layer's layout it reports the
attention FLOPs it performs and its own overhead. The FLOP model (``spark3r.bench.flops``) only
sums what ops report, so a method need not be "dense attention on fewer tokens" — a
block-sparse method with a compressed branch and top-k blocks reports its own matmuls.

FLOP conventions: a multiply-add is 2 FLOPs; attention counts the two matmuls (QK^T and AV,
``4 * queries * keys * head_dim`` per head and batch element), exactly what
``torch.utils.flop_counter`` counts for SDPA; softmax and other elementwise work inside attention
are not counted (for any method). Overheads (matching, scoring, merging sums) are counted as their
arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch

from spark3r.models.layers.layout import GlobalAttentionOp, TokenLayout


@dataclass(frozen=True)
class AttentionCost:
    """What one global layer's attention costs under an op."""

    attention: float  # FLOPs of the attention matmuls the op performs
    overhead: float   # FLOPs of everything else the op computes
    queries: int      # query rows attention is computed for
    keys: float       # keys per query (the mean, for methods where it varies by query)

    @property
    def total(self) -> float:
        return self.attention + self.overhead


def attention_matmul_flops(queries: float, keys: float, heads: int, head_dim: int, batch: int = 1) -> float:
    """FLOPs of ``softmax(q k^T) v`` for ``queries`` x ``keys`` (the two matmuls only)."""
    return 4 * batch * heads * queries * keys * head_dim


def dense_cost(layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> AttentionCost:
    """Exact attention over all of the layer's tokens (also any layer an op leaves exact)."""
    n = layout.num_tokens
    return AttentionCost(attention_matmul_flops(n, n, heads, head_dim, batch), 0, n, n)


@runtime_checkable
class AttentionOp(GlobalAttentionOp, Protocol):
    """A token-reduction op (what a method's ``make_op`` returns).

    ``__call__(q, k, v, layout, scale=None)``: see :class:`GlobalAttentionOp` — q, k, v are
    ``[B, heads, N, head_dim]`` after qk-norm and RoPE; the result has the same shape, in the
    original token order.
    """

    config: Any  # the method's config dataclass

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, scale: Optional[float] = None
    ) -> torch.Tensor: ...

    def is_identity(self, layer: int) -> bool:
        """True when the op computes exact attention on this layer (``apply`` then leaves the
        hook unset, and the layer is priced as dense)."""
        ...

    def attention_flops(self, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> AttentionCost:
        """The cost of this op on a layer of ``layout`` (closed form: no tensors are touched)."""
        ...


def layer_cost(op: Optional[AttentionOp], layout: TokenLayout, heads: int, head_dim: int,
               batch: int = 1) -> AttentionCost:
    """The cost of one global layer: ``op=None`` or an op that leaves the layer exact is dense."""
    if op is None or op.is_identity(layout.layer):
        return dense_cost(layout, heads, head_dim, batch)
    return op.attention_flops(layout, heads, head_dim, batch)
