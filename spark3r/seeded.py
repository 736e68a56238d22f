"""Deterministic synthetic weights (rule ``seeded-v1`` of ../shared/golden/README.md §1).

Used where real checkpoints are unavailable (benchmarks, calibration demos, tests): every
state-dict entry's value depends only on its name and shape, so any process reproduces the same
model bit for bit.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable

import torch


def seeded_v1(name: str, shape: Iterable[int]) -> torch.Tensor:
    """The float32 value of state-dict entry ``name`` with ``shape`` under rule seeded-v1."""
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    z = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith(".weight") and len(shape) == 1:
        return 1 + 0.1 * z
    if name.endswith(".bias"):
        return 0.1 * z
    if name.endswith(".weight") and len(shape) >= 2:
        return z / math.sqrt(math.prod(shape[1:]))
    return 0.1 * z


def seeded_v1_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """seeded-v1 values for every floating entry of ``model.state_dict()`` (others kept), cast to
    each entry's dtype and device."""
    out = {}
    for name, t in model.state_dict().items():
        out[name] = seeded_v1(name, t.shape).to(device=t.device, dtype=t.dtype) if t.is_floating_point() else t
    return out


def load_seeded_v1(model: torch.nn.Module) -> torch.nn.Module:
    """Fill ``model`` with seeded-v1 weights in place (strict) and return it in eval mode."""
    model.load_state_dict(seeded_v1_state_dict(model), strict=True)
    return model.eval()
