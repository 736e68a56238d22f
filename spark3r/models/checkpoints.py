"""Loading weights: state dicts, .pt/.pth/.safetensors files, Hugging Face directories, hub ids.

Loading is strict by default: any missing, unexpected or wrong-shape entry raises
:class:`CheckpointMismatchError` listing all of them. Entries of heads that were switched off
when the model was built (``build_model(..., enable_point=False)``) are skipped, so an official
checkpoint still loads into a model without those heads.

Memory: tensors are read lazily (safetensors ``safe_open``; ``torch.load(mmap=True)``) and moved
into the model one at a time. A model built on the meta device receives the checkpoint tensors
themselves (``assign``), so at no point do two full fp32 copies of the weights exist.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from .builtin import BUILTIN, builtin_checkpoint_path
from .registry import DEFAULT_SOURCES, HF_MODEL_NAMES, build_model

# Entries under this prefix in a .safetensors file are a training run's optimizer state (a
# shipped checkpoint that `spark3r train --resume` can continue), not model weights.
TRAINING_STATE_PREFIX = "train_state."
_WEIGHT_FILES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")


class CheckpointMismatchError(ValueError):
    """The checkpoint's entries do not match the model's state dict."""

    def __init__(self, missing: list[str], unexpected: list[str], wrong_shape: list[tuple[str, tuple, tuple]],
                 summary: Optional[str] = None):
        self.missing = missing
        self.unexpected = unexpected
        self.wrong_shape = wrong_shape
        # A one-line diagnosis (e.g. "this is a vggt-tiny checkpoint") replaces the key lists in
        # the message; the lists stay available as attributes.
        self.summary = summary
        super().__init__(summary if summary is not None else self._message())

    def _message(self, limit: int = 10) -> str:
        def block(title: str, items: list[str]) -> str:
            shown = items[:limit]
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in shown) + more

        parts = ["checkpoint does not match the model state dict:"]
        if self.missing:
            parts.append(block("missing keys", self.missing))
        if self.unexpected:
            parts.append(block("unexpected keys", self.unexpected))
        if self.wrong_shape:
            parts.append(block("wrong shapes (key: checkpoint vs model)",
                               [f"{k}: {list(c)} vs {list(m)}" for k, c, m in self.wrong_shape]))
        return "\n".join(parts)


class CheckpointReadError(ValueError):
    """A checkpoint file or source could not be read."""


# ---------------------------------------------------------------------------------------------
# Sources -> lazy tensor tables {name: (shape, loader)}

_Table = dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]


def _table_from_mapping(sd: Mapping[str, torch.Tensor]) -> _Table:
    table: _Table = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointReadError(
                f"a state dict must map str names to tensors; entry {k!r} is a {type(v).__name__}"
            )
        table[k] = (tuple(v.shape), (lambda t=v: t))
    return table


def _unwrap(obj, origin: str) -> Mapping[str, torch.Tensor]:
    """Accept a plain state dict or the common ``{"model": sd}`` / ``{"state_dict": sd}`` wrappers."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise CheckpointReadError(f"{origin} does not contain a state dict (a mapping of names to tensors)")


def _table_from_safetensors(path: Path) -> _Table:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
        table: _Table = {}
        for k in keys:
            if k.startswith(TRAINING_STATE_PREFIX):
                continue
            table[k] = (tuple(handle.get_slice(k).get_shape()), (lambda k=k: handle.get_tensor(k)))
        return table
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointReadError(f"cannot read safetensors file {path}: {exc}") from exc


# The first bytes of a legacy (pre-1.6, non-zip) torch.save file: a pickle protocol 2+ opcode.
_PICKLE_PROTOCOL_OPCODE = 0x80


def _table_from_torch_file(path: Path) -> _Table:
    # torch's own errors for a file that is not a checkpoint at all ("re-save with zipfile
    # serialization", "invalid load key") send users the wrong way: look at the container first.
    if zipfile.is_zipfile(path):
        try:
            # mmap keeps the tensors file-backed; weights_only refuses arbitrary pickled code.
            obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise CheckpointReadError(f"cannot read torch checkpoint {path}: {exc}") from exc
    else:
        with open(path, "rb") as fh:
            head = fh.read(1)
        if not head or head[0] != _PICKLE_PROTOCOL_OPCODE:
            raise CheckpointReadError(
                f"cannot read {path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle): "
                "a truncated or corrupt download, or another file format? Expected a .pt/.pth written by "
                "torch.save, a .safetensors file or a Hugging Face model directory")
        try:  # legacy (non-zip) torch.save files cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointReadError(f"cannot read legacy torch checkpoint {path} (corrupt or truncated?): "
                                      f"{type(exc).__name__}: {exc}") from exc
    return _table_from_mapping(_unwrap(obj, str(path)))


def _table_from_file(path: Path) -> _Table:
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return _table_from_safetensors(path)
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return _table_from_torch_file(path)
    raise CheckpointReadError(f"unsupported checkpoint type {path.suffix!r} ({path}); expected .safetensors, .pt or .pth")


def _weights_in_directory(path: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointReadError(f"no weights in directory {path}: expected one of {', '.join(_WEIGHT_FILES)}")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a declared dependency
        raise CheckpointReadError("huggingface_hub is required to load hub ids") from exc
    try:
        return Path(hf_hub_download(repo_id, "model.safetensors"))
    except Exception as exc:
        raise CheckpointReadError(
            f"could not get 'model.safetensors' of Hugging Face repo {repo_id!r} ({type(exc).__name__}: {exc}). "
            f"Offline? On a machine with internet access run "
            f"`huggingface-cli download {repo_id} model.safetensors config.json --local-dir <dir>` "
            f"and pass that directory (or the file) as the source; files already in the Hugging Face "
            f"cache are used automatically."
        ) from exc


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _open_source(source) -> _Table:
    if isinstance(source, Mapping):
        return _table_from_mapping(_unwrap(source, "the given state dict"))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return _table_from_file(_weights_in_directory(path))
        if path.exists():
            return _table_from_file(path)
        if isinstance(source, str) and _looks_like_hub_id(source) and not path.suffix:
            return _table_from_file(_download_from_hub(source))
        raise CheckpointReadError(f"checkpoint source not found: {source} (not a file, directory or hub id 'org/name')")
    raise TypeError(f"source must be a state dict, a path or a hub id, got {type(source).__name__}")


# ---------------------------------------------------------------------------------------------
# Loading


def _check(model_shapes: dict[str, tuple], table: _Table, ignored_prefixes: tuple[str, ...]) -> list[str]:
    """Compare names and shapes; returns the checkpoint keys to skip (disabled heads)."""
    skipped = [k for k in table if k not in model_shapes and k.startswith(ignored_prefixes)] if ignored_prefixes else []
    skip = set(skipped)
    missing = [k for k in model_shapes if k not in table]
    unexpected = [k for k in table if k not in model_shapes and k not in skip]
    wrong = [(k, table[k][0], model_shapes[k]) for k in model_shapes if k in table and tuple(table[k][0]) != model_shapes[k]]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(missing, unexpected, wrong)
    return skipped


def tied_state_dict_names(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for state-dict entries that are the same tensor under several names
    (a module shared by several parents, e.g. DA3's ``output_conv2_aux`` LayerNorm). The
    canonical name is the first in state-dict order."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        key = id(tensor)
        if key in first and first[key] != name:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def _resolve_tied(table: _Table, aliases: dict[str, str]) -> _Table:
    """Let a tied tensor load from any one of its names: the first name present (canonical name
    first) provides the value; the other names are dropped from the table."""
    if not aliases:
        return table
    groups: dict[str, list[str]] = {}
    for alias, canonical in aliases.items():
        groups.setdefault(canonical, [canonical]).append(alias)
    table = dict(table)
    for canonical, names in groups.items():
        present = [n for n in names if n in table]
        if present:
            table[canonical] = table[present[0]]
        for n in names[1:]:
            table.pop(n, None)
    return table


def _named_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """state-dict name -> (owning module, attribute name, tensor), for parameters and persistent buffers."""
    out = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, param in mod.named_parameters(recurse=False):
            out[prefix + name] = (mod, name, param)
        for name, buf in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                out[prefix + name] = (mod, name, buf)
    return out


def load_weights(
    model: nn.Module,
    source,
    *,
    strict: bool = True,
    device=None,
    dtype: Optional[torch.dtype] = None,
    head_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Load ``source`` into ``model`` and return it (in eval mode).

    Args:
        source: a state dict, a ``.safetensors`` / ``.pt`` / ``.pth`` file, a directory with
            ``model.safetensors`` (Hugging Face layout, ``config.json`` optional) or a hub id
            such as ``"facebook/VGGT-1B"``.
        strict: raise :class:`CheckpointMismatchError` on any mismatch (default). With
            ``strict=False`` matching entries are loaded and the rest ignored; shape mismatches
            still raise.
        device / dtype: where and in which floating dtype the weights end up (default: the
            model's current device and dtype; meta models default to CPU).
        head_dtype: optional dtype for the prediction heads (state-dict prefixes ending in
            ``_head.``), e.g. ``dtype=torch.bfloat16, head_dtype=torch.float32`` mirrors the
            official mixed-precision inference (backbone under bf16 autocast, heads in fp32).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for label, value in (("dtype", dtype), ("head_dtype", head_dtype)):
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise TypeError(f"{label} must be a floating torch.dtype, got {value!r}")
    table = _resolve_tied(_open_source(source), tied_state_dict_names(model))
    targets = _named_tensors(model)
    model_shapes = {k: tuple(t.shape) for k, (_, _, t) in targets.items()}
    ignored = model.disabled_head_prefixes() if hasattr(model, "disabled_head_prefixes") else ()
    if strict:
        _check(model_shapes, table, ignored)
    else:
        present = {k: v for k, v in table.items() if k in model_shapes}
        wrong = [(k, present[k][0], model_shapes[k]) for k in present if tuple(present[k][0]) != model_shapes[k]]
        if wrong:
            raise CheckpointMismatchError([], [], wrong)
    target_device = torch.device(device) if device is not None else None
    with torch.no_grad():
        for name, (module, attr, current) in targets.items():
            # Entries absent from a non-strict source keep their values but follow device/dtype.
            loaded = table[name][1]() if name in table else current
            wanted = head_dtype if head_dtype is not None and _is_head_entry(model, name) else dtype
            if not loaded.is_floating_point():
                want_dtype = loaded.dtype
            elif wanted is not None:
                want_dtype = wanted
            else:
                want_dtype = current.dtype if current.is_floating_point() else loaded.dtype
            want_device = target_device or (torch.device("cpu") if current.is_meta else current.device)
            new = loaded.to(device=want_device, dtype=want_dtype)
            if new is current:
                continue
            if name in table and not current.is_meta and current.device == new.device and current.dtype == new.dtype:
                current.copy_(new)  # keep the model's own storage
            elif isinstance(current, nn.Parameter):
                # Take the (converted) checkpoint tensor itself: no second copy; meta models work.
                setattr(module, attr, nn.Parameter(new, requires_grad=current.requires_grad))
            else:
                setattr(module, attr, new)
            del loaded, new
    leftovers = [k for k, (_, _, t) in _named_tensors(model).items() if t.is_meta]
    if leftovers and strict and not (target_device is not None and target_device.type == "meta"):
        raise CheckpointReadError(f"{len(leftovers)} tensors are still on the meta device after loading: {leftovers[:5]}")
    # Tensors that are not in the state dict (e.g. non-persistent buffers) follow the weights.
    if target_device is not None:
        model.to(device=target_device)
    return model.eval()


def _is_head_entry(model: nn.Module, name: str) -> bool:
    """Prediction-head entries: the model's ``head_state_dict_prefixes()`` (DA3: its DPT head and
    camera decoder) or, by default, top-level modules named ``*_head`` (VGGT, π3)."""
    prefixes = getattr(model, "head_state_dict_prefixes", None)
    if callable(prefixes):
        return name.startswith(tuple(prefixes()))
    return name.split(".", 1)[0].endswith("_head")


def _read_hf_config(directory: Path) -> Optional[dict]:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointReadError(f"cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointReadError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


# π3 and Speed3R-π3 checkpoints (PyTorchModelHubMixin) store their constructor arguments, the same
# for both ({"decoder_size": "large", "pos_type": "rope100"}); the weights' names tell them apart.
_PI3_FAMILY_CONFIG = {"decoder_size": "large", "pos_type": "rope100"}


def _pi3_family_preset(directory: Path, cfg: dict) -> Optional[str]:
    if not any(key in cfg for key in _PI3_FAMILY_CONFIG):
        return None
    for key, supported in _PI3_FAMILY_CONFIG.items():
        if cfg.get(key, supported) != supported:
            raise CheckpointReadError(f"config.json {key}={cfg[key]!r}: only {key}={supported!r} π3 models have a preset")
    try:
        names = _table_from_file(_weights_in_directory(directory))
    except CheckpointReadError:
        return None  # a config without weights (e.g. only config.json fetched) declares nothing
    return "pi3-speed3r" if any(k.startswith("global_decoder.") for k in names) else "pi3"


def preset_from_hf_config(directory) -> Optional[str]:
    """The preset a Hugging Face checkpoint directory declares (DA3's ``config.json``
    ``model_name``, e.g. ``"da3-large"``; π3's ``decoder_size``/``pos_type``, with the weight
    names choosing between ``pi3`` and ``pi3-speed3r``), or None when it declares none. An
    unknown ``model_name`` is an error (not silently some other architecture)."""
    directory = Path(directory).expanduser()
    cfg = _read_hf_config(directory)
    name = (cfg or {}).get("model_name")
    if name is None:
        return _pi3_family_preset(directory, cfg) if cfg else None
    if name not in HF_MODEL_NAMES:
        raise CheckpointReadError(
            f"config.json model_name {name!r} has no spark3r preset; supported: {sorted(HF_MODEL_NAMES)}"
        )
    return HF_MODEL_NAMES[name]


def _declared_preset(source) -> Optional[str]:
    """The preset named by the config.json of a checkpoint directory or hub id (None otherwise)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return preset_from_hf_config(path)
    if isinstance(source, str) and _looks_like_hub_id(source) and not path.exists():
        published = [preset for preset, repo in DEFAULT_SOURCES.items() if repo == source]
        if published:
            return published[0]
        try:
            from huggingface_hub import hf_hub_download

            return preset_from_hf_config(Path(hf_hub_download(source, "config.json")).parent)
        except CheckpointReadError:
            raise
        except Exception as exc:
            raise CheckpointReadError(f"could not get config.json of Hugging Face repo {source!r} "
                                      f"({type(exc).__name__}: {exc}); pass the preset explicitly") from exc
    return None


def _check_hf_config(directory: Path, model: nn.Module) -> None:
    """If a Hugging Face ``config.json`` names architecture numbers or a DA3 ``model_name``,
    they must match the preset."""
    cfg = _read_hf_config(directory)
    if cfg is None or not hasattr(model, "config"):
        return
    declared = preset_from_hf_config(directory) if "model_name" in cfg else None
    preset = getattr(model, "preset", None)
    if declared is not None and preset is not None and declared != preset:
        raise CheckpointMismatchError([], [], [("config.json:model_name", (declared,), (preset,))])
    for key in ("embed_dim", "patch_size", "img_size"):
        if key in cfg and hasattr(model.config, key) and cfg[key] != getattr(model.config, key):
            raise CheckpointMismatchError(
                [], [], [(f"config.json:{key}", (cfg[key],), (getattr(model.config, key),))]
            )


# The checkpoint name of the deterministic synthetic weights (rule seeded-v1).
SEEDED = "seeded"


def load_pretrained(
    preset: Optional[str],
    source=None,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    head_dtype: Optional[torch.dtype] = None,
    **overrides,
) -> nn.Module:
    """Build ``preset`` on the meta device and load ``source`` (default: the preset's hub repo).

    ``preset=None`` takes the preset from the checkpoint directory's ``config.json`` (DA3's
    ``model_name``; π3's ``decoder_size``/``pos_type``, where the weights decide between ``pi3``
    and ``pi3-speed3r``) or from a published hub id; a declared ``model_name`` that contradicts
    ``preset`` is refused.

    ``source="builtin"`` loads the checkpoint shipped in the package (``spark3r/models/builtin/``;
    vggt-nano, trained here on procedural scenes).

    ``source="seeded"`` gives the deterministic seeded-v1 synthetic weights (tests, demos and
    benchmarks without real checkpoints; never meaningful geometry).

    Peak memory is one copy of the weights in ``dtype``. On CUDA use ``dtype=torch.bfloat16``
    (or float16), optionally with ``head_dtype=torch.float32`` like the official inference. ``overrides`` go to :func:`build_model`
    (e.g. ``enable_point=False``; that head's checkpoint entries are then skipped).
    """
    if preset is None:
        preset = _declared_preset(source)
        if preset is None:
            raise ValueError("preset=None needs a checkpoint directory or hub id whose config.json names the "
                             "model (DA3 'model_name', π3 'decoder_size'/'pos_type'); pass a preset otherwise")
    if source is None:
        source = DEFAULT_SOURCES.get(preset)
        if source is None:
            raise ValueError(f"preset {preset!r} has no published checkpoint; pass source=<file or state dict>")
    if isinstance(source, str) and source == BUILTIN:
        source = builtin_checkpoint_path(preset)
    if isinstance(source, str) and source == SEEDED:
        from .seeded import load_seeded_v1

        return load_seeded_v1(build_model(preset, **overrides)).to(device=device, dtype=dtype)
    model = build_model(preset, device="meta", **overrides)
    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir():
        _check_hf_config(Path(source).expanduser(), model)
    try:
        return load_weights(model, source, strict=True, device=device, dtype=dtype, head_dtype=head_dtype)
    except CheckpointMismatchError as exc:
        if exc.summary is not None:
            raise
        guess = guess_preset({name: shape for name, (shape, _) in _open_source(source).items()})
        if guess is None or guess[0] == preset:
            raise
        likely, share = guess
        shown = source if isinstance(source, (str, os.PathLike)) else "the state dict"
        raise CheckpointMismatchError(
            exc.missing, exc.unexpected, exc.wrong_shape,
            summary=f"checkpoint {shown} does not fit preset {preset!r}: its names and shapes are those of "
                    f"{likely!r} ({share:.0%} match). Wrong preset? --backbone {likely}") from None


def checkpoint_shapes(source) -> dict[str, tuple]:
    """Entry name -> shape of a checkpoint (file, directory, hub id or state dict; training-state
    entries of a shipped file left out), without reading the tensors."""
    return {name: tuple(shape) for name, (shape, _) in _open_source(source).items()}


# A checkpoint is named as a preset's when this share of the union of their entries agrees in
# name and shape (a fine-tune keeps every entry; another preset shares few or none).
_PRESET_MATCH = 0.9


def guess_preset(shapes: Mapping[str, tuple]) -> Optional[tuple[str, float]]:
    """The preset whose complete state dict agrees best with ``shapes`` (checkpoint entry name ->
    shape), with the share of entries that agree (name and shape, over the union of both), or
    None when no preset reaches 90 %. Builds each preset on the meta device (no memory)."""
    from .registry import list_presets

    best = None
    for candidate in list_presets():
        model_shapes = {k: tuple(t.shape) for k, (_, _, t) in _named_tensors(build_model(candidate, device="meta")).items()}
        agree = sum(1 for k, shape in shapes.items() if model_shapes.get(k) == tuple(shape))
        share = agree / max(len(set(shapes) | set(model_shapes)), 1)
        if best is None or share > best[1]:
            best = (candidate, share)
    return best if best is not None and best[1] >= _PRESET_MATCH else None
