"""Token reduction for the global-attention layers of reconstruction transformers — attention
ops only.

Public API: :func:`apply` / :func:`remove`, the method registry (:data:`METHODS`: ``dense``,
``uniform``, ``spark3r``; :func:`register_method`), per-method config dataclasses, the op
contract (:class:`AttentionOp`, which prices itself with :class:`AttentionCost`) and
:mod:`.schedule` (layer-adaptive K/V budgets). Benchmarks, calibration and the FLOP model live in
:mod:`spark3r.bench`.
"""
from spark3r.models.layers.layout import GlobalAttentionOp, TokenLayout

from .apply import METHODS, AccelHandle, apply, build_op, make_config, register_method, remove
from .dense import DenseConfig
from .op import AttentionCost, AttentionOp, dense_cost, layer_cost
from .schedule import KVSchedule, default_schedule, load_schedule, save_schedule
from .spark3r import Spark3RConfig
from .uniform import UniformConfig

__all__ = [
    "METHODS", "AccelHandle", "apply", "remove", "build_op", "make_config", "register_method",
    "DenseConfig", "UniformConfig", "Spark3RConfig", "KVSchedule", "default_schedule", "load_schedule",
    "save_schedule", "TokenLayout", "GlobalAttentionOp", "AttentionOp", "AttentionCost", "dense_cost", "layer_cost",
]
