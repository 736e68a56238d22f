"""Image input shared by every backbone: shape checks and ImageNet normalisation."""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def batched_images(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[S, 3, H, W]`` or ``[B, S, 3, H, W]`` float images in [0, 1] -> ``[B, S, 3, H, W]``;
    anything else (wrong rank or channels, integer pixels, sides that are not positive multiples
    of the patch size, no frames) raises with what was expected."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 4:
        images = images[None]
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be [S, 3, H, W] or [B, S, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor with values in [0, 1], got {images.dtype}")
    b, s, _, h, w = images.shape
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {patch_size}, got {h}x{w}")
    if s == 0 or b == 0:
        raise ValueError("images must contain at least one frame")
    return images


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB ``[..., 3, H, W]`` -> ImageNet-normalised (constants built on the fly so the
    model has no buffers that a meta-device build would leave unmaterialised)."""
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(shape)
    return ((images - mean) / std).to(images.dtype)
