"""Token reduction tooling on the π3 and DA3 presets: default schedules, the FLOP model, `spark3r
bench` (every method) and `spark3r calibrate`."""
from __future__ import annotations

import pytest
import torch

from spark3r import accel
from spark3r.bench.runner import config_from_preset, run_bench
from spark3r.bench.calibrate import CalibrateConfig, calibrate
from spark3r.bench.flops import model_flops
from spark3r.accel.schedule import default_schedule
from spark3r.models import build_model

NEW_PRESETS = {"pi3": 18, "pi3-tiny": 2, "da3-small": 4, "da3-base": 4, "da3-large": 8, "da3-giant": 14}


@pytest.mark.parametrize("preset, layers", sorted(NEW_PRESETS.items()))
def test_default_schedule_covers_the_global_layers(preset, layers):
    model = build_model(preset, device="meta")
    assert len(model.global_attention_modules()) == layers
    assert default_schedule(preset).num_layers == layers
    handle = accel.apply(model, "spark3r")
    assert handle.reduced_layers == tuple(range(layers)) and handle.op.schedule.backbone == preset


@pytest.mark.parametrize("preset", ["pi3", "da3-small", "da3-giant"])
def test_flop_model_counts_the_big_presets_at_1000_frames(preset):
    model = build_model(preset, device="meta")
    op = accel.build_op("spark3r", len(model.global_attention_modules()), preset)
    flops = model_flops(model, op, 1000, 392, 518)
    assert flops["global_attention_share"] > 0.5  # at 1000 frames global attention dominates
    assert 10 < flops["speedup"] < flops["amdahl_bound"]


@pytest.mark.parametrize("preset", ["pi3-tiny", "da3-small"])
def test_bench_runs_every_method(preset):
    torch.manual_seed(0)
    result = run_bench(config_from_preset("tiny", model=preset, frames=3, size=(28, 42), repeats=1))
    assert set(result["methods"]) == {"dense", "uniform", "spark3r"}
    for name, entry in result["methods"].items():
        fid = entry["fidelity"]
        assert {"depth_rel", "rotation_deg", "translation_rel"} <= set(fid), (name, fid)
        if name == "dense":
            assert fid["depth_rel"] == 0.0 and fid["translation_rel"] == 0.0
        else:
            assert 0.0 < fid["depth_rel"] < 1.0 and entry["flop_speedup"] >= 1.0
    if preset.startswith("pi3"):
        assert "points_rel" in result["methods"]["spark3r"]["fidelity"]


def test_calibrate_writes_a_schedule_for_da3():
    schedule, report = calibrate(CalibrateConfig(model="da3-small", frames=3, size=(56, 70), candidates=(0.2,), target=1.1),
                                 log=lambda s: None)
    assert schedule.num_layers == 4 and schedule.backbone == "da3-small"
    assert report["achieved_global_attention_reduction"] >= 1.1
    assert len(schedule.meta["output_error"]) == 4
