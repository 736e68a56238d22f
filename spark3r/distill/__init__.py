"""Distillation of Speed3R's learned sparse global attention from the dense model (``spark3r distill``)."""
from .loss import distill_loss
from .trainer import DistillConfig, distill

__all__ = ["DistillConfig", "distill", "distill_loss"]
