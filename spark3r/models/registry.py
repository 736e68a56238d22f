"""Model presets: name -> (backbone class, config dataclass) -> built model.

A new backbone is one module (a :class:`~spark3r.models.base.BackboneModel` subclass and its
config) plus one :func:`register_preset` call."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .base import BackboneModel
from .da3 import DA3Config, DepthAnything3
from .pi3 import Pi3, Pi3Config
from .pi3_speed3r import Pi3Speed3R, Pi3Speed3RConfig
from .vggt import VGGT, VGGTConfig
from .vggt_speed3r import VGGTSpeed3R, VGGTSpeed3RConfig

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

# vggt-nano-speed3r: vggt-nano whose global layers carry learned Speed3R gates (4x4 blocks, top-32),
# distilled from the built-in vggt-nano with `spark3r distill --preset vggt-nano-speed3r`.
_VGGT_NANO_SPEED3R = VGGTSpeed3RConfig(**{f.name: getattr(_VGGT_NANO, f.name) for f in dataclasses.fields(_VGGT_NANO)})

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

# pi3-speed3r-tiny is exactly the `speed3r_pi3_tiny` golden configuration (../shared/golden/speed3r):
# pi3-tiny's numbers without registers, 2 frame + 2 sparse global 384-d blocks, 4x4 windows, top-32.
_PI3_SPEED3R_TINY = Pi3Speed3RConfig(
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

# name -> (backbone class, config); filled by register_preset below.
_PRESETS: dict[str, tuple[type[BackboneModel], object]] = {}

# Where each preset's released weights live (None: no public checkpoint).
DEFAULT_SOURCES: dict[str, Optional[str]] = {}

# Checkpoints that name their architecture in config.json ("model_name": "da3-large", ...).
HF_MODEL_NAMES: dict[str, str] = {}

# Speed3R students distilled from a dense preset of the same architecture (spark3r distill):
# student preset -> teacher preset. Speed3R-π3 presets are their own teacher (accel.remove).
DENSE_TEACHER_PRESETS: dict[str, str] = {"vggt-nano-speed3r": "vggt-nano"}

# Network input width (pixels) each preset was trained at: 518 for the released models, the
# training width for vggt-nano. The mapper uses it when the user sets no image_width.
NATIVE_WIDTHS: dict[str, int] = {}


def register_preset(name: str, cls: type[BackboneModel], config, *, source: Optional[str] = None,
                    hf_model_name: Optional[str] = None, native_width: int = 518) -> None:
    """Make ``build_model(name)`` build ``cls(config, preset=name)``.

    ``cls``: a :class:`~spark3r.models.base.BackboneModel` subclass; ``config``: its frozen config
    dataclass. ``source``: where released weights live (hub id, or ``"builtin"`` for a checkpoint
    shipped in ``spark3r/models/builtin/``), for ``load_pretrained(name)``; ``hf_model_name``: the
    ``model_name`` a checkpoint's config.json uses for this architecture; ``native_width``: the
    input width in pixels (a multiple of 14, >= 28) the weights were trained at."""
    if not isinstance(native_width, int) or native_width < 28 or native_width % 14:
        raise ValueError(f"native_width must be an integer >= 28 and a multiple of 14, got {native_width!r}")
    if name in _PRESETS:
        raise ValueError(f"model preset {name!r} is already registered")
    if not (isinstance(cls, type) and issubclass(cls, BackboneModel)):
        raise TypeError(f"a preset's class must subclass spark3r.models.base.BackboneModel, got {cls!r}")
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"a preset's config must be a dataclass instance, got {type(config).__name__}")
    _PRESETS[name] = (cls, config)
    DEFAULT_SOURCES[name] = source
    NATIVE_WIDTHS[name] = native_width
    if hf_model_name is not None:
        HF_MODEL_NAMES[hf_model_name] = name


def unregister_preset(name: str) -> None:
    """Remove a preset added with :func:`register_preset` (tests, plugins that unload)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}")
    del _PRESETS[name]
    DEFAULT_SOURCES.pop(name, None)
    NATIVE_WIDTHS.pop(name, None)
    for hf_name in [k for k, v in HF_MODEL_NAMES.items() if v == name]:
        del HF_MODEL_NAMES[hf_name]


register_preset("vggt-1b", VGGT, VGGTConfig(), source="facebook/VGGT-1B")
register_preset("vggt-tiny", VGGT, _VGGT_TINY)
register_preset("vggt-nano", VGGT, _VGGT_NANO, source="builtin", native_width=140)
register_preset("vggt-nano-speed3r", VGGTSpeed3R, _VGGT_NANO_SPEED3R, hf_model_name="vggt-nano-speed3r", native_width=140)
register_preset("pi3", Pi3, Pi3Config(), source="yyfz233/Pi3")
register_preset("pi3-tiny", Pi3, _PI3_TINY)
register_preset("pi3-speed3r", Pi3Speed3R, Pi3Speed3RConfig(), source="weining17/Speed3R_Pi3")
register_preset("pi3-speed3r-tiny", Pi3Speed3R, _PI3_SPEED3R_TINY)
register_preset("da3-small", DepthAnything3, _DA3["da3-small"], source="depth-anything/DA3-SMALL", hf_model_name="da3-small")
register_preset("da3-base", DepthAnything3, _DA3["da3-base"], source="depth-anything/DA3-BASE", hf_model_name="da3-base")
register_preset("da3-large", DepthAnything3, _DA3["da3-large"], source="depth-anything/DA3-LARGE-1.1",
                hf_model_name="da3-large")
register_preset("da3-giant", DepthAnything3, _DA3["da3-giant"], source="depth-anything/DA3-GIANT-1.1",
                hf_model_name="da3-giant")


def preset_class(preset: str) -> type[BackboneModel]:
    """The backbone class of ``preset``."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; available: {', '.join(list_presets())}")
    return _PRESETS[preset][0]


def inference_overrides(preset: str, outputs: Optional[tuple[str, ...]] = None) -> dict:
    """Config overrides for inference-only use of ``preset``: modules that are never run are not
    built (the backbone's ``UNUSED_MODULES``). ``outputs`` (VGGT: subset of camera/depth/point)
    also drops the heads not listed, where the backbone supports that."""
    return preset_class(preset).inference_overrides(outputs)


def num_global_layers(preset: str) -> int:
    """Global-attention layers of ``preset`` (from a meta-device build: nothing is allocated)."""
    return build_model(preset, device="meta").num_global_layers


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


def build_model(preset: str, *, device=None, dtype: Optional[torch.dtype] = None, **overrides) -> BackboneModel:
    """Build ``preset`` with random-ish (constructor default) weights in eval mode.

    ``device="meta"`` allocates nothing (for FLOP counting, or ``load_weights`` which then assigns
    the checkpoint tensors). ``overrides`` replace config fields, e.g. ``enable_point=False``.
    """
    config = preset_config(preset, **overrides)
    cls = preset_class(preset)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.device(device if device is not None else "cpu"):
        model = cls(config, preset=preset)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
