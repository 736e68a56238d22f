"""2-D rotary position embedding (RoPE) on a patch grid, as used by VGGT, π3 and DA3.

The head dimension is split in two halves: the first half is rotated by the token's row (y)
position, the second half by its column (x) position. Each half uses the "rotate-half" layout
(pairs are ``(i, i + d/2)``, not interleaved) with inverse frequencies ``base^(-2i/d)``.

Positions are integer ``[..., 2]`` tensors holding ``(row, col)``. Because every backbone reuses
the same per-frame grid for all frames, :meth:`RoPE2D.forward` accepts positions for one period
of ``Np`` tokens and applies them to token sequences whose length is any multiple of ``Np``; this
avoids materialising a cos/sin table per token in multi-view attention over thousands of frames.
Angles are computed directly as ``position * inv_freq`` (no table look-up), so there is no host
synchronisation (works on the meta device) and the values equal a table look-up bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn


def grid_positions(rows: int, cols: int, num_special: int = 0, device=None, offset: int = 1) -> torch.Tensor:
    """``[num_special + rows*cols, 2]`` int64 positions (row, col) of one frame.

    Patch (r, c) gets ``(r + offset, c + offset)``; the ``num_special`` leading tokens get (0, 0),
    which with ``offset=1`` keeps them distinct from every patch.
    """
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    patches = torch.cartesian_prod(r, c).reshape(rows * cols, 2) + offset
    special = torch.zeros(num_special, 2, dtype=patches.dtype, device=device)
    return torch.cat([special, patches], dim=0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RoPE2D(nn.Module):
    """Rotary embedding over (row, col) positions; stateless (no parameters, no buffers)."""

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"base={self.base}"

    def _cos_sin(self, pos: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, dim, 2, device=pos.device).float() / dim
        inv_freq = 1.0 / (self.base**exponents)
        angles = (pos.to(inv_freq.dtype)[..., None] * inv_freq).to(dtype)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def _rotate_1d(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(pos, x.shape[-1], x.dtype)
        return x * cos + _rotate_half(x) * sin

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[..., N, D]`` (D divisible by 4) by positions ``pos`` ``[Np, 2]``.

        ``pos`` may also carry leading batch dims broadcastable against ``x[..., :-2]`` with a
        heads axis inserted (``[B, Np, 2]`` for ``x`` = ``[B, heads, N, D]``). N must be a multiple
        of Np: the positions repeat every Np tokens.
        """
        if x.shape[-1] % 4 != 0:
            raise ValueError(f"RoPE2D needs a head dim divisible by 4, got {x.shape[-1]}")
        if pos.shape[-1] != 2:
            raise ValueError(f"positions must have shape [..., Np, 2], got {tuple(pos.shape)}")
        n, period = x.shape[-2], pos.shape[-2]
        if n % period != 0:
            raise ValueError(f"token count {n} is not a multiple of the position period {period}")
        if pos.dim() == 3:  # [B, Np, 2] -> broadcast over heads
            pos = pos[:, None]
        repeats = n // period
        if repeats > 1:
            x = x.unflatten(-2, (repeats, period))
            pos = pos.unsqueeze(-3)
        half = x.shape[-1] // 2
        rows = self._rotate_1d(x[..., :half], pos[..., 0])
        cols = self._rotate_1d(x[..., half:], pos[..., 1])
        out = torch.cat((rows, cols), dim=-1)
        return out.flatten(-3, -2) if repeats > 1 else out
