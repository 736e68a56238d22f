"""FLOP model: global attention priced by the installed op itself (each op reports its matmuls
and overhead, :meth:`spark3r.accel.op.AttentionOp.attention_flops`; this module only sums them)
and whole-model counts from ``FlopCounterMode`` on a ``meta``-device twin.

Conventions (see :mod:`spark3r.accel.op`): a multiply-add is 2 FLOPs; attention counts the two
matmuls, exactly what ``torch.utils.flop_counter`` counts for SDPA.

Whole-model FLOPs: everything outside global attention is per frame except the camera head's
small cross-frame trunk, so ``model(S) - global_attention(S)`` is a quadratic in S; it is fitted
exactly from meta-device counts at S = 1, 2, 3 frames, which makes 1000-frame counts instant.
The multi-view stage alone is the backbone's ``aggregate`` (scope "aggregator").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch

from spark3r.accel.common import exact_attention
from spark3r.accel.op import attention_matmul_flops, layer_cost
from spark3r.models.layers.layout import TokenLayout


def dense_attention_flops(num_tokens: int, heads: int, head_dim: int, batch: int = 1) -> int:
    return attention_matmul_flops(num_tokens, num_tokens, heads, head_dim, batch)


@dataclass(frozen=True)
class Geometry:
    """What a model's global layers look like at one input size."""

    layouts: tuple[TokenLayout, ...]  # one per global layer
    heads: int
    head_dim: int
    batch: int = 1


def layer_flops(op: Any, layout: TokenLayout, heads: int, head_dim: int, batch: int = 1) -> dict:
    """``{"attention", "overhead", "total", "queries", "keys"}`` of one global layer, as the op
    reports them; ``op=None`` or an op that leaves this layer exact counts as dense."""
    cost = layer_cost(op, layout, heads, head_dim, batch)
    return {"attention": cost.attention, "overhead": cost.overhead, "total": cost.total,
            "queries": cost.queries, "keys": cost.keys}


def global_attention_flops(op: Any, geometry: Geometry) -> dict:
    """Sum over the global layers; also the per-layer totals."""
    per_layer = [layer_flops(op, lay, geometry.heads, geometry.head_dim, geometry.batch) for lay in geometry.layouts]
    return {
        "total": sum(p["total"] for p in per_layer),
        "attention": sum(p["attention"] for p in per_layer),
        "overhead": sum(p["overhead"] for p in per_layer),
        "per_layer": [p["total"] for p in per_layer],
    }


# ---------------------------------------------------------------------------------------------
# Model geometry and whole-model counts (meta device: nothing is allocated or computed)


class _Recorder:
    """A global op that records each layer's layout and head shape and computes dense attention."""

    def __init__(self) -> None:
        self.layouts: list[TokenLayout] = []
        self.shape: Optional[tuple[int, ...]] = None

    def __call__(self, q, k, v, layout, scale=None):
        self.layouts.append(layout)
        self.shape = tuple(q.shape)
        return exact_attention(q, k, v, scale)


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture on the meta device (via ``spark3r.models.build_model``)."""
    from spark3r.models import build_model

    preset = getattr(model, "preset", None)
    config = getattr(model, "config", None)
    if preset is None or config is None or not dataclasses.is_dataclass(config):
        raise TypeError("FLOP counting needs a spark3r backbone with .preset and a dataclass .config")
    overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return build_model(preset, device="meta", **overrides).requires_grad_(False)


def _count(meta_model: torch.nn.Module, frames: int, height: int, width: int, scope: str) -> tuple[int, Geometry]:
    from torch.utils.flop_counter import FlopCounterMode

    recorder = _Recorder()
    modules = meta_model.global_attention_modules()
    saved = [m.global_op for m in modules]
    for m in modules:
        m.global_op = recorder
    try:
        images = torch.empty(frames, 3, height, width, device="meta")
        with FlopCounterMode(display=False) as counter:
            if scope == "aggregator":
                p = meta_model.config.patch_size
                tokens = meta_model.encode_patches(images)
                meta_model.aggregate(tokens, (height // p, width // p))
            else:
                meta_model(images)
    finally:
        for m, op in zip(modules, saved):
            m.global_op = op
    b, h, _, d = recorder.shape
    return int(counter.get_total_flops()), Geometry(tuple(recorder.layouts), h, d, b)


@lru_cache(maxsize=32)
def _non_global_coefficients(key: tuple, height: int, width: int, scope: str) -> tuple[int, int, int]:
    meta_model = _TWINS[key]
    values = []
    for s in (1, 2, 3):
        total, geo = _count(meta_model, s, height, width, scope)
        values.append(total - global_attention_flops(None, geo)["total"])
    f1, f2, f3 = values
    c2 = (f3 - 2 * f2 + f1) // 2  # exact integer fit of a + b*S + c*S^2
    c1 = f2 - f1 - 3 * c2
    c0 = f1 - c1 - c2
    return c0, c1, c2


_TWINS: dict = {}


def _twin_key(model) -> tuple:
    key = (model.preset, tuple(sorted(dataclasses.asdict(model.config).items())))
    if key not in _TWINS:
        _TWINS[key] = meta_twin(model)
    return key


def model_geometry(model: torch.nn.Module, frames: int, height: int, width: int) -> Geometry:
    """Global-layer layouts and head shape of ``model`` for ``frames`` images of height x width
    (from a cheap 1-frame meta forward; layouts for ``frames`` are derived)."""
    key = _twin_key(model)
    _, geo1 = _count(_TWINS[key], 1, height, width, "aggregator")
    layouts = tuple(dataclasses.replace(lay, frames=frames) for lay in geo1.layouts)
    return Geometry(layouts, geo1.heads, geo1.head_dim, geo1.batch)


def model_flops(model: torch.nn.Module, method_op: Any, frames: int, height: int, width: int,
                scope: str = "model") -> dict:
    """Whole-scope FLOPs (``scope`` = "model" or "aggregator") for dense and for ``method_op``,
    with the global-attention part and the Amdahl bound if global attention were free."""
    if scope not in ("model", "aggregator"):
        raise ValueError(f"scope must be 'model' or 'aggregator' for model FLOPs, got {scope!r}")
    key = _twin_key(model)
    c0, c1, c2 = _non_global_coefficients(key, height, width, scope)
    non_global = c0 + c1 * frames + c2 * frames * frames
    geo = model_geometry(model, frames, height, width)
    dense_global = global_attention_flops(None, geo)
    method_global = global_attention_flops(method_op, geo)
    dense_total = non_global + dense_global["total"]
    method_total = non_global + method_global["total"]
    return {
        "scope": scope,
        "dense": dense_total,
        "method": method_total,
        "speedup": dense_total / method_total,
        "global_attention_dense": dense_global["total"],
        "global_attention_method": method_global["total"],
        "global_attention_overhead": method_global["overhead"],
        "global_attention_speedup": dense_global["total"] / method_global["total"],
        "global_attention_share": dense_global["total"] / dense_total,
        "amdahl_bound": dense_total / non_global,
        "per_layer_method": method_global["per_layer"],
    }
