"""Building blocks shared by all backbones (VGGT, π3, Depth-Anything-3)."""
from .attention import Attention, dense_attention
from .block import Block, LayerScale
from .dpt import DPTHead
from .layout import GlobalAttentionOp, TokenLayout
from .mlp import Mlp, SwiGLUFFN
from .rope import RoPE2D, grid_positions
from .vit import DinoViT, PatchEmbed, interpolate_pos_embed

__all__ = [
    "Attention", "dense_attention", "Block", "LayerScale", "DPTHead", "GlobalAttentionOp", "TokenLayout", "Mlp", "SwiGLUFFN",
    "RoPE2D", "grid_positions", "DinoViT", "PatchEmbed", "interpolate_pos_embed",
]
