"""Spark3R's paper recipe (``recipe="paper"``): the r_Q / r_KV tables, exact dense attention where
both factors are 1, temporal query groups that never merge across their boundaries, stride K/V
pruning that keeps exactly the intended frames, the op's self-pricing, the layer tiers and the
calibration probe on a synthetic sensitivity profile."""
from __future__ import annotations

import math

import pytest
import torch

import spark3r.accel.spark3r_paper as paper
from spark3r.accel import TokenLayout, apply, build_op, remove
from spark3r.accel.common import exact_attention
from spark3r.accel.op import dense_cost
from spark3r.accel.schedule import LayerTiers, default_tiers, load_tiers, resolve_tiers, save_tiers
from spark3r.accel.spark3r import Spark3RConfig
from spark3r.accel.spark3r_paper import (Spark3RPaperOp, group_plan, kv_factor, merge_queries_temporal, query_factor,
                                         stride_kept_frames, stride_kv_index, temporal_groups)
from spark3r.bench.calibrate import CalibrateConfig, classify_sensitivity, probe_sensitivity

H, D = 2, 8


def layout(frames, special=2, grid=(2, 3), ref=0, layer=0, num_layers=3):
    return TokenLayout(frames=frames, tokens_per_frame=special + grid[0] * grid[1], special_tokens=special, grid=grid,
                       reference_frame=ref, layer=layer, num_layers=num_layers)


def qkv(lay, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, lay.num_tokens, D, generator=g) for _ in range(3)]


def paper_op(num_layers=3, high=(0, 1, 2), **kw):
    return Spark3RPaperOp(Spark3RConfig(recipe="paper", **kw), LayerTiers(high, num_layers))


def test_factor_tables_exactly():
    expected_q = {1: 1, 100: 1, 101: 2, 300: 2, 301: 3, 500: 3, 501: 4, 1000: 4, 5000: 4}
    assert {s: query_factor(s) for s in expected_q} == expected_q
    for s in (1, 16, 64, 100):
        assert kv_factor(s, low_sensitivity=False) == 1
        assert kv_factor(s, low_sensitivity=True) == 3  # low-sensitivity layers prune short inputs too
    for s in (101, 120, 121, 256, 1000, 1001):
        assert kv_factor(s, low_sensitivity=False) == math.ceil(s / 40)
        assert kv_factor(s, low_sensitivity=True) == 3 * math.ceil(s / 40)
    assert kv_factor(1000, True, low_sensitivity_factor=5) == 125


@pytest.mark.parametrize("frames", [16, 100, 130, 320, 520])
def test_op_budgets_follow_the_tables(frames):
    op = paper_op(high=(1,))
    for layer, low in ((0, True), (1, False)):
        lay = layout(frames, layer=layer)
        rq, rkv = op.factors(lay)
        assert (rq, rkv) == (query_factor(frames), kv_factor(frames, low))
        cost = op.attention_flops(lay, H, D)
        kept = len(set(range(0, frames, rkv)) | {0})
        assert cost.keys == lay.special_tokens * frames + lay.patches_per_frame * kept if rkv > 1 else lay.num_tokens
        patches = lay.patches_per_frame
        reducible = [f for f in range(1, frames)]
        destinations = sum(sum(1 for p in range(patches) if (p + f) % rq == 0) for f in reducible)
        protected = lay.special_tokens * frames + patches
        assert cost.queries == (protected + destinations if rq > 1 else lay.num_tokens)
        # ~1/r_Q of the reducible queries survive
        if rq > 1:
            assert abs(destinations - len(reducible) * patches / rq) <= len(reducible)
        assert cost.attention == 4 * H * cost.queries * cost.keys * D


def test_op_runs_exactly_the_priced_shapes(monkeypatch):
    shapes = []
    real = paper.exact_attention
    monkeypatch.setattr(paper, "exact_attention", lambda q, k, v, scale=None: shapes.append(
        (q.shape[2], k.shape[2])) or real(q, k, v, scale))
    op = paper_op(high=(1,))
    for frames, layer in ((130, 0), (130, 1), (40, 0)):
        lay = layout(frames, layer=layer)
        q, k, v = qkv(lay)
        out = op(q, k, v, lay)
        assert out.shape == q.shape and torch.isfinite(out).all()
        cost = op.attention_flops(lay, H, D)
        assert shapes[-1] == (cost.queries, cost.keys)


def test_short_inputs_without_low_sensitivity_layers_are_exactly_dense():
    op = paper_op(high=(0, 1, 2))
    for frames in (2, 16, 100):
        for layer in range(3):
            lay = layout(frames, layer=layer)
            q, k, v = qkv(lay, seed=frames)
            assert torch.equal(op(q, k, v, lay), exact_attention(q, k, v))
            assert op.attention_flops(lay, H, D) == dense_cost(lay, H, D)
    lay = layout(101)  # beyond 100 frames the queries are merged
    assert op.attention_flops(lay, H, D).queries < lay.num_tokens


def test_short_inputs_are_exactly_dense_through_the_model():
    from spark3r.models import build_model
    from spark3r.seeded import load_seeded_v1

    model = load_seeded_v1(build_model("vggt-tiny", enable_track=False))
    images = torch.rand(3, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(images)
        apply(model, "spark3r", recipe="paper", schedule=LayerTiers((0, 1, 2, 3), 4))
        out = model(images)
        apply(model, "spark3r", recipe="paper", schedule=LayerTiers((0, 1), 4))  # 2 low layers: stride 3
        pruned = model(images)
        remove(model)
    for key in ("depth", "pose_enc", "world_points"):
        assert torch.equal(out[key], ref[key])
    assert not torch.equal(pruned["depth"], ref["depth"])


def test_temporal_groups_never_merge_across_boundaries():
    assert temporal_groups(45, 20) == ((0, 20), (20, 40), (40, 45))
    lay = layout(6, ref=None, grid=(2, 2), special=1)
    q, k, v = qkv(lay, seed=3)
    per_frame = q.unflatten(2, (6, lay.tokens_per_frame))
    per_frame[:, :, 2] = per_frame[:, :, 1]  # frame 2 (group 1 when G = 2) is a copy of frame 1 (group 0)
    q = per_frame.flatten(2, 3)
    frame_of = torch.arange(lay.num_tokens) // lay.tokens_per_frame

    def partner_frames(group):
        q_red, rows = merge_queries_temporal(q, lay, group, factor=2)
        plan = group_plan(lay, group, 2, "cpu")
        row_token = torch.cat((plan.protected, *plan.destinations))
        return frame_of[row_token[rows[0]]]  # frame of the destination each token's output comes from

    groups = {f: f // 2 for f in range(6)}
    with_boundary = partner_frames(2)
    assert all(groups[int(p)] == groups[int(f)] for p, f in zip(with_boundary, frame_of))
    # Control: without the boundary (one group of 4 frames) frame 1's sources do pick frame 2's
    # identical destinations — so the check above can fail.
    merged = partner_frames(4)
    sources_f1 = [i for i in range(lay.num_tokens) if frame_of[i] == 1 and i % lay.tokens_per_frame >= 1
                  and (i % lay.tokens_per_frame - 1 + 1) % 2 != 0]
    assert sources_f1 and all(int(merged[i]) == 2 for i in sources_f1)


def test_merged_queries_are_member_means_and_protected_queries_exact():
    lay = layout(130, ref=0)
    q, k, v = qkv(lay, seed=5)
    q_red, rows = merge_queries_temporal(q, lay, 20, 2)
    for row in (lay.num_tokens // 3, lay.num_tokens - 1):
        members = (rows[0] == rows[0, row]).nonzero().flatten()
        assert torch.allclose(q_red[0, :, rows[0, row]], q[0, :, members].mean(1), atol=1e-6)
    op = paper_op(high=(0, 1, 2))  # at 130 frames: r_Q = 2, r_KV = ceil(130 / 40) = 4
    out = op(q, k, v, lay)
    index = stride_kv_index(lay, 4, "cpu")
    exact = exact_attention(q, k[:, :, index], v[:, :, index])
    protected = lay.protected_mask()
    assert torch.allclose(out[:, :, protected], exact[:, :, protected], atol=1e-5)


def test_stride_pruning_keeps_exactly_the_intended_frames():
    assert stride_kept_frames(10, 3, 0) == (0, 3, 6, 9)
    assert stride_kept_frames(10, 3, 4) == (0, 3, 4, 6, 9)
    assert stride_kept_frames(10, 3, None) == (0, 3, 6, 9)
    assert stride_kept_frames(5, 1, None) == (0, 1, 2, 3, 4)
    lay = layout(10, ref=4, special=2, grid=(2, 3))
    index = stride_kv_index(lay, 3, "cpu")
    frame, slot = index // lay.tokens_per_frame, index % lay.tokens_per_frame
    for f in range(10):
        kept_slots = sorted(slot[frame == f].tolist())
        assert kept_slots == (list(range(lay.tokens_per_frame)) if f in (0, 3, 4, 6, 9) else [0, 1])
    # The op attends over exactly those keys (a low-sensitivity layer at 10 frames: r_KV = 3).
    op = paper_op(high=())
    q, k, v = qkv(lay, seed=1)
    assert torch.equal(op(q, k, v, lay), exact_attention(q, k[:, :, index], v[:, :, index]))


def test_config_recipe_validation_and_tiers_files(tmp_path):
    with pytest.raises(ValueError, match="recipe"):
        Spark3RConfig(recipe="bogus")
    with pytest.raises(ValueError, match="query_keep"):
        Spark3RConfig(recipe="paper", query_keep=1)
    op = build_op("spark3r", 4, "vggt-tiny", recipe="paper")
    assert isinstance(op, Spark3RPaperOp) and op.schedule == default_tiers("vggt-tiny", 4)
    assert default_tiers("vggt-1b", 24).high_sensitivity == tuple(range(11, 17))
    assert default_tiers("pi3", 18).high_sensitivity == tuple(range(11, 17))
    path = save_tiers(LayerTiers((1,), 4, "vggt-tiny", meta={"x": 1}), tmp_path / "t.json")
    assert load_tiers(path).high_sensitivity == (1,) and load_tiers(path).meta == {"x": 1}
    assert build_op("spark3r", 4, None, recipe="paper", schedule=str(path)).schedule.high_sensitivity == (1,)
    with pytest.raises(ValueError, match="layers"):
        resolve_tiers(str(path), None, 6)
    from spark3r.accel.schedule import KVSchedule, save_schedule

    kv = save_schedule(KVSchedule((0.1,) * 4), tmp_path / "kv.json")
    with pytest.raises(ValueError, match="layer-tiers"):
        build_op("spark3r", 4, None, recipe="paper", schedule=str(kv))


def test_probe_classifies_a_synthetic_sensitivity_profile():
    sensitive = {2, 3, 5}

    def evaluate(factors):  # error grows with each layer's factor; sensitive layers 10x as much
        return 1.0 + sum((0.1 if i in sensitive else 0.001) * math.log2(f) for i, f in enumerate(factors))

    high, base, raised = probe_sensitivity(evaluate, 7, (32, 256), 1.05)
    assert set(high) == sensitive
    assert base == pytest.approx(1 + 3 * 0.5 + 4 * 0.005)
    assert classify_sensitivity(1.0, [1.0, 1.05, 1.0501, 2.0]) == (2, 3)  # strictly more than 1.05x
    with pytest.raises(ValueError, match="frames"):
        CalibrateConfig(recipe="paper", frames=8)  # a stride of 32 keeps only frame 0 at 8 frames


def test_calibrate_recipe_paper_writes_layer_tiers(tmp_path, capsys):
    import json

    from spark3r.cli import main

    out = tmp_path / "tiers.json"
    code = main(["calibrate", "--recipe", "paper", "--model", "vggt-tiny", "--frames", "5", "--size", "28x42",
                 "--probe-factors", "2,4", "--out", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    tiers = load_tiers(out)
    assert tiers.num_layers == 4 and report["layer_tiers"]["high_sensitivity"] == list(tiers.high_sensitivity)
    assert len(tiers.meta["raised_error"]) == 4 and tiers.meta["base_error"] > 0
    assert tiers.high_sensitivity == classify_sensitivity(tiers.meta["base_error"], tiers.meta["raised_error"])


def test_groups_smaller_than_the_factor_keep_one_query():
    lay = TokenLayout(frames=520, tokens_per_frame=3, special_tokens=1, grid=(1, 2), reference_frame=0)
    plan = group_plan(lay, 1, 4, "cpu")  # one frame of 2 patches per group, factor 4
    assert all(d.numel() >= 1 for d in plan.destinations)
    q, k, v = qkv(lay)
    out = paper.paper_attention(q, k, v, lay, 4, 1, 1)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_node_parameters_select_the_recipe_and_refuse_ours_only_fields():
    from spark3r.mapping.config import BackboneConfig

    config = BackboneConfig.from_flat({"reduction": "spark3r", "reduction.recipe": "paper",
                                       "reduction.temporal_group": 10})
    assert config.reduction_params == {"recipe": "paper", "temporal_group": 10}
    with pytest.raises(ValueError, match="reduction.query_keep=1.*recipe 'ours'"):
        BackboneConfig.from_flat({"reduction": "spark3r", "reduction.recipe": "paper", "reduction.query_keep": 1})
    with pytest.raises(ValueError, match="reduction.recipe"):
        BackboneConfig.from_flat({"reduction": "spark3r", "reduction.recipe": "published"})
