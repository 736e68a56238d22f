"""Image loading and resizing for VGGT-style models (PIL + numpy; no torchvision).

Equivalent to the official ``load_and_preprocess_images``:

* ``"crop"`` (default): width -> ``target_size`` (518), height scaled with the aspect ratio and
  rounded to a multiple of 14, bicubic; a height above ``target_size`` is centre-cropped.
* ``"pad"``: the longer side -> ``target_size``, the other side rounded to a multiple of 14, then
  padded with white (1.0) to a square ``target_size`` x ``target_size``.

RGBA images are composited onto white first. Frames of different sizes in one call are padded
with white (centred) to the largest height/width. ``multiple`` (default the patch size 14) is what
sides are rounded to; Speed3R-π3 needs 56 (4x4 windows of 14-px patches).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MODES = ("crop", "pad")
PATCH = 14
PAD_VALUE = 1.0

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def list_images(folder: Union[str, os.PathLike]) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"not a directory: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def _to_pil_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        try:
            img = Image.open(image)
            img.load()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {image}: {exc}") from exc
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = _array_to_pil(image)
    else:
        raise TypeError(f"expected an image path, PIL image or numpy array, got {type(image).__name__}")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` (RGB order); floats in [0, 1] are scaled."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0):
            raise ValueError("float image arrays must hold values in [0, 1]")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 or float in [0, 1], got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def target_size_for(width: int, height: int, mode: str = "crop", target_size: int = 518,
                    multiple: int = PATCH) -> tuple[int, int]:
    """(new_width, new_height) of the resize step, before any crop or pad."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if target_size <= 0 or target_size % multiple:
        raise ValueError(f"target_size must be a positive multiple of {multiple}, got {target_size}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if mode == "pad" and height > width:
        return round(width * (target_size / height) / multiple) * multiple, target_size
    return target_size, round(height * (target_size / width) / multiple) * multiple


def _pad_to(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    dh, dw = height - img.shape[1], width - img.shape[2]
    if dh <= 0 and dw <= 0:
        return img
    top, left = dh // 2, dw // 2
    return torch.nn.functional.pad(img, (left, dw - left, top, dh - top), value=PAD_VALUE)


def preprocess_image(image: ImageLike, mode: str = "crop", target_size: int = 518, multiple: int = PATCH) -> torch.Tensor:
    """One image -> float32 ``[3, H, W]`` in [0, 1] with H, W multiples of ``multiple`` (14)."""
    img = _to_pil_rgb(image)
    new_w, new_h = target_size_for(img.width, img.height, mode, target_size, multiple)
    if new_w == 0 or new_h == 0:
        raise ValueError(f"image {img.width}x{img.height} is too elongated to resize to a multiple of {multiple}")
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    if mode == "crop" and new_h > target_size:
        top = (new_h - target_size) // 2
        tensor = tensor[:, top : top + target_size]
    if mode == "pad":
        tensor = _pad_to(tensor, target_size, target_size)
    return tensor


def load_images(images: Union[str, os.PathLike, Sequence[ImageLike]], mode: str = "crop", target_size: int = 518,
                multiple: int = PATCH) -> torch.Tensor:
    """Paths / PIL images / arrays (or a folder of images) -> ``[S, 3, H, W]`` float32 in [0, 1].

    Different output sizes are padded with white to the largest height and width (centred).
    """
    if isinstance(images, (str, os.PathLike)):
        images = list_images(images) if Path(images).is_dir() else [images]
    images = list(images)
    if not images:
        raise ValueError("at least one image is required")
    tensors = [preprocess_image(im, mode, target_size, multiple) for im in images]
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    return torch.stack([_pad_to(t, height, width) for t in tensors])
