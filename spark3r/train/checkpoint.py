"""Training checkpoints on disk: reading one to resume, and exporting the shipped file.

Two kinds of file resume a run:

* ``OUT/checkpoints/step_*.pt`` (full state, see :mod:`.loop`): continuation is bit-identical.
* A shipped ``.safetensors`` (:func:`export_shipped`): the model weights in float32 -- loadable
  by :func:`spark3r.models.load_pretrained` like any checkpoint -- plus the AdamW moments stored
  as bfloat16 under ``train_state.`` and the run's config and counters in the file metadata.
  Resuming from it continues the same schedule and data stream at the saved step with the same
  weights; only the optimizer moments carry bfloat16 rounding, so the continuation is close to,
  but not bitwise, what the full checkpoint would give. That keeps the shipped file at about
  2.5 x 4 bytes per parameter.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .loop import CHECKPOINT_FORMAT, TRAIN_STATE_PREFIX, latest_checkpoint

SHIPPED_FORMAT = "spark3r-shipped-v1"


def read_resume_payload(source) -> tuple[dict, Path]:
    """The training state in ``source`` (run folder, ``.pt`` checkpoint, shipped
    ``.safetensors`` or ``"builtin"``) as a :meth:`Trainer.load_state` payload, and its path."""
    if str(source) == "builtin":
        from spark3r.models.builtin import builtin_checkpoint_path

        source = builtin_checkpoint_path("vggt-nano")
    path = Path(source).expanduser()
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoints/step_*.pt under {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"resume source not found: {path}")
    if path.suffix == ".safetensors":
        return _payload_from_shipped(path), path
    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a spark3r training checkpoint (format {CHECKPOINT_FORMAT})")
    return payload, path


def export_shipped(payload: dict, path, extra_metadata: dict | None = None) -> Path:
    """Write the shipped ``.safetensors`` for a training ``payload`` (see the module docstring)."""
    from safetensors.torch import save_file

    names = payload["param_names"]
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in payload["model"].items()}
    opt_state = payload["optimizer"]["state"]
    adam_step = 0.0
    for i, name in enumerate(names):
        st = opt_state.get(i)
        if not st:
            continue
        tensors[f"{TRAIN_STATE_PREFIX}exp_avg.{name}"] = st["exp_avg"].to(torch.bfloat16).contiguous()
        tensors[f"{TRAIN_STATE_PREFIX}exp_avg_sq.{name}"] = st["exp_avg_sq"].to(torch.bfloat16).contiguous()
        adam_step = float(st["step"])
    metadata = {
        "format": SHIPPED_FORMAT,
        "preset": payload["preset"],
        "train_config": json.dumps(payload["train_config"]),
        "run_state": json.dumps(payload["run_state"]),
        "param_names": json.dumps(names),
        "adam_step": repr(adam_step),
    }
    for k, v in (extra_metadata or {}).items():
        metadata[k] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_shipped_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return dict(fh.metadata() or {})


def _payload_from_shipped(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != SHIPPED_FORMAT:
            raise ValueError(f"{path} carries no training state (metadata format {meta.get('format')!r}, "
                             f"expected {SHIPPED_FORMAT}); start a fresh run instead")
        model, moments = {}, {}
        for key in fh.keys():
            if key.startswith(TRAIN_STATE_PREFIX):
                kind, name = key[len(TRAIN_STATE_PREFIX):].split(".", 1)
                moments.setdefault(name, {})[kind] = fh.get_tensor(key).to(torch.float32)
            else:
                model[key] = fh.get_tensor(key)
    return {
        "format": SHIPPED_FORMAT,
        "preset": meta["preset"],
        "train_config": json.loads(meta["train_config"]),
        "run_state": json.loads(meta["run_state"]),
        "model": model,
        "param_names": json.loads(meta["param_names"]),
        "optimizer_moments": moments,
        "adam_step": float(meta["adam_step"]),
    }
