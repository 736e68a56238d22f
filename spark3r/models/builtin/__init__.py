"""Checkpoints shipped inside the package (installed as package data).

``load_pretrained(preset, "builtin")`` (or ``checkpoint: builtin`` in a mapper config) loads
``<preset>.safetensors`` from this folder; its model card is ``<preset>.md`` next to it.
"""
from __future__ import annotations

from pathlib import Path

BUILTIN = "builtin"
_HERE = Path(__file__).resolve().parent


def builtin_presets() -> list[str]:
    """Presets that have a checkpoint in this folder."""
    return sorted(p.stem for p in _HERE.glob("*.safetensors"))


def builtin_checkpoint_path(preset: str) -> Path:
    """The shipped checkpoint of ``preset``; FileNotFoundError naming the presets that have one."""
    path = _HERE / f"{preset}.safetensors"
    if not path.is_file():
        have = ", ".join(builtin_presets()) or "none"
        raise FileNotFoundError(f"no built-in checkpoint for preset {preset!r} (built-in: {have})")
    return path
