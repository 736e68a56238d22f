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


# Entries the rule leaves at their constructor default (golden README §1.1): π3's persistent
# ImageNet normalisation buffers.
KEPT_AT_DEFAULT = {
    "image_mean": (0.485, 0.456, 0.406),
    "image_std": (0.229, 0.224, 0.225),
}


def _default_value(name: str, shape) -> torch.Tensor:
    return torch.tensor(KEPT_AT_DEFAULT[name], dtype=torch.float32).reshape(tuple(shape))


def seeded_v1_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """seeded-v1 values for every floating entry of ``model.state_dict()`` (others kept), cast to
    each entry's dtype and device. A tensor listed under several names (tied modules, e.g. DA3's
    shared ``output_conv2_aux`` LayerNorm) takes its value from its first name under every name;
    the exceptions in ``KEPT_AT_DEFAULT`` keep their constructor defaults."""
    from .checkpoints import tied_state_dict_names

    aliases = tied_state_dict_names(model)
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            out[name] = t
        elif name in aliases:
            out[name] = out[aliases[name]]
        else:
            value = _default_value(name, t.shape) if name in KEPT_AT_DEFAULT else seeded_v1(name, t.shape)
            out[name] = value.to(device=t.device, dtype=t.dtype)
    return out


def load_seeded_v1(model: torch.nn.Module) -> torch.nn.Module:
    """Fill ``model`` with seeded-v1 weights in place (strict) and return it in eval mode."""
    model.load_state_dict(seeded_v1_state_dict(model), strict=True)
    return model.eval()
