"""VGGT against the official model's golden outputs (../shared/golden, weights rule seeded-v1)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from golden_utils import load_case, mismatch_report, seeded_v1, tensor_digest
from spark3r.models.layers.layout import TokenLayout
from spark3r.models import build_model, load_weights

OUTPUT_KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


def run_with_debug(model, images: torch.Tensor, grid: tuple[int, int], layers: dict[str, int]) -> dict[str, torch.Tensor]:
    """Forward pass plus the golden debug tensors (hooks on the official module names)."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.depth_head.scratch.output_conv1.register_forward_hook(
            lambda m, i, o: captured.__setitem__("dbg.depth_head_output_conv1", o)),
        model.camera_head.token_norm.register_forward_hook(
            lambda m, i, o: captured.__setitem__("dbg.cam_token_norm", o)),
    ]
    try:
        with torch.inference_mode():
            out = model(images)
            patches = model.encode_patches(images)
            agg = model.aggregator(patches, grid)
    finally:
        for h in hooks:
            h.remove()
    result = {k: out[k] for k in OUTPUT_KEYS}
    result.update(captured)
    result["dbg.patch_embed"] = patches.flatten(0, 1)
    result["dbg.pose_enc_iters"] = torch.stack(out["pose_enc_list"])
    for name, layer in layers.items():
        result[name] = agg[layer]
    return result


def assert_matches_golden(case, results: dict[str, torch.Tensor]) -> None:
    failures = []
    for key, spec in case.meta["tolerance"]["per_tensor"].items():
        report = mismatch_report(results[key], case.tensors[key], spec["tol"])
        if report:
            failures.append(f"{key}: {report}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def tiny_case(shared):
    return load_case(shared, "vggt_tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_case):
    model = build_model("vggt-tiny", device="meta")
    return load_weights(model, tiny_case.state_dict())


@pytest.fixture(scope="module")
def tiny_results(tiny_case, tiny_model):
    return run_with_debug(tiny_model, tiny_case.tensors["images"], (8, 10), {"dbg.agg_layer0": 0, "dbg.agg_layer3": 3})


def test_tiny_state_dict_is_the_golden_listing(tiny_case):
    sd = build_model("vggt-tiny").state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e[0], e[1]) for e in tiny_case.entries]


def test_seeded_v1_reproduces_golden_digests(tiny_case):
    # Spot-check every kind of entry (token, 1-D weight, bias, conv, conv-transpose, gamma).
    picked = [e for e in tiny_case.entries if e[2] == "rule"][::7]
    for name, shape, _, total, digest in picked:
        value = seeded_v1(name, shape)
        assert tensor_digest(value) == digest, name
        assert float(value.double().sum()) == pytest.approx(total, rel=1e-6, abs=1e-6), name


def test_1b_state_dict_is_the_official_listing(shared):
    rows = (shared / "specs" / "vggt_state_dict.tsv").read_text().strip().splitlines()[1:]
    expected = [(r.split("\t")[0], [int(x) for x in r.split("\t")[1].split("x")]) for r in rows]
    model = build_model("vggt-1b", device="meta")
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == 1797
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 1_256_537_516
    assert len(model.global_attention_modules()) == 24


def test_tiny_matches_golden(tiny_case, tiny_results):
    assert_matches_golden(tiny_case, tiny_results)


@pytest.mark.slow
def test_1b_matches_golden(shared):
    case = load_case(shared, "vggt_1b")
    names = [e[0] for e in case.entries]
    assert names == list(build_model("vggt-1b", device="meta").state_dict())
    # The track head never runs; leaving it out skips generating 66 M values it would not use.
    model = build_model("vggt-1b", device="meta", enable_track=False)
    load_weights(model, case.state_dict(skip_prefixes=("track_head.",)))
    results = run_with_debug(model, case.tensors["images"], (5, 7),
                             {"dbg.agg_layer4": 4, "dbg.agg_layer23": 23})
    assert_matches_golden(case, results)


class RecordingDense:
    """A GlobalAttentionOp that records layouts and computes exact attention."""

    def __init__(self):
        self.layouts: list[TokenLayout] = []
        self.shapes: list[tuple] = []

    def __call__(self, q, k, v, layout, scale=None):
        self.layouts.append(layout)
        self.shapes.append(tuple(q.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def test_global_op_receives_layout_and_dense_op_is_exact(tiny_case, tiny_model, tiny_results):
    images = tiny_case.tensors["images"]
    reference = tiny_results
    op = RecordingDense()
    modules = tiny_model.global_attention_modules()
    assert len(modules) == 4 and all(m.global_op is None for m in modules)
    try:
        for m in modules:
            m.global_op = op
        with torch.inference_mode():
            hooked = tiny_model(images)
    finally:
        for m in modules:
            m.global_op = None
    for key in OUTPUT_KEYS:
        assert torch.equal(hooked[key], reference[key]), key
    assert [l.layer for l in op.layouts] == [0, 1, 2, 3]
    for layout, shape in zip(op.layouts, op.shapes):
        assert (layout.frames, layout.tokens_per_frame, layout.special_tokens) == (3, 85, 5)
        assert layout.grid == (8, 10) and layout.reference_frame == 0 and layout.num_layers == 4
        assert shape == (1, 6, 3 * 85, 64)


def test_global_op_output_is_used(tiny_case, tiny_model, tiny_results):
    images = tiny_case.tensors["images"]
    layer = tiny_model.global_attention_modules()[2]
    reference = tiny_results["depth"]
    with torch.inference_mode():
        layer.global_op = lambda q, k, v, layout, scale=None: torch.zeros_like(q)
        try:
            changed = tiny_model(images)["depth"]
        finally:
            layer.global_op = None
    assert not torch.allclose(changed, reference)


def test_frame_attention_rejects_a_global_op(tiny_model):
    attn = tiny_model.aggregator.frame_blocks[0].attn
    attn.global_op = RecordingDense()
    try:
        with pytest.raises(RuntimeError, match="global_attention_modules"):
            tiny_model(torch.rand(1, 3, 28, 28))
    finally:
        attn.global_op = None


def test_meta_forward_counts_flops_without_computing():
    model = build_model("vggt-tiny", device="meta")
    images = torch.empty(1, 6, 3, 56, 70, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(images)
    assert out["depth"].shape == (1, 6, 56, 70, 1) and out["depth"].is_meta
    assert out["world_points"].shape == (1, 6, 56, 70, 3)
    assert out["pose_enc"].shape == (1, 6, 9)
    assert counter.get_total_flops() > 0


def test_heads_can_be_switched_off(tiny_case):
    model = build_model("vggt-tiny", enable_point=False)
    assert model.point_head is None
    images = torch.rand(2, 3, 28, 42)
    with torch.inference_mode():
        out = model(images)
        only_camera = model(images, heads=("camera",))
    assert "world_points" not in out and out["depth"].shape == (1, 2, 28, 42, 1)
    assert set(only_camera) == {"pose_enc", "pose_enc_list", "images"}
    with pytest.raises(ValueError, match="disabled"):
        model(images, heads=("point",))
    with pytest.raises(ValueError, match="unknown heads"):
        model(images, heads=("normals",))


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(2, 3, 30, 28), ValueError, "multiples of 14"),
        (torch.rand(2, 4, 28, 28), ValueError, r"\[S, 3, H, W\]"),
        (torch.rand(3, 28, 28), ValueError, r"\[S, 3, H, W\]"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), TypeError, "float"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_give_clear_errors(images, error, match):
    model = build_model("vggt-tiny", device="meta")
    with pytest.raises(error, match=match):
        model(images)


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="vggt-1b"):
        build_model("vggt-2b", device="meta")
    with pytest.raises(TypeError, match="enable_normals"):
        build_model("vggt-tiny", device="meta", enable_normals=False)
    model = build_model("vggt-1b", device="meta")
    assert model.preset == "vggt-1b" and model.config.embed_dim == 1024 and model.config.depth == 24


# -- shared layers (reused by π3 / DA3) --------------------------------------------------------


def test_rope_is_relative_and_norm_preserving():
    from spark3r.models.layers import RoPE2D

    rope = RoPE2D(100.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64)

    def score(pq, pk):
        return float((rope(q, torch.tensor([pq])) * rope(k, torch.tensor([pk]))).sum())

    # Angles are built in float32 like the official code, hence the tolerance.
    assert score((3, 5), (1, 2)) == pytest.approx(score((12, 9), (10, 6)), abs=1e-5)
    assert score((3, 5), (1, 2)) != pytest.approx(score((3, 5), (2, 1)), abs=1e-3)
    rotated = rope(q, torch.tensor([[7, 4]]))
    assert float(rotated.norm()) == pytest.approx(float(q.norm()), rel=1e-12)
    # Position (0, 0) is the identity.
    assert torch.allclose(rope(q, torch.tensor([[0, 0]])), q)


def test_rope_period_equals_explicit_positions():
    from spark3r.models.layers import RoPE2D, grid_positions

    rope = RoPE2D(100.0)
    pos = grid_positions(2, 3, num_special=5)
    assert pos[:5].abs().sum() == 0 and pos[5].tolist() == [1, 1] and pos[-1].tolist() == [2, 3]
    x = torch.randn(2, 4, 3 * len(pos), 32)
    assert torch.equal(rope(x, pos), rope(x, pos.repeat(3, 1)))
    with pytest.raises(ValueError, match="multiple"):
        rope(x[:, :, :-1], pos)


def test_pos_embed_interpolation_variants():
    from spark3r.models.layers import interpolate_pos_embed

    pe = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(1))
    vggt = interpolate_pos_embed(pe, (5, 7), antialias=True, offset=0.0)
    dino = interpolate_pos_embed(pe, (5, 7), antialias=False, offset=0.1)
    assert vggt.shape == dino.shape == (1, 36, 8)
    assert torch.equal(vggt[:, 0], pe[:, 0]) and torch.equal(dino[:, 0], pe[:, 0])
    assert not torch.allclose(vggt, dino)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pe[:, :-1], (5, 7), antialias=True, offset=0.0)


def test_swiglu_ffn_has_the_dinov2_giant_shapes():
    from spark3r.models.layers import Block

    block = Block(1536, 24, ffn="swiglu", init_values=1.0, norm_eps=1e-6)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items() if k.startswith("mlp.")}
    assert shapes == {"mlp.w12.weight": (8192, 1536), "mlp.w12.bias": (8192,), "mlp.w3.weight": (1536, 4096), "mlp.w3.bias": (1536,)}


def test_dpt_relu_skip_flag():
    from spark3r.models.layers.dpt import ResidualConvUnit

    vggt_rcu = ResidualConvUnit(4, relu_skip=True)
    plain_rcu = ResidualConvUnit(4, relu_skip=False)
    plain_rcu.load_state_dict(vggt_rcu.state_dict())
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(vggt_rcu(x) - plain_rcu(x), torch.relu(x) - x)
        assert torch.equal(vggt_rcu(x.abs()), plain_rcu(x.abs()))
