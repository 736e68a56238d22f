"""Feed-forward 3-D reconstruction backbones (VGGT, π3, Depth-Anything-3) from shared layers.

Typical use::

    from spark3r.models import load_pretrained
    model = load_pretrained("vggt-1b")          # downloads facebook/VGGT-1B when online
    model = load_pretrained("da3-small")        # depth-anything/DA3-SMALL
    model = load_pretrained(None, "/data/DA3-LARGE-1.1")   # preset from config.json model_name

Presets: ``list_presets()`` (vggt-1b, vggt-tiny, vggt-nano, vggt-nano-speed3r, pi3, pi3-tiny, pi3-speed3r, pi3-speed3r-tiny,
da3-small/base/large/giant).

Every backbone implements the contract in :mod:`.base` (:class:`BackboneModel`; its ``decode``
gives :class:`BackboneOutputs`, one convention for all); a new one is added with
:func:`register_preset`.
"""
from .base import BackboneModel, BackboneOutputs
from .checkpoints import CheckpointMismatchError, CheckpointReadError, load_pretrained, load_weights
from .registry import build_model, list_presets, register_preset

__all__ = [
    "build_model",
    "load_weights",
    "load_pretrained",
    "list_presets",
    "register_preset",
    "BackboneModel",
    "BackboneOutputs",
    "CheckpointMismatchError",
    "CheckpointReadError",
]
