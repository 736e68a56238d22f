"""A real reconstruction model as a mapper :class:`~spark3r.mapping.backbone.Backbone`.

``ModelBackbone`` = model (preset + weights) + token reduction + preprocessing + a patch-embedding
cache. The model's own :meth:`~spark3r.models.base.BackboneModel.decode` turns its outputs into
the one convention (c2w OpenCV, intrinsics in network pixels, depth, confidence); this module
only maps network pixels back to keyframe-image pixels. Nothing here depends on which backbone
it is.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..models.base import BackboneOutputs
from ..threads import apply_threads, resolve_threads
from .backbone import Prediction
from .config import BackboneConfig
from .frames import Keyframe

# What the mapper asks every backbone for (each backbone maps "depth" onto its own heads).
MAPPING_HEADS = ("camera", "depth")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Preprocessing is spark3r.models.preprocess ("crop" mode); this records where its output sits
# in the keyframe image so intrinsics and depth can be mapped back.


@dataclass(frozen=True)
class NetworkGeometry:
    """How network pixels relate to keyframe-image pixels for one window."""

    image_hw: tuple[int, int]              # keyframe image size
    network_hw: tuple[int, int]            # model input size
    box: tuple[float, float, float, float]  # image region (edge coords) the network input shows
    resized_height: int                    # height after the resize, before the centre crop
    multiple: int = 14                     # network sides are multiples of this

    def network_to_image_K(self, K_net: np.ndarray) -> np.ndarray:
        """Intrinsics ``[..., 3, 3]`` in network pixels -> keyframe-image pixels (both with pixel
        centres at integer coordinates)."""
        x0, y0, x1, y1 = self.box
        sx = (x1 - x0) / self.network_hw[1]
        sy = (y1 - y0) / self.network_hw[0]
        A = np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
        # A degenerate prediction (fov 0 -> infinite focal length) stays non-finite here and is
        # dropped and counted by the mapper; no need for a warning per window.
        with np.errstate(invalid="ignore", over="ignore"):
            return A @ K_net


def network_geometry(image_hw: tuple[int, int], image_width: int, multiple: int = 14) -> NetworkGeometry:
    """Geometry of ``preprocess_image(image, "crop", image_width, multiple)`` for an image of ``image_hw``."""
    from ..models.preprocess import target_size_for

    H, W = image_hw
    new_w, resized_h = target_size_for(W, H, "crop", image_width, multiple)
    if resized_h == 0:
        raise ValueError(f"image {W}x{H} is too elongated for a network input {image_width} pixels wide")
    net_h = min(resized_h, image_width)
    top = (resized_h - net_h) // 2
    # Rows [top, top + net_h) of the resized image, expressed in image edge coordinates.
    y_scale = H / resized_h
    box = (0.0, top * y_scale, float(W), (top + net_h) * y_scale)
    return NetworkGeometry((H, W), (net_h, new_w), box, resized_h, multiple)


def preprocess(image: np.ndarray, geometry: NetworkGeometry) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, h, w]`` in [0, 1] for the network."""
    from ..models.preprocess import preprocess_image

    if image.shape[:2] != geometry.image_hw:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, geometry expects {geometry.image_hw[1]}x{geometry.image_hw[0]}")
    out = preprocess_image(image, "crop", geometry.network_hw[1], geometry.multiple)
    if tuple(out.shape[1:]) != geometry.network_hw:
        raise RuntimeError(f"preprocessing gave {tuple(out.shape[1:])}, expected {geometry.network_hw}")
    return out


def to_prediction(decoded: BackboneOutputs, geometry: NetworkGeometry, descriptors=None) -> Prediction:
    """A backbone's decoded outputs (batch of one window) -> the mapper's :class:`Prediction`,
    with intrinsics mapped from network pixels to keyframe-image pixels; ``descriptors``: the
    frames' place descriptors ``[S, D]`` (or None)."""
    missing = [name for name in ("c2w", "intrinsics", "depth", "conf") if getattr(decoded, name) is None]
    if missing:
        raise ValueError(f"the backbone's decoded outputs lack {missing}; the mapper needs heads {MAPPING_HEADS}")
    return Prediction(
        c2w=decoded.c2w[0].cpu().numpy(),
        K=geometry.network_to_image_K(decoded.intrinsics[0].cpu().numpy()),
        depth=decoded.depth[0].cpu().numpy(),
        conf=decoded.conf[0].cpu().numpy(),
        depth_box=geometry.box,
        descriptors=descriptors,
    )


class PatchCache:
    """Patch embeddings (and network images) per keyframe id, least recently used evicted first."""

    def __init__(self, max_frames: int):
        if max_frames < 1:
            raise ValueError(f"cache max_frames must be >= 1, got {max_frames}")
        self.max_frames = int(max_frames)
        self._items: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item

    def put(self, key, image: torch.Tensor, tokens: torch.Tensor) -> None:
        self._items[key] = (image, tokens)
        self._items.move_to_end(key)
        while len(self._items) > self.max_frames:
            self._items.popitem(last=False)

    def forget(self, keyframe_ids) -> None:
        ids = set(int(i) for i in keyframe_ids)
        for key in [k for k in self._items if k[0] in ids]:
            del self._items[key]

    def clear(self) -> None:
        self._items.clear()


class ModelBackbone:
    """Backbone around a spark3r model (see :meth:`from_config` for the production path).

    ``model``: a built :class:`~spark3r.models.base.BackboneModel` (``encode_patches``,
    ``forward(images, patch_tokens=..., heads=...)``, ``decode``).
    ``image_width``: network input width (multiple of the patch size). ``cache_max_frames``:
    patch-embedding cache capacity (0 disables the cache). ``device``: where inputs go (default:
    the model's). The model's own dtype is used for its blocks; heads decide their own precision.
    """

    def __init__(self, model, *, image_width: int = 518, cache_max_frames: int = 24, device=None, threads: int = 0):
        if not callable(getattr(model, "decode", None)) or not callable(getattr(model, "encode_patches", None)):
            raise TypeError(f"{type(model).__name__} is not a spark3r backbone (spark3r.models.base.BackboneModel: "
                            f"encode_patches and decode are needed)")
        self.model = model.eval()
        self.patch_size = int(getattr(getattr(model, "config", None), "patch_size", 14))
        if image_width < 2 * self.patch_size or image_width % self.patch_size:
            raise ValueError(f"image_width must be a multiple of {self.patch_size} and >= {2 * self.patch_size}, got {image_width}")
        # Network sides must be multiples of this (56 for Speed3R-π3's 4x4 patch windows); the
        # width is rounded down to it, so the shared default 518 works for every backbone.
        self.multiple = int(getattr(model, "image_multiple", self.patch_size))
        if image_width < self.multiple:
            raise ValueError(f"image_width must be >= {self.multiple} for this backbone, got {image_width}")
        self.image_width = int(image_width) // self.multiple * self.multiple
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.cache = PatchCache(cache_max_frames) if cache_max_frames > 0 else None
        # CPU threads of every forward (0 = auto, spark3r.threads); set in the calling thread
        # because OpenMP keeps the team size per thread. threads_used: what the last forward got.
        self.threads = resolve_threads(threads)
        self.threads_used: Optional[int] = None
        self._descriptor_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def from_config(cls, config: BackboneConfig, window_size: int = 16, window_stride: int = 8) -> "ModelBackbone":
        """Build the model from a preset and weights, install the reduction method.

        ``config.checkpoint``: a file, directory or hub id for :func:`spark3r.models.load_pretrained`;
        ``"seeded"`` gives the deterministic seeded-v1 weights (tests and demos only: their cameras
        are usually degenerate, so the mapper drops most windows); empty is refused
        so a misconfigured node never maps with random weights silently.
        """
        from .. import accel
        from ..models import load_pretrained
        from ..models.registry import inference_overrides, native_width

        if not isinstance(config, BackboneConfig):
            raise TypeError(f"config must be a BackboneConfig, got {type(config).__name__}")
        dtype = _DTYPES[config.dtype]
        device = torch.device(config.device)
        if dtype != torch.float32 and device.type == "cpu":
            raise ValueError(f"dtype={config.dtype} is only supported on CUDA devices; use float32 on {config.device}")
        # Only camera + depth are decoded; skipping the point head saves memory and time.
        if config.checkpoint == "":
            raise ValueError("checkpoint is empty: give a weights file, directory or hub id "
                             "(or 'seeded' for deterministic test weights)")
        lean = inference_overrides(config.backbone, outputs=MAPPING_HEADS)
        model = load_pretrained(config.backbone, config.checkpoint, device=device, dtype=dtype, **lean)
        if config.reduction != "dense" or config.reduction_params:
            accel.apply(model, config.reduction, **config.reduction_params)
        cache = config.cache_max_frames or (window_size + window_stride)
        width = config.image_width or native_width(config.backbone)
        return cls(model, image_width=width, cache_max_frames=cache, device=device, threads=config.threads)

    # -- Backbone protocol ---------------------------------------------------------------------

    def predict(self, window: Sequence[Keyframe]) -> Prediction:
        if len(window) == 0:
            raise ValueError("predict needs at least one keyframe")
        shapes = {kf.image.shape[:2] for kf in window}
        if len(shapes) != 1:
            raise ValueError(f"all keyframes of a window must have the same image size, got {sorted(shapes)}")
        geometry = network_geometry(next(iter(shapes)), self.image_width, self.multiple)
        self.threads_used = apply_threads(self.threads)  # before the encoder of new keyframes, too
        images, tokens = self._inputs(window, geometry)
        with torch.inference_mode():
            outputs = self.model(images[None], patch_tokens=tokens[None], heads=MAPPING_HEADS)
            decoded = self.model.decode(outputs, geometry.network_hw)
        return to_prediction(decoded, geometry, self._descriptors(window, tokens, geometry))

    def forget(self, keyframe_ids) -> None:
        if self.cache is not None:
            self.cache.forget(keyframe_ids)
        ids = set(int(i) for i in keyframe_ids)
        for key in [k for k in self._descriptor_cache if k[0] in ids]:
            del self._descriptor_cache[key]

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.clear()
        self._descriptor_cache.clear()

    # -- internals -----------------------------------------------------------------------------

    def _descriptors(self, window: Sequence[Keyframe], tokens: torch.Tensor, geometry: NetworkGeometry) -> np.ndarray:
        """Place descriptors from the encoder's patch tokens the window already has (no extra
        network; :func:`~spark3r.mapping.place_recognition.frame_descriptors`), one per keyframe,
        remembered by keyframe id for as long as its tokens are cached."""
        from .place_recognition import frame_descriptors

        grid_hw = (geometry.network_hw[0] // self.patch_size, geometry.network_hw[1] // self.patch_size)
        missing = [i for i, kf in enumerate(window) if (kf.id, geometry.network_hw) not in self._descriptor_cache]
        if missing:
            fresh = frame_descriptors(tokens[missing].float().cpu().numpy(), grid_hw)
            for i, d in zip(missing, fresh):
                self._descriptor_cache[(window[i].id, geometry.network_hw)] = d
        for kf in window:  # the window's own entries are the most recently used
            self._descriptor_cache.move_to_end((kf.id, geometry.network_hw))
        while len(self._descriptor_cache) > max(self.cache.max_frames if self.cache is not None else 0, len(window)):
            self._descriptor_cache.popitem(last=False)
        return np.stack([self._descriptor_cache[(kf.id, geometry.network_hw)] for kf in window])

    def _inputs(self, window: Sequence[Keyframe], geometry: NetworkGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """Network images ``[S, 3, h, w]`` and patch tokens ``[S, Np, C]``, from the cache where
        possible; missing frames are encoded in one call (frames are encoded independently, so
        this equals encoding the whole window)."""
        key = lambda kf: (kf.id, geometry.network_hw)  # noqa: E731
        found = {kf.id: self.cache.get(key(kf)) for kf in window} if self.cache is not None else {}
        missing = [kf for kf in window if found.get(kf.id) is None]
        if missing:
            fresh = torch.stack([preprocess(kf.image, geometry) for kf in missing]).to(self.device)
            with torch.inference_mode():
                fresh_tokens = self.model.encode_patches(fresh[None])[0]
            for kf, img, tok in zip(missing, fresh, fresh_tokens):
                found[kf.id] = (img, tok)
                if self.cache is not None:
                    self.cache.put(key(kf), img, tok)
        images = torch.stack([found[kf.id][0] for kf in window])
        tokens = torch.stack([found[kf.id][1] for kf in window])
        return images, tokens
