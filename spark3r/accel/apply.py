"""Method registry and applying a method to a built model in one call.

    handle = spark3r.accel.apply(model, "spark3r", query_keep=2, schedule="my_schedule.json")
    ...
    spark3r.accel.remove(model)        # back to exact dense attention

A model qualifies when it has ``global_attention_modules()`` returning its global-attention
modules in layer order, each with a ``global_op`` attribute (``None`` = dense SDPA).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .dense import DenseConfig, DenseOp
from .op import AttentionOp
from .schedule import resolve_schedule
from .spark3r import Spark3RConfig, Spark3ROp
from .uniform import UniformConfig, UniformOp


@dataclass(frozen=True)
class MethodSpec:
    config_cls: type
    # (config, num_layers, backbone preset) -> an AttentionOp (spark3r.accel.op)
    make_op: Callable[[Any, int, Optional[str]], AttentionOp]


def _make_spark3r(config: Spark3RConfig, num_layers: int, backbone: Optional[str]) -> Spark3ROp:
    return Spark3ROp(config, resolve_schedule(config.schedule, backbone, num_layers))


METHODS: dict[str, MethodSpec] = {
    "dense": MethodSpec(DenseConfig, lambda c, n, b: DenseOp(c)),
    "uniform": MethodSpec(UniformConfig, lambda c, n, b: UniformOp(c)),
    "spark3r": MethodSpec(Spark3RConfig, _make_spark3r),
}


def register_method(name: str, config_cls: type, make_op: Callable[[Any, int, Optional[str]], Any]) -> None:
    """Add a method (e.g. ``speed3r``) to the registry: its config dataclass (fields = its
    parameters) and ``make_op(config, num_layers, backbone) -> AttentionOp``."""
    if name in METHODS:
        raise ValueError(f"reduction method {name!r} is already registered")
    METHODS[name] = MethodSpec(config_cls, make_op)


def make_config(method: str, **params):
    """The method's config dataclass from keyword parameters, with clear errors."""
    if method not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}; known: {sorted(METHODS)}")
    cls = METHODS[method].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - names
    if unknown:
        raise TypeError(f"method {method!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(names) or 'none'}")
    return cls(**params)


def build_op(method: str, num_layers: int, backbone: Optional[str] = None, **params) -> AttentionOp:
    """The op object for a method without a model (op-level benchmarks, calibration)."""
    config = make_config(method, **params)
    op = METHODS[method].make_op(config, num_layers, backbone)
    if not isinstance(op, AttentionOp):
        raise TypeError(f"method {method!r} built a {type(op).__name__}, which is not an AttentionOp "
                        f"(config, is_identity, attention_flops and __call__ are needed; see spark3r.accel.op)")
    return op


@dataclass
class AccelHandle:
    """What :func:`apply` did: the method, its op and which layers got it."""

    method: str
    op: Any
    reduced_layers: tuple[int, ...]

    @property
    def config(self):
        return self.op.config


def global_modules(model) -> list:
    if not hasattr(model, "global_attention_modules"):
        raise TypeError(f"{type(model).__name__} has no global_attention_modules(); token reduction needs a "
                        f"spark3r backbone (spark3r.models.build_model)")
    modules = list(model.global_attention_modules())
    if not modules or not all(hasattr(m, "global_op") for m in modules):
        raise TypeError("global_attention_modules() must return the attention modules (each with a global_op attribute)")
    return modules


def apply(model, method: str, **params) -> AccelHandle:
    """Install ``method`` on every global-attention layer of ``model`` (replacing any previous one).

    Layers on which the method would compute exact attention keep ``global_op = None`` — untouched.
    Returns an :class:`AccelHandle` (also stored as ``model.accel_handle``)."""
    modules = global_modules(model)
    op = build_op(method, len(modules), getattr(model, "preset", None), **params)
    reduced = []
    for layer, module in enumerate(modules):
        if op.is_identity(layer):
            module.global_op = None
        else:
            module.global_op = op
            reduced.append(layer)
    handle = AccelHandle(method, op, tuple(reduced))
    model.accel_handle = handle
    return handle


def remove(model) -> None:
    """Restore exact dense attention on every global layer."""
    for module in global_modules(model):
        module.global_op = None
    model.accel_handle = None
