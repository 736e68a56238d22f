"""A VGGT Speed3R student: VGGT whose global layers carry learned Speed3R gates.

The paper's VGGT variant of Speed3R (arXiv 2603.08055) is not released; this is the π3 layer
carried over to VGGT, trained here with ``spark3r distill`` from a dense VGGT of the same
architecture (preset ``vggt-nano-speed3r``: the built-in ``vggt-nano`` plus gates).

* Architecture and state dict: exactly the dense VGGT's, plus per global block
  ``aggregator.global_blocks.{i}.attn.gate.0.{weight,bias}`` = ``Linear(C -> 2*heads)`` (+ sigmoid)
  on the block's attention input: channel 2h gates head h's compression branch, 2h+1 its
  selection branch (:func:`speed3r_state_dict_from_dense` adds them at the official
  initialisation, weight 0 and bias -1 / +1).
* Global attention: the learned layer on VGGT's row-major tokens,
  :func:`~.layers.sparse_attention.gated_block_attention` (installed by the constructor as
  :class:`~.layers.sparse_attention.LearnedSparseAttention` with the config's ``window`` and
  ``top_k``): camera/register tokens and the reference frame (frame 0) attend densely and are
  always-selected keys of every block; the other frames' patches are ``window x window``
  blocks of the row-major grid (edge windows smaller), so any multiple of 14 px works — no
  reordering, no 56-px constraint. Frame attention stays dense.
* ``spark3r.accel.remove(model)`` runs the same weights with dense global attention (gates
  unused): the dense teacher. ``spark3r.accel.apply(model, "speed3r", top_k=...)`` runs the learned
  layer with other parameters (and prices it); other methods replace the learned layer by their
  own op (gates unused).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .layers.sparse_attention import LearnedSparseAttention
from .vggt import VGGT, VGGTConfig


@dataclass(frozen=True)
class VGGTSpeed3RConfig(VGGTConfig):
    """VGGT numbers plus Speed3R's: ``window`` (patches per block side, 4) and ``top_k`` (key
    blocks per query block, 32) that the gates are trained with."""

    window: int = 4
    top_k: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.top_k < 1:
            raise ValueError(f"window and top_k must be >= 1, got {self.window}, {self.top_k}")


class VGGTSpeed3R(VGGT):
    """VGGT with learned sparse global attention (module docstring); outputs as :class:`VGGT`."""

    GATED_GLOBAL_ATTENTION = True

    def __init__(self, config: VGGTSpeed3RConfig = VGGTSpeed3RConfig(), preset: Optional[str] = None) -> None:
        super().__init__(config, preset=preset)
        native = LearnedSparseAttention((config.window, config.window), config.top_k)
        for module in self.global_attention_modules():
            module.global_op = native

    @property
    def encoder(self) -> nn.Module:
        """The per-frame DINO encoder (frozen during distillation)."""
        return self.aggregator.patch_embed


def speed3r_state_dict_from_dense(vggt_state: dict, num_heads: int) -> dict:
    """A dense VGGT state dict -> the student's: every entry unchanged, plus each global block's
    gate at the official initialisation (weight 0, bias (-1, +1) per head: compression ~0.27,
    selection ~0.73)."""
    out = dict(vggt_state)
    layers = sorted({int(name.split(".")[2]) for name in vggt_state
                     if name.startswith("aggregator.global_blocks.") and name.endswith(".attn.qkv.weight")})
    for i in layers:
        qkv = vggt_state[f"aggregator.global_blocks.{i}.attn.qkv.weight"]
        out[f"aggregator.global_blocks.{i}.attn.gate.0.weight"] = torch.zeros(2 * num_heads, qkv.shape[1], dtype=qkv.dtype)
        out[f"aggregator.global_blocks.{i}.attn.gate.0.bias"] = torch.tensor([-1.0, 1.0], dtype=qkv.dtype).repeat(num_heads)
    return out
