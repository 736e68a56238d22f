"""A new backbone is one module plus one registry entry.

``ToyBackbone`` below is written only against the contract (``spark3r.models.base``) and the
shared layers, registered with one ``register_preset`` call, and then used — unchanged — by
every token-reduction method (``spark3r.accel.apply``), the FLOP model, the bench (fidelity
included) and the mapper. Its outputs deliberately use names no real backbone uses; only its own
``decode`` knows them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from spark3r import accel
from spark3r.accel import AttentionCost, TokenLayout
from spark3r.accel.apply import METHODS, register_method
from spark3r.accel.common import check_qkv, exact_attention
from spark3r.bench.flops import global_attention_flops, model_flops, model_geometry
from spark3r.bench.runner import BenchConfig, run_bench
from spark3r.data.synthetic import render_sequence
from spark3r.mapping import BackboneConfig, Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig
from spark3r.mapping.model_backbone import ModelBackbone
from spark3r.models import build_model, list_presets, load_pretrained
from spark3r.models.base import BackboneModel, BackboneOutputs, ForwardInputs
from spark3r.models.images import batched_images
from spark3r.models.layers import Block
from spark3r.models.registry import inference_overrides, register_preset, unregister_preset

PRESET = "toy-test"
SIZE = (56, 70)  # 4 x 5 patches of 14 px


# -- the backbone: one module's worth of code --------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    patch_size: int = 14
    embed_dim: int = 32
    num_heads: int = 2
    depth: int = 3  # frame/global block pairs
    focal_ratio: float = 0.8  # focal length / image width of the (fixed) intrinsics
    enable_spare_head: bool = True  # a module inference never runs (dropped by UNUSED_MODULES)


class ToyBackbone(BackboneModel):
    """Per-frame linear patch embedding, ``depth`` x (frame block, global block) with one camera
    token per frame, a linear camera head (axis-angle + translation) and a linear per-pixel
    depth/confidence head."""

    HEAD_NAMES = ("camera", "depth")
    UNUSED_MODULES = {"enable_spare_head": False}

    def __init__(self, config: ToyConfig = ToyConfig(), preset=None) -> None:
        super().__init__()
        self.config, self.preset = config, preset
        c, p = config.embed_dim, config.patch_size
        self.patch_embed = nn.Linear(3 * p * p, c)
        self.camera_token = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.frame_blocks = nn.ModuleList(Block(c, config.num_heads) for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(Block(c, config.num_heads) for _ in range(config.depth))
        self.camera_head = nn.Linear(c, 6)
        self.depth_head = nn.Linear(c, 2 * p * p)
        self.spare_head = nn.Linear(c, 1) if config.enable_spare_head else None

    def encode_patches(self, images):
        p = self.config.patch_size
        images = batched_images(images, p)
        b, s, _, h, w = images.shape
        patches = F.unfold(images.reshape(b * s, 3, h, w).to(self.weight_dtype()), p, stride=p)
        return self.patch_embed(patches.transpose(1, 2)).reshape(b, s, -1, self.config.embed_dim)

    def patch_token_shape(self, batch, frames, grid):
        return (batch, frames, grid[0] * grid[1], self.config.embed_dim)

    def global_attention_modules(self):
        return [blk.attn for blk in self.global_blocks]

    def aggregate(self, patch_tokens, grid):
        b, s, n, c = patch_tokens.shape
        x = torch.cat([self.camera_token.expand(b, s, 1, c), patch_tokens], dim=2)
        p = n + 1
        outputs = []
        for i, (frame, glob) in enumerate(zip(self.frame_blocks, self.global_blocks)):
            x = frame(x.reshape(b * s, p, c))
            layout = TokenLayout(frames=s, tokens_per_frame=p, special_tokens=1, grid=tuple(grid), reference_frame=0,
                                 layer=i, num_layers=self.config.depth)
            x = glob(x.reshape(b, s * p, c), layout=layout).reshape(b, s, p, c)
            outputs.append(x)
        return outputs

    def forward_prepared(self, inputs: ForwardInputs):
        """Returns ``toy_pose`` [B,S,6] (axis-angle, translation of camera-to-world) and
        ``toy_depth_logits`` [B,S,H,W,2] (depth, confidence), as the requested heads produce."""
        b, s, _, h, w = inputs.images.shape
        last = self.aggregate(inputs.patch_tokens, inputs.grid)[-1]
        out = {}
        if "camera" in inputs.heads:
            out["toy_pose"] = self.camera_head(last[:, :, 0])
        if "depth" in inputs.heads:
            p = self.config.patch_size
            pix = self.depth_head(last[:, :, 1:]).reshape(b * s, -1, 2 * p * p).transpose(1, 2)
            out["toy_depth_logits"] = F.fold(pix, (h, w), p, stride=p).reshape(b, s, 2, h, w).permute(0, 1, 3, 4, 2)
        return out

    def decode(self, outputs, image_hw):
        c2w = intrinsics = depth = conf = None
        if "toy_pose" in outputs:
            pose = outputs["toy_pose"].detach().double()
            rvec, t = 0.1 * torch.tanh(pose[..., :3]), 0.1 * torch.tanh(pose[..., 3:])
            skew = torch.zeros(pose.shape[:-1] + (3, 3), dtype=pose.dtype, device=pose.device)
            skew[..., 0, 1], skew[..., 0, 2], skew[..., 1, 2] = -rvec[..., 2], rvec[..., 1], -rvec[..., 0]
            skew = skew - skew.transpose(-1, -2)
            c2w = torch.eye(4, dtype=pose.dtype, device=pose.device).repeat(pose.shape[:-1] + (1, 1))
            c2w[..., :3, :3], c2w[..., :3, 3] = torch.linalg.matrix_exp(skew), t
            h, w = image_hw
            intrinsics = torch.zeros_like(c2w[..., :3, :3])
            intrinsics[..., 0, 0] = intrinsics[..., 1, 1] = self.config.focal_ratio * w
            intrinsics[..., 0, 2], intrinsics[..., 1, 2], intrinsics[..., 2, 2] = w / 2, h / 2, 1.0
        if "toy_depth_logits" in outputs:
            logits = outputs["toy_depth_logits"].detach().float()
            depth = 1.0 + torch.sigmoid(logits[..., 0])
            conf = 1.0 + torch.exp(logits[..., 1].clamp(max=30.0))
        return BackboneOutputs(c2w, intrinsics, depth, conf)


# -- the one registry entry ---------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_preset(PRESET, ToyBackbone, ToyConfig())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    unregister_preset(PRESET)


@pytest.fixture(scope="module")
def model():
    return load_pretrained(PRESET, "seeded", **inference_overrides(PRESET))


def images(frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, *SIZE, generator=g)


def test_registration_makes_a_buildable_loadable_preset(model):
    assert PRESET in list_presets()
    assert inference_overrides(PRESET) == {"enable_spare_head": False}
    assert model.spare_head is None and model.preset == PRESET and model.num_global_layers == 3
    assert build_model(PRESET).spare_head is not None
    out = model(images(2), heads=("camera", "depth"))
    dec = model.decode(out, SIZE)
    assert dec.c2w.shape == (1, 2, 4, 4) and dec.intrinsics.shape == (1, 2, 3, 3)
    assert dec.depth.shape == dec.conf.shape == (1, 2, *SIZE) and bool((dec.conf >= 1).all())
    with pytest.raises(ValueError, match="unknown heads"):
        model(images(2), heads=("points",))
    with pytest.raises(ValueError, match="patch_tokens must have shape"):
        model(images(2), patch_tokens=torch.zeros(1, 2, 3, 32))
    # Cached patch tokens give bitwise the same outputs (the shared prologue).
    x = images(2)
    cached = model(x, patch_tokens=model.encode_patches(x))
    torch.testing.assert_close(cached["toy_pose"], model(x)["toy_pose"], rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_applies_and_remove_restores_dense(model, method):
    x = images(3, seed=1)
    with torch.inference_mode():
        dense = model(x)
        handle = accel.apply(model, method)
        reduced = model(x)
        accel.remove(model)
        again = model(x)
    assert handle.method == method
    if method == "dense":
        assert handle.reduced_layers == ()
    else:
        assert handle.reduced_layers, "a reducing method should take over some global layer of the toy"
    for name in dense:
        assert reduced[name].shape == dense[name].shape and torch.isfinite(reduced[name]).all()
        torch.testing.assert_close(again[name], dense[name], rtol=0, atol=0)


def test_flop_model_matches_the_flop_counter_and_sums_what_ops_report(model):
    frames = 4
    dense_op = accel.build_op("dense", model.num_global_layers, PRESET)
    counted = model_flops(model, dense_op, frames, *SIZE)
    meta = build_model(PRESET, device="meta", **inference_overrides(PRESET))
    with FlopCounterMode(display=False) as counter:
        meta(torch.empty(frames, 3, *SIZE, device="meta"))
    assert counted["dense"] == counter.get_total_flops()
    geo = model_geometry(model, frames, *SIZE)
    for method in ("uniform", "spark3r"):
        op = accel.build_op(method, model.num_global_layers, PRESET)
        report = model_flops(model, op, frames, *SIZE)
        expected = sum(op.attention_flops(lay, geo.heads, geo.head_dim).total if not op.is_identity(lay.layer)
                       else 4 * geo.heads * lay.num_tokens ** 2 * geo.head_dim for lay in geo.layouts)
        assert report["global_attention_method"] == expected
        assert report["dense"] - report["method"] == report["global_attention_dense"] - expected > 0


class BlockSparseTestOp:
    """Test double of a block-sparse method (Speed3R-like): every query attends to a compressed
    branch (one mean key per block of 8 tokens) plus its top-``k`` blocks. It computes exact
    attention — only its price is under test."""

    BLOCK = 8

    def __init__(self, config):
        self.config = config

    def is_identity(self, layer):
        return False

    def __call__(self, q, k, v, layout, scale=None):
        check_qkv(q, k, v, layout)
        return exact_attention(q, k, v, scale)

    def attention_flops(self, layout, heads, head_dim, batch=1):
        n = layout.num_tokens
        blocks = -(-n // self.BLOCK)
        keys = blocks + self.config.top_k * self.BLOCK  # compressed keys + selected blocks, per query
        selection = 2 * batch * heads * n * blocks * head_dim  # scoring queries against block means
        return AttentionCost(4 * batch * heads * n * keys * head_dim, selection, n, keys)


@dataclass(frozen=True)
class BlockSparseTestConfig:
    top_k: int = 2


def test_a_block_sparse_method_is_priced_by_what_it_reports(model):
    register_method("blocksparse-test", BlockSparseTestConfig, lambda c, n, b: BlockSparseTestOp(c))
    try:
        op = accel.build_op("blocksparse-test", model.num_global_layers, PRESET, top_k=1)
        frames = 6
        geo = model_geometry(model, frames, *SIZE)
        n = geo.layouts[0].num_tokens  # 6 x 21 = 126 tokens -> 16 blocks
        per_layer = 4 * geo.heads * n * (16 + 8) * geo.head_dim + 2 * geo.heads * n * 16 * geo.head_dim
        assert global_attention_flops(op, geo)["per_layer"] == [per_layer] * 3
        report = model_flops(model, op, frames, *SIZE)
        assert report["global_attention_method"] == 3 * per_layer
        # Not "dense attention on fewer tokens": every query stays, the keys per query are priced.
        assert op.attention_flops(geo.layouts[0], geo.heads, geo.head_dim).queries == n
        handle = accel.apply(model, "blocksparse-test", top_k=1)
        assert handle.reduced_layers == (0, 1, 2)
        accel.remove(model)
    finally:
        del METHODS["blocksparse-test"]


def test_bench_runs_on_the_toy_with_fidelity():
    res = run_bench(BenchConfig(PRESET, 2, SIZE, methods=("dense", "uniform", "spark3r"), repeats=1))
    assert list(res["methods"]) == ["dense", "uniform", "spark3r"]
    for name, m in res["methods"].items():
        assert m["flops"]["dense"] >= m["flops"]["method"] > 0
        assert set(m["fidelity"]) == {"depth_rel", "rotation_deg", "translation_rel"}
    assert all(v == 0 for v in res["methods"]["dense"]["fidelity"].values())
    assert res["methods"]["spark3r"]["fidelity"]["depth_rel"] > 0
    agg = run_bench(BenchConfig(PRESET, 2, SIZE, scope="aggregator", methods=("dense", "spark3r"), repeats=1))
    assert agg["methods"]["dense"]["fidelity"] == {"aggregator_rel": 0.0}


@pytest.mark.parametrize("reduction", ["dense", "spark3r"])
def test_mapper_maps_a_synthetic_stream_with_the_toy(reduction):
    seq = render_sequence(num_frames=9, height=96, width=128, seed=3, trajectory="orbit")
    bb = ModelBackbone.from_config(BackboneConfig(backbone=PRESET, checkpoint="seeded", image_width=126,
                                                  reduction=reduction), 6, 3)
    assert bb.model.spare_head is None  # built lean
    cfg = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                       window=WindowConfig(window_size=6, window_stride=3, max_alignment_residual=10.0,
                                           min_inlier_fraction=0.0),
                       map=MapConfig(voxel_size=0.05, conf_percentile=0.0))
    mapper = Mapper(cfg, bb)
    results = []
    for image, stamp in zip(seq.images, seq.stamps_ns):
        mapper.offer(Frame(image, int(stamp), K=seq.K))
        results.extend(iter(mapper.process_pending, None))  # every window that became due
    assert mapper.stats.backbone_errors == 0, mapper.stats.last_backbone_error
    assert [r.points_xyz.shape[1] for r in results] == [3, 3] and len(mapper.trajectory) == 9
    assert mapper.stats.windows_mapped == 2 and mapper.stats.map_points > 0
    assert all(np.isfinite(r.points_xyz).all() and len(r.points_xyz) > 0 for r in results)
