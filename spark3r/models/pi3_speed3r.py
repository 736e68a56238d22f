"""Speed3R-π3 (``Pi3_Sparse`` of ``Visual-AI/speed3r``, checkpoint ``weining17/Speed3R_Pi3``).

π3 with every global layer replaced by Speed3R's gated dual-branch sparse attention
(:mod:`spark3r.accel.speed3r`); frame layers stay dense. Differences to :class:`~.pi3.Pi3`:

* no register tokens; patch positions start at 0 (π3: at 1, registers at 0);
* the decoder is two lists, ``local_decoder.{j}`` (frame attention, π3's ``decoder.{2j}``) and
  ``global_decoder.{j}`` (π3's ``decoder.{2j+1}``), whose attention has a gate
  ``attn.gate.0`` = ``Linear(C -> 2*heads)`` (+ sigmoid);
* inside the decoder every frame's tokens (and positions) are in window-major order — each
  ``window x window`` patch window is consecutive — and back in row-major order for the heads,
  so image sides must be multiples of ``patch_size * window`` (56 px);
* an extra output ``mid_hidden``: the decoder state after layer pair ``L/2 - 1``.

The sparse attention is the model's own: the constructor installs
:class:`~.layers.sparse_attention.LearnedSparseAttention` (official window and top-k) in every
global layer's hook. ``spark3r.accel.apply(model, "speed3r", top_k=...)`` replaces it (and prices
it); ``spark3r.accel.remove(model)`` runs the same weights with dense global attention (gates
unused; the form of Speed3R's distillation teacher, and the bench's dense reference). Other
reduction methods are refused: they assume row-major patch order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .base import ForwardInputs
from .layers.attention import Attention
from .layers.layout import TokenLayout
from .layers.rope import grid_positions
from .layers.sparse_attention import LearnedSparseAttention, window_major_permutation
from .pi3 import HEAD_NAMES, Pi3, Pi3Config

MID_HIDDEN = "mid_hidden"


@dataclass(frozen=True)
class Pi3Speed3RConfig(Pi3Config):
    """π3 numbers plus Speed3R's: ``window`` (patches per block side, official 4) and ``top_k``
    (key blocks per query block, official 32). Registers are removed (0)."""

    num_register_tokens: int = 0
    window: int = 4
    top_k: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_register_tokens:
            raise ValueError("Speed3R-π3 has no register tokens (num_register_tokens must be 0)")
        if self.depth < 4:
            raise ValueError(f"Speed3R-π3 needs depth >= 4 (mid_hidden is taken after layer pair L/2-1), got {self.depth}")
        if self.window < 1 or self.top_k < 1:
            raise ValueError(f"window and top_k must be >= 1, got {self.window}, {self.top_k}")

    @property
    def image_multiple(self) -> int:
        return self.patch_size * self.window


class Pi3Speed3R(Pi3):
    """Speed3R-π3 backbone + heads. See :meth:`forward_prepared`."""

    HEAD_NAMES = HEAD_NAMES + (MID_HIDDEN,)

    # Ops that assume row-major patch order would silently mix the wrong tokens here.
    supported_accel_methods = ("dense", "speed3r")

    def __init__(self, config: Pi3Speed3RConfig = Pi3Speed3RConfig(), preset: Optional[str] = None) -> None:
        super().__init__(config, preset=preset)
        native = LearnedSparseAttention((config.window, config.window), config.top_k)
        for module in self.global_attention_modules():
            module.global_op = native

    def _build_decoder(self) -> None:
        half = self.config.depth // 2
        self.local_decoder = nn.ModuleList(self._decoder_block() for _ in range(half))
        self.global_decoder = nn.ModuleList(self._decoder_block(gated=True) for _ in range(half))

    def global_attention_modules(self) -> list[Attention]:
        return [blk.attn for blk in self.global_decoder]

    def head_positions(self, grid: tuple[int, int], device) -> torch.Tensor:
        """Patch (r, c) at (r, c): Speed3R's positions start at 0."""
        return grid_positions(grid[0], grid[1], 0, device=device, offset=0)

    def aggregate(self, patch_tokens: torch.Tensor, grid: tuple[int, int], with_mid: bool = True) -> list[torch.Tensor]:
        """Patch tokens ``[B, N, Np, C]`` (row-major) -> ``[last, mid]`` (``[last]`` without
        ``with_mid``), both ``[B, N, Np, 2C]`` row-major: the cat of the last frame and global
        block, and of the frame and global block of layer pair ``L/2 - 1`` (``mid_hidden``)."""
        cfg = self.config
        b, s, p, c = patch_tokens.shape
        window = (cfg.window, cfg.window)
        order = window_major_permutation(grid[0], grid[1], window, device=patch_tokens.device)
        restore = order.argsort()
        pos = self.head_positions(grid, patch_tokens.device)[order]
        x = patch_tokens[:, :, order]
        pairs = len(self.global_decoder)
        kept: dict[int, list[torch.Tensor]] = {}
        for i, (local_blk, global_blk) in enumerate(zip(self.local_decoder, self.global_decoder)):
            x = local_blk(x.reshape(b * s, p, c), pos=pos)
            frame_out = x
            layout = TokenLayout(frames=s, tokens_per_frame=p, special_tokens=0, grid=(int(grid[0]), int(grid[1])),
                                 reference_frame=None, layer=i, num_layers=pairs, window=window)
            x = global_blk(x.reshape(b, s * p, c), pos=pos, layout=layout)
            if i == pairs - 1 or (with_mid and i == pairs // 2 - 1):
                kept[i] = [frame_out.reshape(b, s, p, c), x.reshape(b, s, p, c)]
        wanted = (pairs - 1, pairs // 2 - 1) if with_mid else (pairs - 1,)
        return [torch.cat(kept[i], dim=-1)[:, :, restore] for i in wanted]

    @property
    def image_multiple(self) -> int:
        return self.config.image_multiple

    def prologue(self, images: torch.Tensor, patch_tokens: Optional[torch.Tensor], heads) -> ForwardInputs:
        multiple = self.config.image_multiple
        if isinstance(images, torch.Tensor) and images.dim() >= 2:
            h, w = images.shape[-2:]
            if h % multiple or w % multiple:
                raise ValueError(f"Speed3R-π3 needs image sides that are multiples of {multiple} px ({self.config.window}x"
                                 f"{self.config.window} windows of {self.config.patch_size}-px patches), got {h}x{w}")
        return super().prologue(images, patch_tokens, heads)

    def forward_prepared(self, inputs: ForwardInputs) -> dict[str, torch.Tensor]:
        """Decoder and the requested heads (``forward(images, patch_tokens=..., heads=...)``;
        images ``[N, 3, H, W]`` / ``[B, N, 3, H, W]`` with H and W multiples of
        ``patch_size * window`` = 56; heads from ``("camera", "point", "conf", "mid_hidden")``,
        default all; "depth" = point + conf as in π3).

        Returns (official names, float32 except ``mid_hidden``): ``points`` [B,N,H,W,3],
        ``local_points`` [B,N,H,W,3], ``conf`` [B,N,H,W,1] (raw logits), ``camera_poses``
        [B,N,4,4] (camera-to-world, OpenCV, arbitrary world frame) as in π3, and ``mid_hidden``
        [B,N,Np,2C] (decoder state after layer pair L/2-1, row-major patches; model dtype); only
        those requested.
        """
        wanted = inputs.heads
        decoded = self.aggregate(inputs.patch_tokens, inputs.grid, with_mid=MID_HIDDEN in wanted)
        out = self._run_heads(decoded[0], inputs.grid, inputs.images.shape, wanted - {MID_HIDDEN})
        if MID_HIDDEN in wanted:
            out[MID_HIDDEN] = decoded[1]
        return out


def speed3r_state_dict_from_pi3(pi3_state: dict, num_heads: int) -> dict:
    """A π3 state dict -> the Speed3R-π3 layout the official training starts from
    (``pi3/utils/initialize.py``): ``decoder.{2j}`` -> ``local_decoder.{j}``, ``decoder.{2j+1}``
    -> ``global_decoder.{j}``, ``register_token`` dropped, every global block given gates at the
    official initialisation (weight 0, bias -1 / +1 per head), everything else unchanged."""
    out = {}
    gates = set()
    for name, value in pi3_state.items():
        if name == "register_token":
            continue
        if name.startswith("decoder."):
            _, index, rest = name.split(".", 2)
            j, odd = divmod(int(index), 2)
            name = f"{'global' if odd else 'local'}_decoder.{j}.{rest}"
            if odd and rest == "attn.qkv.weight":
                gates.add((j, value.shape[1], value.dtype))
        out[name] = value
    for j, dim, dtype in sorted(gates):
        out[f"global_decoder.{j}.attn.gate.0.weight"] = torch.zeros(2 * num_heads, dim, dtype=dtype)
        out[f"global_decoder.{j}.attn.gate.0.bias"] = torch.tensor([-1.0, 1.0], dtype=dtype).repeat(num_heads)
    return out

