"""Speed3R op-level properties and the training-free mode on every backbone."""
from __future__ import annotations

import math

import pytest
import torch

from spark3r import accel
from spark3r.accel.speed3r import Speed3RConfig, Speed3ROp, block_table, training_free_attention
from spark3r.models.layers.layout import TokenLayout
from spark3r.models.layers.sparse_attention import (block_sparse_attention, gated_combine, pooled_attention,
                                                    pooled_positions, topk_key_blocks, window_major_permutation)
from spark3r.models import load_pretrained
from spark3r.models.layers.attention import Attention, AttentionLayerInputs
from spark3r.models.layers.rope import RoPE2D, grid_positions


def dense(q, k, v, scale=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def qkv(b, h, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


# -- token order and pooling ------------------------------------------------------------------


def test_window_major_permutation_groups_windows_and_restores():
    rows, cols = 8, 12
    perm = window_major_permutation(rows, cols, (4, 4))
    r, c = perm // cols, perm % cols
    # every 16 consecutive tokens are one 4x4 window, windows and patches row-major
    for w in range(perm.numel() // 16):
        wr, wc = divmod(w, cols // 4)
        assert torch.equal(r[16 * w:16 * w + 16], torch.arange(4).repeat_interleave(4) + 4 * wr)
        assert torch.equal(c[16 * w:16 * w + 16], torch.arange(4).repeat(4) + 4 * wc)
    x = torch.randn(2, rows * cols, 3)
    assert torch.equal(x[:, perm][:, perm.argsort()], x)
    with pytest.raises(ValueError, match="multiple"):
        window_major_permutation(6, 8, (4, 4))


def test_pooled_positions_are_truncated_means():
    pos = grid_positions(8, 8, 0, offset=0)[window_major_permutation(8, 8, (4, 4))]
    assert pooled_positions(pos, 16).tolist() == [[1, 1], [1, 5], [5, 1], [5, 5]]


# -- selection --------------------------------------------------------------------------------


def test_topk_ties_go_to_the_lower_index():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 3.0]])
    assert topk_key_blocks(logits, 3).tolist() == [[6, 1, 3]]
    assert topk_key_blocks(logits, 4).tolist() == [[6, 1, 3, 2]]  # three-way tie at the boundary
    flat = torch.zeros(2, 5, 40)
    assert torch.equal(topk_key_blocks(flat, 32), torch.arange(32).expand(2, 5, 32))


def test_topk_with_fewer_blocks_repeats_the_last_block():
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    assert topk_key_blocks(logits, 6).tolist() == [[1, 0, 2, 2, 2, 2]]
    assert topk_key_blocks(logits, 3).tolist() == [[1, 0, 2]]


def test_pooled_attention_is_dense_attention_over_pooled_tokens_in_any_chunking():
    q, k, v = qkv(2, 3, 20, 8)
    out, index = pooled_attention(q, k, v, top_k=5, scale=0.3)
    torch.testing.assert_close(out, dense(q, k, v, scale=0.3), atol=1e-6, rtol=1e-5)
    assert torch.equal(index, torch.topk(q @ k.transpose(-1, -2), 5).indices)
    small = pooled_attention(q, k, v, top_k=5, scale=0.3, chunk_elements=7)
    torch.testing.assert_close(small[0], out, atol=1e-6, rtol=1e-5)  # BLAS blocking may differ
    assert torch.equal(small[1], index)


def test_block_sparse_attention_is_one_softmax_over_the_selected_blocks():
    bt, n = 4, 6
    q, k, v = qkv(1, 2, n * bt, 8, seed=1)
    index = torch.randint(0, n, (1, 2, n, 3), generator=torch.Generator().manual_seed(2))
    index[0, 0, 0] = torch.tensor([5, 5, 1])  # a repeated block counts twice
    out = block_sparse_attention(q, k, v, index, bt, scale=0.25, chunk_elements=50)
    for h in range(2):
        for m in range(n):
            keys = torch.cat([torch.arange(b * bt, b * bt + bt) for b in index[0, h, m].tolist()])
            ref = dense(q[:, h:h + 1, m * bt:(m + 1) * bt], k[:, h:h + 1, keys], v[:, h:h + 1, keys], scale=0.25)
            torch.testing.assert_close(out[:, h:h + 1, m * bt:(m + 1) * bt], ref, atol=1e-6, rtol=1e-5)


def test_gated_combine_interleaves_gate_channels_per_head():
    b, h, n, bt, d = 1, 2, 3, 4, 5
    pooled, selected = torch.randn(b, h, n, d), torch.randn(b, h, n * bt, d)
    gates = torch.rand(b, n * bt, 2 * h)
    out = gated_combine(pooled, selected, gates, bt)
    for head in range(h):
        expected = gates[0, :, 2 * head, None] * pooled[0, head].repeat_interleave(bt, 0) + \
            gates[0, :, 2 * head + 1, None] * selected[0, head]
        torch.testing.assert_close(out[0, head], expected)


# -- training-free mode -----------------------------------------------------------------------

LAYOUTS = [
    TokenLayout(frames=3, tokens_per_frame=5 + 5 * 7, special_tokens=5, grid=(5, 7), reference_frame=0),
    TokenLayout(frames=4, tokens_per_frame=8 * 8, special_tokens=0, grid=(8, 8), reference_frame=None),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [(4, 4), (2, 3)])
@pytest.mark.parametrize("anchor_every", [0, 2])
def test_training_free_with_all_blocks_is_dense(layout, block, anchor_every):
    q, k, v = qkv(2, 3, layout.num_tokens, 16, seed=3)
    nb = block_table(layout, block, "cpu").tokens.shape[0]
    config = Speed3RConfig(block_size=block, top_k=nb, anchor_every=anchor_every)
    out = training_free_attention(q, k, v, layout, config, chunk_elements=2000)
    torch.testing.assert_close(out, dense(q, k, v), atol=2e-6, rtol=1e-5)


def test_anchor_frames_are_always_selected_keys():
    layout = TokenLayout(frames=5, tokens_per_frame=1 + 8 * 8, special_tokens=1, grid=(8, 8), reference_frame=1)
    table = block_table(layout, (4, 4), "cpu", anchor_every=2)
    anchors = {0, 2, 4}
    frame_of = lambda t: t // layout.tokens_per_frame  # noqa: E731
    assert {frame_of(int(t)) for t in table.tokens[table.key_blocks, 0]} == {3}
    patches = {int(t) for t in table.always if int(t) % layout.tokens_per_frame >= 1 and frame_of(int(t)) != 1}
    assert {frame_of(t) for t in patches} == anchors and len(patches) == 3 * 64
    q, k, v = qkv(1, 2, layout.num_tokens, 16, seed=10)
    config = Speed3RConfig(top_k=1, anchor_every=2)
    base = training_free_attention(q, k, v, layout, config)
    k2 = k.clone()
    k2[:, :, 4 * layout.tokens_per_frame + 5] += 3.0  # one patch of anchor frame 4
    moved = training_free_attention(q, k2, v, layout, config)
    assert ((moved - base).abs().amax(-1) > 0).all()


def test_training_free_is_exact_when_blocks_are_uniform():
    """The pooled stand-in of an unselected block (mean logit + log size, mean value) is exact
    when a block's tokens are identical — for any top-k, edge windows included."""
    layout = LAYOUTS[0]
    q, k, v = qkv(1, 2, layout.num_tokens, 16, seed=4)
    table = block_table(layout, (2, 3), "cpu")
    for t in (q, k, v):
        first = t[:, :, table.tokens[:, 0]]
        for slot in range(table.tokens.shape[1]):
            t[:, :, table.tokens[:, slot]] = first
    for top_k in (1, 3):
        out = training_free_attention(q, k, v, layout, Speed3RConfig(block_size=(2, 3), top_k=top_k))
        torch.testing.assert_close(out, dense(q, k, v), atol=2e-6, rtol=1e-5)


def test_special_tokens_and_reference_frame_attend_densely_and_are_always_selected():
    layout = LAYOUTS[0]
    q, k, v = qkv(1, 2, layout.num_tokens, 16, seed=5)
    out = training_free_attention(q, k, v, layout, Speed3RConfig(top_k=1))
    protected = layout.protected_mask()
    torch.testing.assert_close(out[:, :, protected], dense(q, k, v)[:, :, protected], atol=1e-6, rtol=1e-5)
    # Moving a protected key changes every query's output (it is an exact key everywhere).
    k2 = k.clone()
    k2[:, :, 1] += 3.0  # a register token of frame 0
    moved = training_free_attention(q, k2, v, layout, Speed3RConfig(top_k=1))
    assert ((moved - out).abs().amax(-1) > 0).all()


def test_training_free_approximation_improves_with_top_k():
    layout = TokenLayout(frames=4, tokens_per_frame=1 + 8 * 8, special_tokens=1, grid=(8, 8), reference_frame=0)
    q, k, v = qkv(1, 2, layout.num_tokens, 16, seed=6)
    ref = dense(q, k, v)
    errors = [float((training_free_attention(q, k, v, layout, Speed3RConfig(top_k=t)) - ref).norm() / ref.norm())
              for t in (1, 4, 8, 12)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_training_free_runs_in_other_dtypes(dtype):
    layout = LAYOUTS[0]
    q, k, v = qkv(1, 2, layout.num_tokens, 16, seed=7, dtype=dtype)
    out = training_free_attention(q, k, v, layout, Speed3RConfig(top_k=2))
    ref = training_free_attention(q.float(), k.float(), v.float(), layout, Speed3RConfig(top_k=2))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_free_on_cuda_matches_cpu():
    layout = LAYOUTS[0]
    q, k, v = qkv(1, 2, layout.num_tokens, 16, seed=8)
    cpu = training_free_attention(q, k, v, layout, Speed3RConfig(top_k=2))
    gpu = training_free_attention(q.cuda(), k.cuda(), v.cuda(), layout, Speed3RConfig(top_k=2))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_config_ranges():
    assert Speed3RConfig(block_size=2).block_size == (2, 2)
    for bad in ({"block_size": (0, 4)}, {"block_size": (1, 2, 3)}, {"top_k": 0}, {"top_k": 1.5}, {"anchor_every": -1}):
        with pytest.raises(ValueError):
            Speed3RConfig(**bad)
    with pytest.raises(TypeError, match="no parameter"):
        accel.make_config("speed3r", topk=3)


# -- the layer hook ---------------------------------------------------------------------------


def test_layer_inputs_expose_the_layer_without_changing_the_dense_path():
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=True, rope=RoPE2D(100.0), gates=True)
    x = torch.randn(2, 12, 32)
    pos = grid_positions(3, 4, 0)
    layout = TokenLayout(frames=1, tokens_per_frame=12, special_tokens=0, grid=(3, 4), reference_frame=None)
    inputs = AttentionLayerInputs(attn, x, pos, layout)
    q_raw, k_raw, v_raw = inputs.projections()
    torch.testing.assert_close(q_raw.transpose(1, 2).reshape(2, 12, 32), attn.qkv(x)[..., :32])
    for got, want in zip(inputs.qkv(), attn.project_qkv(x, pos)):
        assert torch.equal(got, want)
    assert inputs.gates().shape == (2, 12, 8) and inputs.has_gates
    assert "gate.0.weight" in attn.state_dict()
    plain = Attention(32, 4)
    assert plain.gate is None and "gate.0.weight" not in plain.state_dict()

    calls = []

    class LayerOp:
        def attend_layer(self, layer_inputs):
            calls.append(layer_inputs)
            return dense(*layer_inputs.qkv())

    attn.global_op = LayerOp()
    via_op = attn(x, pos=pos, layout=layout)
    attn.global_op = None
    torch.testing.assert_close(via_op, attn(x, pos=pos), atol=0, rtol=0)
    assert calls and calls[0].layout is layout


# -- every backbone ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["vggt-tiny", "pi3-tiny", "da3-small"])
def backbone(request):
    return load_pretrained(request.param, "seeded")


class UnshortcutSpeed3R:
    """Test double: the training-free tensor function itself (the op would shortcut to SDPA when
    top-k covers every block), so the log-sum-exp merge runs inside a real model."""

    def __init__(self, top_k):
        self.config = Speed3RConfig(top_k=top_k)

    def __call__(self, q, k, v, layout, scale=None):
        return training_free_attention(q, k, v, layout, self.config, scale)


def test_speed3r_with_all_blocks_is_dense_on_every_backbone(backbone):
    images = torch.rand(3, 3, 56, 70, generator=torch.Generator().manual_seed(0))  # 4x5 patches: edge windows
    modules = backbone.global_attention_modules()
    try:
        with torch.inference_mode():
            accel.remove(backbone)
            reference = backbone(images)
            handle = accel.apply(backbone, "speed3r", top_k=1000)
            assert handle.reduced_layers == tuple(range(len(modules)))
            shortcut = backbone(images)
            for m in modules:
                m.global_op = UnshortcutSpeed3R(top_k=1000)
            merged = backbone(images)
            accel.apply(backbone, "speed3r", top_k=1)
            sparse = backbone(images)
    finally:
        accel.remove(backbone)
    moved = False
    for key, ref in reference.items():
        if not (torch.is_tensor(ref) and ref.is_floating_point()) or key == "images":
            continue
        assert torch.equal(shortcut[key], ref), key
        scale = ref.abs().max().clamp_min(1e-12)
        assert float((merged[key] - ref).abs().max() / scale) < 2e-5, key
        moved |= float((sparse[key] - ref).abs().max() / scale) > 1e-4
    assert moved, "top_k=1 should approximate, not reproduce, dense attention"


def test_op_prices_pooled_attention_and_blocks():
    layout = TokenLayout(frames=100, tokens_per_frame=5 + 24 * 36, special_tokens=5, grid=(24, 36), reference_frame=0)
    op = Speed3ROp(Speed3RConfig())
    protected = int(layout.protected_mask().sum())
    n, d = layout.num_tokens, 64
    block_queries = n - protected
    nb = 99 * 6 * 9
    cost = op.attention_flops(layout, heads=16, head_dim=d)
    assert cost.attention == 4 * 16 * d * (block_queries * (protected + 32 * 16) + protected * n)
    assert cost.overhead == 16 * (3 * n * d + 4 * nb * nb * d + 6 * n * d)
    assert cost.queries == n
    assert 4 * 16 * n * n * d / cost.total > 20  # 100 frames: most of dense attention is avoided
    # The learned layer (window-major, no special tokens): top-k blocks, pooled attention, gates.
    learned = TokenLayout(frames=100, tokens_per_frame=24 * 36, special_tokens=0, grid=(24, 36), reference_frame=None,
                          window=(4, 4))
    cost = op.attention_flops(learned, heads=16, head_dim=d)
    m = learned.num_tokens
    assert (cost.queries, cost.keys) == (m, 512) and cost.attention == 4 * 16 * m * 512 * d
    assert cost.overhead == 16 * (6 * m * d + 4 * (m // 16) ** 2 * d) + 2 * m * 16 * d * 32


def test_gradients_flow_through_the_training_free_op():
    layout = LAYOUTS[0]
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, layout.num_tokens, 16, seed=9))
    out = Speed3ROp(Speed3RConfig(top_k=2))(q, k, v, layout)
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_gradients_reach_the_gates_of_pi3_speed3r():
    model = load_pretrained("pi3-speed3r-tiny", "seeded")
    out = model(torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)), heads=("point",))
    out["local_points"].abs().mean().backward()
    gate = model.global_decoder[0].attn.gate[0].weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_pi3_speed3r_runs_in_bfloat16():
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = load_pretrained("pi3-speed3r-tiny", "seeded")(images, heads=("camera", "mid_hidden"))
        half = load_pretrained("pi3-speed3r-tiny", "seeded", dtype=torch.bfloat16)(images, heads=("camera", "mid_hidden"))
    assert half["mid_hidden"].dtype == torch.bfloat16 and set(half) == {"camera_poses", "mid_hidden"}
    mid = ref["mid_hidden"]
    assert float((half["mid_hidden"].float() - mid).abs().mean() / mid.abs().mean()) < 0.05


def test_mapper_takes_speed3r_parameters_and_the_pi3_speed3r_backbone():
    from spark3r.mapping import BackboneConfig
    from spark3r.mapping.model_backbone import ModelBackbone, network_geometry

    cfg = BackboneConfig.from_flat({"backbone": "pi3-tiny", "checkpoint": "seeded", "reduction": "speed3r",
                                    "reduction.top_k": 4, "reduction.block_size": [2, 2], "image_width": 126})
    bb = ModelBackbone.from_config(cfg, 4, 2)
    assert bb.model.accel_handle.op.config == Speed3RConfig(block_size=(2, 2), top_k=4)
    with pytest.raises(ValueError, match="reduction.top_k"):
        BackboneConfig.from_flat({"backbone": "pi3-tiny", "reduction": "speed3r", "reduction.top_k": 0})
    # pi3-speed3r: network sides are multiples of 56; the width is rounded down to one.
    bb = ModelBackbone.from_config(BackboneConfig(backbone="pi3-speed3r-tiny", checkpoint="seeded", image_width=126), 4, 2)
    assert (bb.multiple, bb.image_width) == (56, 112)
    assert network_geometry((96, 128), bb.image_width, bb.multiple).network_hw == (112, 112)


def test_flop_model_of_speed3r_at_1024_frames():
    """The official design at 1024 frames of 504x336: ~200x fewer global-attention FLOPs (pairs
    ~ M^2/256 + 512 M instead of M^2; the head count cancels, so the tiny preset shows it)."""
    from spark3r.bench.runner import BenchConfig, run_bench

    res = run_bench(BenchConfig("pi3-speed3r-tiny", 1024, (336, 504), methods=("dense", "speed3r"), flops_only=True))
    flops = res["methods"]["speed3r"]["flops"]
    assert 150 < flops["global_attention_speedup"] < 300
    with pytest.raises(ValueError, match="supports only"):
        BenchConfig("pi3-speed3r-tiny", 2, (112, 112), methods=("dense", "uniform"))


@pytest.mark.slow
def test_flop_model_of_the_full_pi3_speed3r_preset():
    """``spark3r bench --preset flops-1024-speed3r``: the whole model lands above the paper's
    12.4x wall-time speedup (wall time also pays for memory-bound work) and below Amdahl's bound."""
    from spark3r.bench.runner import config_from_preset, run_bench

    flops = run_bench(config_from_preset("flops-1024-speed3r"))["methods"]["speed3r"]["flops"]
    assert 150 < flops["global_attention_speedup"] < 300
    assert 12.4 < flops["speedup"] < flops["amdahl_bound"]


def test_op_on_window_major_tokens_uses_the_windows_as_blocks():
    """What op-level benchmarks of pi3-speed3r call (q/k/v only, no gates)."""
    layout = TokenLayout(frames=2, tokens_per_frame=64, special_tokens=0, grid=(8, 8), reference_frame=None,
                         window=(4, 4))
    q, k, v = qkv(1, 2, layout.num_tokens, 16, seed=11)
    out = training_free_attention(q, k, v, layout, Speed3RConfig(top_k=8), chunk_elements=3000)
    torch.testing.assert_close(out, dense(q, k, v), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(Speed3ROp(Speed3RConfig(top_k=2))(q, k, v, layout), dense(q, k, v), atol=1e-4)
    with pytest.raises(ValueError, match="window-major"):
        block_table(layout, (2, 2), "cpu")
