"""Token reduction for the global-attention layers of reconstruction transformers.

Public API: :func:`apply` / :func:`remove`, the method registry (:data:`METHODS`: ``dense``,
``uniform``, ``spark3r``), per-method config dataclasses, :mod:`.schedule` (layer-adaptive K/V
budgets), :mod:`.flops` (closed-form FLOP model), :mod:`.bench` and :mod:`.calibrate`.
"""
from .apply import METHODS, AccelHandle, apply, build_op, make_config, register_method, remove
from .dense import DenseConfig
from spark3r.models.layers.layout import GlobalAttentionOp, TokenLayout
from .schedule import KVSchedule, default_schedule, load_schedule, save_schedule
from .spark3r import Spark3RConfig
from .uniform import UniformConfig

__all__ = [
    "METHODS", "AccelHandle", "apply", "remove", "build_op", "make_config", "register_method",
    "DenseConfig", "UniformConfig", "Spark3RConfig", "KVSchedule", "default_schedule", "load_schedule",
    "save_schedule", "TokenLayout", "GlobalAttentionOp",
]
