"""Methods applied to a real backbone (vggt-tiny, seeded-v1 weights) and the FLOP model."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spark3r.accel import KVSchedule, TokenLayout, apply, build_op, remove
from spark3r.accel.spark3r import spark3r_overhead_flops, spark3r_sizes
from spark3r.bench.flops import dense_attention_flops, global_attention_flops, model_flops, model_geometry
from spark3r.models import build_model
from spark3r.seeded import load_seeded_v1

SIZE = (56, 70)  # 4 x 5 patches


@pytest.fixture(scope="module")
def model():
    return load_seeded_v1(build_model("vggt-tiny", enable_track=False))


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, *SIZE, generator=torch.Generator().manual_seed(0))


def run(model, images):
    with torch.inference_mode():
        return model(images)


def test_factor_one_is_bitwise_dense_through_the_model(model, images):
    ref = run(model, images)
    for method, params in (("dense", {}), ("uniform", {"ratio": 0.0}),
                           ("spark3r", {"query_keep": 4, "schedule": KVSchedule((1.0,) * 4)})):
        handle = apply(model, method, **params)
        assert handle.reduced_layers == ()
        assert all(m.global_op is None for m in model.global_attention_modules())
        out = run(model, images)
        remove(model)
        for key in ("pose_enc", "depth", "world_points"):
            assert torch.equal(out[key], ref[key]), (method, key)


def test_layers_without_effect_are_untouched_and_remove_restores(model, images):
    ref = run(model, images)
    sched = KVSchedule((0.3, 1.0, 0.3, 1.0))
    handle = apply(model, "spark3r", query_keep=4, schedule=sched)
    mods = model.global_attention_modules()
    assert handle.reduced_layers == (0, 2)
    assert mods[1].global_op is None and mods[3].global_op is None
    assert mods[0].global_op is handle.op and mods[2].global_op is handle.op
    reduced = run(model, images)
    assert not torch.equal(reduced["depth"], ref["depth"])
    remove(model)
    assert all(m.global_op is None for m in mods)
    assert torch.equal(run(model, images)["depth"], ref["depth"])


def test_default_spark3r_and_uniform_run_and_stay_close(model, images):
    ref = run(model, images)
    for method in ("spark3r", "uniform"):
        apply(model, method)
        out = run(model, images)
        remove(model)
        assert out["depth"].shape == ref["depth"].shape
        assert torch.isfinite(out["depth"]).all()
        rel = float(((out["depth"] - ref["depth"]).abs() / ref["depth"]).mean())
        assert 0 < rel < 0.2, (method, rel)


def test_apply_rejects_non_backbones_and_wrong_schedules(model):
    with pytest.raises(TypeError, match="global_attention_modules"):
        apply(torch.nn.Linear(2, 2), "spark3r")
    with pytest.raises(ValueError, match="2 layers but the model has 4"):
        apply(model, "spark3r", schedule=KVSchedule((0.1, 0.2)))


def test_dense_attention_closed_form_matches_flop_counter():
    q = torch.empty(2, 3, 123, 16, device="meta")
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == dense_attention_flops(123, 3, 16, batch=2)


def test_model_flops_closed_form_matches_flop_counter_at_four_frames(model):
    meta = build_model("vggt-tiny", device="meta", enable_track=False).requires_grad_(False)
    with FlopCounterMode(display=False) as fc:
        meta(torch.empty(4, 3, *SIZE, device="meta"))
    report = model_flops(model, None, 4, *SIZE)
    assert report["dense"] == fc.get_total_flops()  # quadratic fit from 1-3 frames, checked at 4
    geo = model_geometry(model, 4, *SIZE)
    assert len(geo.layouts) == 4 and (geo.heads, geo.head_dim) == (6, 64)
    assert report["global_attention_dense"] == 4 * dense_attention_flops(4 * 25, 6, 64)


def test_reduced_flops_count_the_attention_the_op_runs(model):
    op = build_op("spark3r", 4, "vggt-tiny")
    geo = model_geometry(model, 6, 112, 140)
    report = global_attention_flops(op, geo)
    expected = 0
    for lay in geo.layouts:
        nq, nk = spark3r_sizes(lay, op.config, op.budget(lay))
        expected += 4 * geo.heads * nq * nk * geo.head_dim
        expected += spark3r_overhead_flops(lay, op.config, op.budget(lay), geo.heads, geo.head_dim)
        cost = op.attention_flops(lay, geo.heads, geo.head_dim)
        assert (cost.queries, cost.keys) == (nq, nk) and nk < lay.num_tokens
    assert report["total"] == expected
    assert report["overhead"] > 0 and report["total"] < global_attention_flops(None, geo)["total"]


def test_default_schedule_reaches_28x_model_flops_at_1000_frames():
    m = build_model("vggt-1b", device="meta", enable_track=False)
    r = model_flops(m, build_op("spark3r", 24, "vggt-1b"), 1000, 392, 518)
    assert r["speedup"] >= 28.0, r["speedup"]
    assert r["global_attention_share"] > 0.95
    assert r["speedup"] < r["amdahl_bound"]
