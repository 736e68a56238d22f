"""Model presets: name -> config dataclass -> ``nn.Module``."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from .vggt import VGGT, VGGTConfig

# vggt-tiny is exactly the `vggt_tiny` golden configuration (../shared/golden): a ViT-S/14
# encoder, a 4-layer 384-d aggregator, a 1-block camera trunk and 32-feature DPT heads.
_VGGT_TINY = VGGTConfig(
    embed_dim=384,
    depth=4,
    num_heads=6,
    encoder_depth=12,
    encoder_num_heads=6,
    camera_trunk_depth=1,
    camera_num_heads=6,
    dpt_features=32,
    dpt_out_channels=(16, 32, 64, 64),
    dpt_layers=(0, 1, 2, 3),
    enable_track=False,
)

_PRESETS: dict[str, tuple[Callable[..., nn.Module], object]] = {
    "vggt-1b": (VGGT, VGGTConfig()),
    "vggt-tiny": (VGGT, _VGGT_TINY),
}

# Where each preset's released weights live (None: no public checkpoint).
DEFAULT_SOURCES: dict[str, Optional[str]] = {
    "vggt-1b": "facebook/VGGT-1B",
    "vggt-tiny": None,
}


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def preset_config(preset: str, **overrides):
    """The config dataclass of ``preset`` with ``overrides`` (field names of the dataclass)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; available: {', '.join(list_presets())}")
    _, config = _PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown config field(s) {sorted(unknown)} for preset {preset!r}; valid: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def build_model(preset: str, *, device=None, dtype: Optional[torch.dtype] = None, **overrides) -> nn.Module:
    """Build ``preset`` with random-ish (constructor default) weights in eval mode.

    ``device="meta"`` allocates nothing (for FLOP counting, or ``load_weights`` which then assigns
    the checkpoint tensors). ``overrides`` replace config fields, e.g. ``enable_point=False``.
    """
    cls, _ = _PRESETS.get(preset, (None, None))
    config = preset_config(preset, **overrides)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.device(device if device is not None else "cpu"):
        model = cls(config, preset=preset)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
