"""Model presets: name -> config dataclass -> ``nn.Module``."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from .da3 import DA3Config, DepthAnything3
from .pi3 import Pi3, Pi3Config
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

# vggt-nano: the VGGT architecture at 3.8 M parameters, trained here from scratch on procedural
# scenes (spark3r train) at 140 px wide inputs -- its position embedding is a 10x10 grid. Two
# 64-d heads everywhere, 4 encoder and 4 alternating-attention layers, 32-feature DPT depth head.
# No point head (the mapper decodes camera + depth; a depth map unprojected with the predicted
# camera is VGGT's preferred point cloud anyway) and no track head.
_VGGT_NANO = VGGTConfig(
    img_size=140,
    embed_dim=128,
    depth=4,
    num_heads=2,
    encoder_depth=4,
    encoder_num_heads=2,
    camera_trunk_depth=1,
    camera_num_heads=4,
    dpt_features=32,
    dpt_out_channels=(16, 32, 64, 64),
    dpt_layers=(0, 1, 2, 3),
    enable_point=False,
    enable_track=False,
)

# pi3-tiny is exactly the `pi3_tiny` golden configuration: ViT-S/14-reg encoder, a 4-block 384-d
# decoder, 2-block 256-d heads (camera head 128-d).
_PI3_TINY = Pi3Config(
    encoder_embed_dim=384,
    encoder_depth=12,
    encoder_num_heads=6,
    embed_dim=384,
    depth=4,
    num_heads=6,
    head_embed_dim=256,
    head_depth=2,
    head_num_heads=4,
    point_out_dim=256,
    camera_out_dim=128,
)

# Depth-Anything-3: the official yaml presets (configs/da3-*.yaml).
_DA3 = {
    "da3-small": DA3Config(embed_dim=384, depth=12, num_heads=6, out_layers=(5, 7, 9, 11), alt_start=4,
                           head_features=64, head_out_channels=(48, 96, 192, 384)),
    "da3-base": DA3Config(embed_dim=768, depth=12, num_heads=12, out_layers=(5, 7, 9, 11), alt_start=4,
                          head_features=128, head_out_channels=(96, 192, 384, 768)),
    "da3-large": DA3Config(embed_dim=1024, depth=24, num_heads=16, out_layers=(11, 15, 19, 23), alt_start=8,
                           head_features=256, head_out_channels=(256, 512, 1024, 1024)),
    "da3-giant": DA3Config(embed_dim=1536, depth=40, num_heads=24, out_layers=(19, 27, 33, 39), alt_start=13,
                           ffn="swiglu", head_features=256, head_out_channels=(256, 512, 1024, 1024),
                           enable_gs_head=True),
}

_PRESETS: dict[str, tuple[Callable[..., nn.Module], object]] = {
    "vggt-1b": (VGGT, VGGTConfig()),
    "vggt-tiny": (VGGT, _VGGT_TINY),
    "vggt-nano": (VGGT, _VGGT_NANO),
    "pi3": (Pi3, Pi3Config()),
    "pi3-tiny": (Pi3, _PI3_TINY),
    **{name: (DepthAnything3, cfg) for name, cfg in _DA3.items()},
}

# Where each preset's released weights live (None: no public checkpoint).
DEFAULT_SOURCES: dict[str, Optional[str]] = {
    "vggt-1b": "facebook/VGGT-1B",
    "vggt-tiny": None,
    "vggt-nano": "builtin",  # shipped inside the package (spark3r/models/builtin/)
    "pi3": "yyfz233/Pi3",
    "pi3-tiny": None,
    "da3-small": "depth-anything/DA3-SMALL",
    "da3-base": "depth-anything/DA3-BASE",
    "da3-large": "depth-anything/DA3-LARGE-1.1",
    "da3-giant": "depth-anything/DA3-GIANT-1.1",
}

# Network input width (pixels) each preset was trained at: the released models 518, vggt-nano
# its training width. The mapper uses it when the user sets no image_width.
NATIVE_WIDTHS: dict[str, int] = {
    "vggt-1b": 518,
    "vggt-tiny": 518,
    "vggt-nano": 140,
    "pi3": 518,
    "pi3-tiny": 518,
    **{name: 518 for name in _DA3},
}

# DA3 checkpoints name their architecture in config.json ("model_name": "da3-large", ...).
HF_MODEL_NAMES: dict[str, str] = {name: name for name in _DA3}

# Per family: config overrides that drop modules inference never runs (their checkpoint entries
# are then skipped when loading), and which outputs need which head switches (VGGT only).
_UNUSED_MODULES = {"vggt": {"enable_track": False}, "pi3": {}, "da3": {"enable_cam_enc": False, "enable_gs_head": False}}
_VGGT_HEAD_FLAGS = {"camera": "enable_camera", "depth": "enable_depth", "point": "enable_point"}


def model_family(preset: str) -> str:
    """``"vggt-1b"`` -> ``"vggt"``, ``"pi3-tiny"`` -> ``"pi3"``, ``"da3-small"`` -> ``"da3"``."""
    return str(preset).lower().split("-")[0]


def inference_overrides(preset: str, outputs: Optional[tuple[str, ...]] = None) -> dict:
    """Config overrides for inference-only use of ``preset``: modules that are never run are not
    built. ``outputs`` (VGGT: subset of camera/depth/point) also drops the heads not listed."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; available: {', '.join(list_presets())}")
    family = model_family(preset)
    overrides = dict(_UNUSED_MODULES.get(family, {}))
    if family == "vggt" and outputs is not None:
        overrides.update({flag: False for head, flag in _VGGT_HEAD_FLAGS.items() if head not in outputs})
    return overrides


def native_width(preset: str) -> int:
    """Input width (pixels, a multiple of 14) ``preset`` was trained at."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; available: {', '.join(list_presets())}")
    return NATIVE_WIDTHS[preset]


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
