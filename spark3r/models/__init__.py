"""Feed-forward 3-D reconstruction backbones (VGGT; π3 and DA3 to follow) from shared layers.

Typical use::

    from spark3r.models import load_pretrained
    model = load_pretrained("vggt-1b")          # downloads facebook/VGGT-1B when online
"""
from .checkpoints import CheckpointMismatchError, CheckpointReadError, load_pretrained, load_weights
from .registry import build_model, list_presets

__all__ = [
    "build_model",
    "load_weights",
    "load_pretrained",
    "list_presets",
    "CheckpointMismatchError",
    "CheckpointReadError",
]
