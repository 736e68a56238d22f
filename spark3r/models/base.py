"""The backbone contract: what every reconstruction model in ``spark3r.models`` implements and
what everyone else (``spark3r.accel``, ``spark3r.bench``, the mapper) is allowed to ask of it.

A backbone is a :class:`BackboneModel` subclass built from a frozen config dataclass
(``cls(config, preset=name)``) and registered with
:func:`spark3r.models.registry.register_preset`. That is all a new backbone needs.

What a subclass provides:

* ``HEAD_NAMES`` (and optionally ``HEAD_ALIASES``): the heads ``forward(heads=...)`` accepts.
* ``UNUSED_MODULES``: config overrides that drop modules inference never runs (their checkpoint
  entries are then skipped when loading); :meth:`inference_overrides` may add per-output ones.
* :meth:`encode_patches` — per-frame tokens, cacheable (frames are encoded independently);
  :meth:`patch_token_shape` says what it returns for a batch.
* :meth:`aggregate` — the multi-view stage alone (patch tokens -> layer outputs); the FLOP model
  and the bench time and count exactly this.
* :meth:`global_attention_modules` — the attention modules whose ``global_op`` hook a
  token-reduction op may take over, in layer order (each builds a
  :class:`~spark3r.models.layers.layout.TokenLayout` with ``layer``/``num_layers``).
* :meth:`decode` — its own outputs -> :class:`BackboneOutputs`, the one convention used
  downstream (mapper, bench fidelity, calibration; ``spark3r eval`` reads what the mapper wrote).
* ``forward(images, *, patch_tokens=None, heads=None)``, which starts with :meth:`prologue`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional

import torch
from torch import nn

from .camera import invert_rigid
from .images import batched_images


@dataclass(frozen=True)
class BackboneOutputs:
    """A backbone's predictions in the one convention everything downstream uses.

    All tensors are batched ``[B, S, ...]`` on the model's device; a field is None when the heads
    that produce it were not run.

    * ``c2w`` ``[B, S, 4, 4]`` float64: camera-to-world, OpenCV camera axes (x right, y down,
      z forward). The world frame is the model's own (a reference view's camera, or arbitrary
      per call for reference-free models).
    * ``intrinsics`` ``[B, S, 3, 3]`` float64: pinhole matrix in network-input pixels.
    * ``depth`` ``[B, S, H, W]`` float32: z-depth in the network input's pixel grid.
    * ``conf`` ``[B, S, H, W]`` float32: depth confidence on one scale for every backbone
      (``>= 1``, larger = more certain), so one ``conf_min`` means the same everywhere.
    * ``points`` ``[B, S, H, W, 3]``: world points where the model predicts them directly.
    """

    c2w: Optional[torch.Tensor] = None
    intrinsics: Optional[torch.Tensor] = None
    depth: Optional[torch.Tensor] = None
    conf: Optional[torch.Tensor] = None
    points: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ForwardInputs:
    """What :meth:`BackboneModel.prologue` hands to the rest of a ``forward``."""

    images: torch.Tensor          # [B, S, 3, H, W] in [0, 1]
    grid: tuple[int, int]         # patch rows, cols
    heads: set[str]               # heads to run (aliases resolved)
    patch_tokens: torch.Tensor    # encoded or checked and cast to the weight dtype


def camera_to_world(world_to_camera: torch.Tensor) -> torch.Tensor:
    """Rigid ``[..., 3, 4]`` / ``[..., 4, 4]`` world-to-camera -> ``[..., 4, 4]`` camera-to-world."""
    return invert_rigid(world_to_camera)


class BackboneModel(nn.Module):
    """Base class of every backbone (see the module docstring for the contract)."""

    HEAD_NAMES: ClassVar[tuple[str, ...]] = ()
    # Request names that stand for several heads (pi3: "depth" -> its point and conf heads).
    HEAD_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Config overrides that drop modules inference never runs.
    UNUSED_MODULES: ClassVar[dict[str, Any]] = {}

    config: Any
    preset: Optional[str]

    # -- what every backbone implements -----------------------------------------------------

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Per-frame tokens for images ``[S, 3, H, W]`` / ``[B, S, 3, H, W]`` in [0, 1];
        ``forward(images, patch_tokens=...)`` with them equals recomputing."""
        raise NotImplementedError

    def patch_token_shape(self, batch: int, frames: int, grid: tuple[int, int]) -> tuple[int, ...]:
        """The shape :meth:`encode_patches` returns for ``batch`` x ``frames`` images of ``grid``."""
        raise NotImplementedError

    def aggregate(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> list[Optional[torch.Tensor]]:
        """The multi-view stage: patch tokens -> per-layer outputs (None where not kept)."""
        raise NotImplementedError

    def global_attention_modules(self) -> list[nn.Module]:
        """The attention module of every global (multi-view) layer, in layer order."""
        raise NotImplementedError

    def forward_prepared(self, inputs: ForwardInputs, **options) -> dict[str, torch.Tensor]:
        """Everything after :meth:`prologue`: the multi-view stage and the requested heads. Returns
        the backbone's own output dict (documented there, in the model's official names)."""
        raise NotImplementedError

    def decode(self, outputs: dict, image_hw: tuple[int, int]) -> BackboneOutputs:
        """This model's ``forward`` outputs for network images of ``image_hw`` -> the convention."""
        raise NotImplementedError

    def weight_dtype(self) -> torch.dtype:
        """The dtype patch tokens are cast to before the multi-view stage."""
        return next(self.parameters()).dtype

    def enabled_heads(self) -> set[str]:
        """Heads this instance has (some may have been switched off when it was built)."""
        return set(self.HEAD_NAMES)

    def disabled_head_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of modules not built in this instance (ignored when loading)."""
        return ()

    @classmethod
    def inference_overrides(cls, outputs: Optional[Iterable[str]] = None) -> dict:
        """Config overrides for inference-only use: modules that are never run are not built.
        ``outputs`` may name the heads that will be used (a backbone may then drop others)."""
        return dict(cls.UNUSED_MODULES)

    # -- shared by every backbone -------------------------------------------------------------

    @property
    def num_global_layers(self) -> int:
        return len(self.global_attention_modules())

    def requested_heads(self, heads: Optional[Iterable[str]]) -> set[str]:
        """``forward``'s ``heads=`` argument -> the set of heads to run (clear errors for names
        that do not exist or heads switched off when the model was built)."""
        enabled = self.enabled_heads()
        if heads is None:
            return enabled
        if isinstance(heads, str):
            heads = (heads,)
        wanted: set[str] = set()
        for name in heads:
            wanted.update(self.HEAD_ALIASES.get(name, (name,)))
        unknown = wanted - set(self.HEAD_NAMES)
        if unknown:
            aliases = f" (or {', '.join(repr(a) for a in self.HEAD_ALIASES)})" if self.HEAD_ALIASES else ""
            raise ValueError(f"unknown heads {sorted(unknown)}; choose from {self.HEAD_NAMES}{aliases}")
        missing = wanted - enabled
        if missing:
            raise ValueError(f"heads {sorted(missing)} were disabled when the model was built")
        return wanted

    def forward(self, images: torch.Tensor, *, patch_tokens: Optional[torch.Tensor] = None,
                heads: Optional[Iterable[str]] = None, **options) -> dict[str, torch.Tensor]:
        """Run the model.

        Args:
            images: ``[S, 3, H, W]`` or ``[B, S, 3, H, W]``, RGB in [0, 1] (normalised inside),
                height and width multiples of ``config.patch_size``.
            patch_tokens: optional output of :meth:`encode_patches` for these images (skips the
                per-frame encoder; see :meth:`patch_token_shape`).
            heads: subset of ``HEAD_NAMES`` (or an alias) to run; default all enabled heads.
            options: backbone-specific keyword options of :meth:`forward_prepared`.

        Returns the backbone's own outputs (see its :meth:`forward_prepared`); :meth:`decode`
        turns them into :class:`BackboneOutputs`.
        """
        return self.forward_prepared(self.prologue(images, patch_tokens, heads), **options)

    def prologue(self, images: torch.Tensor, patch_tokens: Optional[torch.Tensor],
                 heads: Optional[Iterable[str]]) -> ForwardInputs:
        """The common start of ``forward``: check the images, resolve ``heads`` and encode the
        patches (or check and cast cached ``patch_tokens``)."""
        p = self.config.patch_size
        images = batched_images(images, p)
        b, s, _, h, w = images.shape
        grid = (h // p, w // p)
        wanted = self.requested_heads(heads)
        if patch_tokens is None:
            patch_tokens = self.encode_patches(images)
        else:
            expected = tuple(self.patch_token_shape(b, s, grid))
            if not isinstance(patch_tokens, torch.Tensor) or tuple(patch_tokens.shape) != expected:
                got = tuple(patch_tokens.shape) if isinstance(patch_tokens, torch.Tensor) else type(patch_tokens).__name__
                raise ValueError(f"patch_tokens must have shape {expected} for these images, got {got}")
            patch_tokens = patch_tokens.to(self.weight_dtype())
        return ForwardInputs(images, grid, wanted, patch_tokens)
