"""DPT dense-prediction head (multi-level token maps -> per-pixel outputs).

Shared by VGGT (depth, point map, track features) and, with ``relu_skip=False``, usable for the
DA3 DualDPT. Module names (``projects``, ``resize_layers``, ``scratch.layerN_rn``,
``scratch.refinenetN.resConfUnitM``, ``scratch.output_conv1/2``) follow the official checkpoints.

VGGT quirk: the official residual conv units apply an *in-place* ReLU to their input, so the
skip connection adds ``relu(x)`` rather than ``x``. ``relu_skip=True`` reproduces that.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Activations of the prediction and confidence channels


def inverse_log(y: torch.Tensor) -> torch.Tensor:
    """``sign(y) * (exp(|y|) - 1)``: undoes a signed log1p compression."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


_VALUE_ACTIVATIONS = {
    "exp": torch.exp,
    "inv_log": inverse_log,
    "linear": lambda x: x,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
}
_CONF_ACTIVATIONS = {
    "expp1": lambda c: 1 + c.exp(),
    "expp0": torch.exp,
    "sigmoid": torch.sigmoid,
}


def activate_dense(out: torch.Tensor, activation: str, conf_activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, H, W]`` -> values ``[N, H, W, C-1]`` and confidence ``[N, H, W]`` (last channel)."""
    fmap = out.permute(0, 2, 3, 1)
    return _VALUE_ACTIVATIONS[activation](fmap[..., :-1]), _CONF_ACTIVATIONS[conf_activation](fmap[..., -1])


# ---------------------------------------------------------------------------------------------
# UV sinusoidal embedding added to the feature maps


def uv_grid(width: int, height: int, aspect_ratio: float, dtype=None, device=None) -> torch.Tensor:
    """``[height, width, 2]`` (u, v) sample centres spanning ``±aspect/diag`` x ``±1/diag``."""
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    # The (n-1)/n shrink puts samples at pixel centres of an n-cell partition of the span.
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype, device=device)
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack((uu, vv), dim=-1)


def sincos_embed_1d(pos: torch.Tensor, dim: int, omega_0: float = 100.0, float64: bool = True) -> torch.Tensor:
    """``[M]`` -> ``[M, dim]`` = ``[sin(pos*w), cos(pos*w)]``.

    ``float64``: frequencies and angles in double precision (VGGT's head); DA3 computes them in
    float32, which differs in the last bits, so its heads pass False."""
    # MPS has no float64; everywhere else the frequencies (and the product) are double precision.
    ftype = torch.float32 if pos.device.type == "mps" or not float64 else torch.float64
    omega = torch.arange(dim // 2, dtype=ftype, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    angles = pos.reshape(-1).to(ftype)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def uv_embedding(height: int, width: int, channels: int, aspect_ratio: float, dtype, device, float64: bool = True) -> torch.Tensor:
    """``[channels, height, width]``: first half of the channels encodes u, second half v."""
    grid = uv_grid(width, height, aspect_ratio, dtype=dtype, device=device).reshape(-1, 2)
    half = channels // 2
    emb = torch.cat([sincos_embed_1d(grid[:, 0], half, float64=float64), sincos_embed_1d(grid[:, 1], half, float64=float64)], dim=-1)
    return emb.reshape(height, width, channels).permute(2, 0, 1)


def add_uv_embedding(x: torch.Tensor, image_w: int, image_h: int, ratio: float = 0.1, float64: bool = True) -> torch.Tensor:
    emb = uv_embedding(x.shape[-2], x.shape[-1], x.shape[1], image_w / image_h, x.dtype, x.device, float64)
    return x + (emb * ratio).to(x.dtype)[None]


# ---------------------------------------------------------------------------------------------
# Fusion blocks


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True, split along the batch when the output would exceed the
    element limit of some upsampling kernels."""
    limit = 1_610_612_736
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements > limit:
        parts = torch.chunk(x, elements // limit + 1, dim=0)
        return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=True) for p in parts], dim=0)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    """``conv2(relu(conv1(relu(x)))) + skip`` with ``skip = relu(x)`` (VGGT) or ``x``."""

    def __init__(self, features: int, relu_skip: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.relu_skip = relu_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(x)
        # conv1's output is a fresh tensor: activating it in place saves a full feature-map pass.
        out = self.conv2(F.relu(self.conv1(activated), inplace=True))
        return out + (activated if self.relu_skip else x)


class FusionBlock(nn.Module):
    """RefineNet-style fusion: ``out_conv(up(rcu2(x + rcu1(skip))))``."""

    def __init__(self, features: int, has_residual: bool, relu_skip: bool) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features, relu_skip)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features, relu_skip)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, size=None) -> torch.Tensor:
        if self.has_residual:
            if skip is None:
                raise ValueError("this fusion block needs a skip input")
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (int(x.shape[-2] * 2), int(x.shape[-1] * 2))
        return self.out_conv(resize_bilinear(x, tuple(size)))


class DPTHead(nn.Module):
    """Dense head over a list of aggregated token maps.

    Args:
        dim_in: channels of the token maps (2x the backbone width for VGGT: frame ‖ global).
        output_dim: prediction channels incl. the confidence channel (depth 2, points 4).
        activation / conf_activation: see :func:`activate_dense`.
        features: fusion width; out_channels: per-level projection widths.
        layer_indices: which entries of the token list feed the four levels.
        pos_embed: add the 0.1-scaled UV embedding after projection and before the last conv.
        feature_only: stop after ``output_conv1`` (``features`` channels) and return features.
        down_ratio: output resolution divisor (track features use 2).
        relu_skip: reproduce VGGT's relu'd residual skip (see module doc).
        frames_chunk: frames per chunk through the head (bounds peak memory; results identical).
        norm_eps: eps of the shared token LayerNorm.
        uv_float64: build the UV embedding in float64 (VGGT) or float32 (DA3).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        layer_indices: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
        relu_skip: bool = True,
        frames_chunk: Optional[int] = 8,
        norm_eps: float = 1e-5,
        uv_float64: bool = True,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(layer_indices) != 4:
            raise ValueError("DPTHead needs exactly 4 out_channels and 4 layer_indices")
        if not feature_only and (activation not in _VALUE_ACTIVATIONS or conf_activation not in _CONF_ACTIVATIONS):
            raise ValueError(f"unknown activation {activation!r}/{conf_activation!r}")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.layer_indices = tuple(layer_indices)
        self.frames_chunk = frames_chunk
        self.uv_float64 = uv_float64

        self.norm = nn.LayerNorm(dim_in, eps=norm_eps)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels)
        oc = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, c in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FusionBlock(features, True, relu_skip)
        self.scratch.refinenet2 = FusionBlock(features, True, relu_skip)
        self.scratch.refinenet3 = FusionBlock(features, True, relu_skip)
        self.scratch.refinenet4 = FusionBlock(features, False, relu_skip)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, 3, padding=1),
                nn.ReLU(inplace=True),  # on the conv's own output: no copy of a full-resolution map
                nn.Conv2d(32, output_dim, 1),
            )

    def forward(self, token_list: Sequence[Optional[torch.Tensor]], image_hw: tuple[int, int], patch_start: int):
        """Token maps ``[B, S, P, dim_in]`` -> ``(values [B,S,H,W,C-1], conf [B,S,H,W])``, or
        features ``[B, S, features, H', W']`` when ``feature_only``."""
        b, s = token_list[self.layer_indices[0]].shape[:2]
        chunk = self.frames_chunk if self.frames_chunk and self.frames_chunk < s else s
        results = [self._forward_frames(token_list, image_hw, patch_start, f, min(f + chunk, s)) for f in range(0, s, chunk)]
        if len(results) == 1:
            return results[0]
        if self.feature_only:
            return torch.cat(results, dim=1)
        return torch.cat([r[0] for r in results], dim=1), torch.cat([r[1] for r in results], dim=1)

    def _forward_frames(self, token_list, image_hw, patch_start, start, stop):
        h, w = image_hw
        rows, cols = h // self.patch_size, w // self.patch_size
        levels = []
        for level, layer in enumerate(self.layer_indices):
            tokens = token_list[layer]
            if tokens is None:
                raise ValueError(f"aggregator layer {layer} was not kept but the DPT head needs it")
            b = tokens.shape[0]
            x = tokens[:, start:stop, patch_start:]
            x = self.norm(x.reshape(b * (stop - start), rows * cols, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], rows, cols)
            x = self.projects[level](x)
            if self.pos_embed:
                x = add_uv_embedding(x, w, h, float64=self.uv_float64)
            levels.append(self.resize_layers[level](x))
        out = self._fuse(levels)
        out = resize_bilinear(out, (int(rows * self.patch_size / self.down_ratio), int(cols * self.patch_size / self.down_ratio)))
        if self.pos_embed:
            out = add_uv_embedding(out, w, h, float64=self.uv_float64)
        b = token_list[self.layer_indices[0]].shape[0]
        if self.feature_only:
            return out.reshape(b, stop - start, *out.shape[1:])
        values, conf = activate_dense(self.scratch.output_conv2(out), self.activation, self.conf_activation)
        return values.reshape(b, stop - start, *values.shape[1:]), conf.reshape(b, stop - start, *conf.shape[1:])

    def _fuse(self, levels: list[torch.Tensor]) -> torch.Tensor:
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(x) for i, x in enumerate(levels, start=1))
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)
