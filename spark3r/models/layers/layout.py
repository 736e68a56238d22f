"""What a global-attention layer tells the operation installed in its hook about its tokens.

The hook is ``Attention.global_op`` (``layers/attention.py``), so its contract lives here, next
to it: backbones build a :class:`TokenLayout` for each global layer, and whatever is installed
(``spark3r.accel``'s reduction ops, a FLOP recorder, a probe) is a :class:`GlobalAttentionOp`
that sees q, k, v and the layout, never a model class. ``spark3r.models`` imports nothing from
``spark3r.accel``; the dependency points the other way.

Token order inside a global layer is frame-major: ``S`` frames of ``P`` tokens each, and inside a
frame the ``special_tokens`` (camera / register tokens) come first, followed by the patch tokens
of a ``grid = (rows, cols)`` patch grid in row-major order, so ``P = special_tokens + rows*cols``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass(frozen=True)
class TokenLayout:
    frames: int
    tokens_per_frame: int
    special_tokens: int
    grid: tuple[int, int]
    # Index (in token order) of the frame that defines the model's world frame; it is never
    # reduced. None for reference-free backbones (pi3).
    reference_frame: Optional[int]
    # Which global-attention layer this is (0-based, counting global layers only) and how many
    # there are; schedules are indexed by it.
    layer: int = 0
    num_layers: int = 1

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if self.tokens_per_frame != self.special_tokens + rows * cols:
            raise ValueError(
                f"tokens_per_frame={self.tokens_per_frame} != special_tokens={self.special_tokens}"
                f" + grid {rows}x{cols}"
            )
        if self.reference_frame is not None and not 0 <= self.reference_frame < self.frames:
            raise ValueError(f"reference_frame={self.reference_frame} outside 0..{self.frames - 1}")

    @property
    def num_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def patches_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def protected_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[num_tokens]``: True for tokens no method may merge or prune (every frame's
        special tokens and every token of the reference frame)."""
        mask = torch.zeros(self.frames, self.tokens_per_frame, dtype=torch.bool, device=device)
        mask[:, : self.special_tokens] = True
        if self.reference_frame is not None:
            mask[self.reference_frame] = True
        return mask.reshape(-1)


class GlobalAttentionOp(Protocol):
    """A replaceable multi-view attention computation.

    ``q, k, v``: ``[B, heads, N, head_dim]`` with N = ``layout.num_tokens``, after qk-norm and
    RoPE. Returns the attention output ``[B, heads, N, head_dim]`` (before the output projection)
    in the original token order. ``scale`` is the softmax scale (``head_dim ** -0.5`` by default).
    """

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, scale: Optional[float] = None
    ) -> torch.Tensor: ...
