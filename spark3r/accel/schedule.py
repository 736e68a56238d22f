"""Layer-adaptive key/value budgets for Spark3R: the schedule format, the default profile (sized
by the backbone's own global-layer count) and JSON load/save.

A schedule says, for every global-attention layer, what fraction of each non-reference frame's
patch tokens stays as keys/values (``kv_keep``). The budget shrinks when a window has more frames
than ``reference_frames`` — more views of one scene are more redundant, so the *total* K/V pool
grows only like ``frames ** (1 - decay)``, never below ``min_per_frame`` keys per view:

    budget(layer, S) = clamp(round(P * kv_keep[layer] * min(1, (reference_frames / S) ** decay)),
                             min_per_frame, P)                       (P = patch tokens per frame)

``kv_keep[layer] >= 1`` means the layer's keys/values are not pruned at all (no decay applies).
Special tokens of every frame and all tokens of the reference frame are always kept on top of
the budget; each pruned frame also gets one compensation token (see ``spark3r.py``).

File format (JSON, ``"format": "spark3r-schedule/1"``): the fields of :class:`KVSchedule`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

FORMAT = "spark3r-schedule/1"


@dataclass(frozen=True)
class KVSchedule:
    kv_keep: tuple[float, ...]
    reference_frames: int = 16
    decay: float = 0.5
    min_per_frame: int = 8
    backbone: Optional[str] = None
    note: str = ""
    # Free-form provenance (e.g. what `spark3r calibrate` measured); round-trips unchanged.
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        keep = tuple(float(x) for x in self.kv_keep)
        object.__setattr__(self, "kv_keep", keep)
        if not keep:
            raise ValueError("kv_keep must list one keep fraction per global-attention layer, got an empty list")
        bad = [x for x in keep if not (math.isfinite(x) and 0.0 < x)]
        if bad:
            raise ValueError(f"kv_keep entries must be finite fractions > 0 (>= 1 = no pruning), got {bad}")
        if int(self.reference_frames) < 1:
            raise ValueError(f"reference_frames must be >= 1, got {self.reference_frames}")
        if not (0.0 <= float(self.decay) <= 1.0):
            raise ValueError(f"decay must be in [0, 1] (0 = per-frame budget independent of the frame count, "
                             f"1 = constant total budget), got {self.decay}")
        if int(self.min_per_frame) < 1:
            raise ValueError(f"min_per_frame must be >= 1 so every view keeps some keys, got {self.min_per_frame}")

    @property
    def num_layers(self) -> int:
        return len(self.kv_keep)

    def prunes(self, layer: int) -> bool:
        """Whether the layer's keys/values are pruned at all."""
        return self._keep(layer) < 1.0

    def kv_budget(self, layer: int, frames: int, patches_per_frame: int) -> int:
        """Patch tokens kept as keys/values per non-reference frame at this layer."""
        keep = self._keep(layer)
        if keep >= 1.0:
            return patches_per_frame
        shrink = min(1.0, (self.reference_frames / frames) ** self.decay) if frames > 0 else 1.0
        budget = round(patches_per_frame * keep * shrink)
        return int(min(patches_per_frame, max(self.min_per_frame, budget)))

    def _keep(self, layer: int) -> float:
        if not 0 <= layer < len(self.kv_keep):
            raise ValueError(f"the schedule has {len(self.kv_keep)} layers; layer {layer} is outside it "
                             f"(does the schedule belong to this backbone?)")
        return self.kv_keep[layer]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_keep"] = list(self.kv_keep)
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "KVSchedule":
        if not isinstance(d, dict):
            raise TypeError(f"a schedule must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown schedule format {d.get('format')!r}; expected {FORMAT!r}")
        fields = {k: v for k, v in d.items() if k != "format"}
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown schedule fields {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        if "kv_keep" not in fields:
            raise ValueError("schedule has no 'kv_keep' list")
        fields["kv_keep"] = tuple(fields["kv_keep"])
        return cls(**fields)


def _write_json_file(payload: dict, path: Union[str, Path]) -> Path:
    from spark3r.data import strict_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json.dumps(payload, indent=1) + "\n")
    return path


def _read_json_file(path: Union[str, Path], what: str, parse):
    """``parse(dict)`` of the JSON file at ``path``; every failure names the file (``what`` says
    which kind of file it should have been)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path} is not a text (UTF-8 JSON) file; write one with "
                         "`spark3r calibrate --out FILE`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
    try:
        return parse(data)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what} file {path}: {e}") from None


def save_schedule(schedule: KVSchedule, path: Union[str, Path]) -> Path:
    return _write_json_file(schedule.to_dict(), path)


def load_schedule(path: Union[str, Path]) -> KVSchedule:
    return _read_json_file(path, "schedule", KVSchedule.from_dict)


# Default per-layer keep fractions, as a profile over the relative depth t = layer / (L - 1).
# Rationale (AVGGT, RegimeVGGT analyses of VGGT/pi3; our calibrate command measures it per model):
#  * early global layers mostly attend within their own view and to coarse scene context, so a
#    small K/V set suffices;
#  * the middle layers establish cross-view correspondence — they get the largest budget;
#  * the last layers refine locally and again tolerate pruning, a little less than the first ones
#    because their errors reach the heads directly.
_PROFILE = ((0.0, 0.045), (0.2, 0.08), (0.35, 0.19), (0.6, 0.19), (0.75, 0.1), (1.0, 0.08))


def profile_keep(num_layers: int, profile: Sequence[tuple[float, float]] = _PROFILE) -> tuple[float, ...]:
    """Piecewise-linear keep fractions over relative layer depth."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out = []
    for i in range(num_layers):
        t = i / (num_layers - 1) if num_layers > 1 else 0.5
        for (t0, k0), (t1, k1) in zip(profile, profile[1:]):
            if t0 <= t <= t1:
                out.append(round(k0 + (k1 - k0) * (t - t0) / (t1 - t0), 4))
                break
    return tuple(out)


def _known_preset(backbone: Optional[str]) -> bool:
    from spark3r.models import list_presets

    return backbone is not None and backbone in list_presets()


def default_schedule(backbone: Optional[str] = None, num_layers: Optional[int] = None) -> KVSchedule:
    """The shipped default for a backbone preset (its global-layer count comes from the model
    itself), or for any layer count, from the same profile."""
    if num_layers is None:
        if not _known_preset(backbone):
            from spark3r.models import list_presets

            raise ValueError(f"no default schedule for backbone {backbone!r}; known: {list_presets()} "
                             f"(or pass num_layers)")
        from spark3r.models.registry import num_global_layers

        num_layers = num_global_layers(backbone)
    return KVSchedule(
        kv_keep=profile_keep(num_layers), reference_frames=16, decay=0.5, min_per_frame=8, backbone=backbone,
        note="default profile: small early budget, largest in the middle (cross-view alignment), moderate at the end",
    )


def resolve_schedule(schedule, backbone: Optional[str], num_layers: int) -> KVSchedule:
    """A KVSchedule from None (default for the backbone), a path, a dict or a KVSchedule; checks
    that it covers ``num_layers`` global layers."""
    if schedule is None or schedule == "" or schedule == "default":
        sched = default_schedule(backbone if _known_preset(backbone) else None, num_layers)
    elif isinstance(schedule, KVSchedule):
        sched = schedule
    elif isinstance(schedule, dict):
        sched = KVSchedule.from_dict(schedule)
    elif isinstance(schedule, (str, Path)):
        sched = load_schedule(schedule)
    else:
        raise TypeError(f"schedule must be None, a path, a dict or a KVSchedule, got {type(schedule).__name__}")
    if sched.num_layers != num_layers:
        raise ValueError(f"schedule has {sched.num_layers} layers but the model has {num_layers} global-attention layers")
    return sched


# ---------------------------------------------------------------------------------------------
# Two-tier layer schedule of the paper's recipe (``recipe="paper"``)

TIERS_FORMAT = "spark3r-layer-tiers/1"

# High-sensitivity global layers as the paper note reports them (taken as 0-based global-layer
# indices); the other layers are low-sensitivity and get ``low_sensitivity_factor`` x the K/V
# factor. Only backbones whose global-layer numbering is unambiguous are listed; the rest are
# derived from VGGT's list by relative depth (:func:`default_tiers`) until `spark3r calibrate
# --recipe paper` measures them.
PUBLISHED_HIGH_SENSITIVITY = {"vggt-1b": tuple(range(11, 17)), "pi3": tuple(range(11, 17))}
_VGGT_LAYERS = 24


@dataclass(frozen=True)
class LayerTiers:
    """Which global layers are high-sensitivity (kept at the base K/V factor); all others are
    low-sensitivity. File format: JSON ``"format": "spark3r-layer-tiers/1"`` with these fields."""

    high_sensitivity: tuple[int, ...]
    num_layers: int
    backbone: Optional[str] = None
    note: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if int(self.num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        high = tuple(sorted(set(int(x) for x in self.high_sensitivity)))
        bad = [x for x in high if not 0 <= x < self.num_layers]
        if bad:
            raise ValueError(f"high_sensitivity layers {bad} are outside 0..{self.num_layers - 1}")
        object.__setattr__(self, "high_sensitivity", high)

    def is_low_sensitivity(self, layer: int) -> bool:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"the layer tiers cover {self.num_layers} layers; layer {layer} is outside them "
                             f"(do they belong to this backbone?)")
        return layer not in self.high_sensitivity

    def to_dict(self) -> dict:
        d = asdict(self)
        d["high_sensitivity"] = list(self.high_sensitivity)
        return {"format": TIERS_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerTiers":
        if not isinstance(d, dict):
            raise TypeError(f"layer tiers must be a JSON object, got {type(d).__name__}")
        if d.get("format") != TIERS_FORMAT:
            hint = " (that is a K/V schedule of the product recipe; recipe 'paper' needs layer tiers from " \
                   "`spark3r calibrate --recipe paper`)" if d.get("format") == FORMAT else ""
            raise ValueError(f"unknown layer-tiers format {d.get('format')!r}; expected {TIERS_FORMAT!r}{hint}")
        fields = {k: v for k, v in d.items() if k != "format"}
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown layer-tiers fields {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        fields["high_sensitivity"] = tuple(fields.get("high_sensitivity", ()))
        return cls(**fields)


def save_tiers(tiers: LayerTiers, path: Union[str, Path]) -> Path:
    return _write_json_file(tiers.to_dict(), path)


def load_tiers(path: Union[str, Path]) -> LayerTiers:
    return _read_json_file(path, "layer-tiers", LayerTiers.from_dict)


def default_tiers(backbone: Optional[str], num_layers: int) -> LayerTiers:
    """The published high-sensitivity layers for vggt-1b and pi3; for any other backbone the
    layers at the same relative depth as VGGT's 11..16 of 24."""
    published = PUBLISHED_HIGH_SENSITIVITY.get(backbone or "")
    if published is not None and max(published) < num_layers:
        return LayerTiers(published, num_layers, backbone, note="published high-sensitivity layers (paper note)")
    lo, hi = min(PUBLISHED_HIGH_SENSITIVITY["vggt-1b"]), max(PUBLISHED_HIGH_SENSITIVITY["vggt-1b"])
    scale = (_VGGT_LAYERS - 1) / (num_layers - 1) if num_layers > 1 else 0.0
    high = tuple(i for i in range(num_layers) if lo <= round(i * scale) <= hi)
    return LayerTiers(high, num_layers, backbone,
                      note=f"VGGT's high-sensitivity layers {lo}..{hi} of {_VGGT_LAYERS} mapped by relative depth")


def resolve_tiers(tiers, backbone: Optional[str], num_layers: int) -> LayerTiers:
    """LayerTiers from None (default for the backbone), a path, a dict or a LayerTiers; checks
    that they cover ``num_layers`` global layers."""
    if tiers is None or tiers == "" or tiers == "default":
        out = default_tiers(backbone, num_layers)
    elif isinstance(tiers, LayerTiers):
        out = tiers
    elif isinstance(tiers, dict):
        out = LayerTiers.from_dict(tiers)
    elif isinstance(tiers, (str, Path)):
        out = load_tiers(tiers)
    else:
        raise TypeError(f"the paper recipe's schedule must be None, a path, a dict or LayerTiers, got {type(tiers).__name__}")
    if out.num_layers != num_layers:
        raise ValueError(f"layer tiers cover {out.num_layers} layers but the model has {num_layers} global-attention layers")
    return out
