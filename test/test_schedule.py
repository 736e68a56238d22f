"""Schedule files: budget rule, round trip, defaults, validation."""
from __future__ import annotations

import json

import pytest

from spark3r.accel.schedule import (FORMAT, KVSchedule, default_schedule, load_schedule, resolve_schedule,
                                    save_schedule)


def test_round_trip_is_exact(tmp_path):
    sched = KVSchedule((0.05, 0.2, 1.0, 0.125), reference_frames=12, decay=0.7, min_per_frame=3, backbone="vggt-tiny",
                       note="x", meta={"output_error": [[0.1, 0.2]], "weights": "seeded"})
    path = save_schedule(sched, tmp_path / "s.json")
    back = load_schedule(path)
    assert back == sched and back.meta == sched.meta
    assert json.loads(path.read_text())["format"] == FORMAT
    assert load_schedule(save_schedule(back, tmp_path / "t.json")).to_dict() == sched.to_dict()


def test_budget_rule():
    s = KVSchedule((0.2, 1.0, 0.001), reference_frames=16, decay=0.5, min_per_frame=8)
    p = 1036
    assert s.kv_budget(0, 8, p) == round(0.2 * p)        # at or below the reference frame count
    assert s.kv_budget(0, 16, p) == round(0.2 * p)
    assert s.kv_budget(0, 64, p) == round(0.2 * p * 0.5)  # sqrt(16/64) = 0.5
    assert s.kv_budget(1, 1000, p) == p and not s.prunes(1)  # keep >= 1: never pruned
    assert s.kv_budget(2, 8, p) == 8                       # floor: every view keeps some keys
    assert s.kv_budget(0, 10, 20) <= 20
    budgets = [s.kv_budget(0, f, p) for f in (16, 32, 100, 1000)]
    assert budgets == sorted(budgets, reverse=True)
    const_total = KVSchedule((0.2,), reference_frames=16, decay=1.0, min_per_frame=1)
    assert abs(const_total.kv_budget(0, 160, 1000) * 160 - 0.2 * 1000 * 16) <= 160


def test_defaults_and_resolution(tmp_path):
    d = default_schedule("vggt-1b")
    assert d.num_layers == 24 and all(0 < k < 1 for k in d.kv_keep)
    mid, ends = d.kv_keep[12], (d.kv_keep[0], d.kv_keep[-1])
    assert mid > max(ends)  # middle layers (cross-view alignment) get the largest budget
    assert default_schedule("vggt-tiny").num_layers == 4
    assert resolve_schedule(None, "vggt-1b", 24) == d
    assert resolve_schedule(None, "unknown-backbone", 7).num_layers == 7
    path = save_schedule(KVSchedule((0.1, 0.2)), tmp_path / "two.json")
    assert resolve_schedule(str(path), None, 2).kv_keep == (0.1, 0.2)
    with pytest.raises(ValueError, match="2 layers but the model has 4"):
        resolve_schedule(str(path), None, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_keep=()), "empty"),
    (dict(kv_keep=(0.1, -1.0)), "> 0"),
    (dict(kv_keep=(0.1,), decay=2.0), "decay"),
    (dict(kv_keep=(0.1,), min_per_frame=0), "min_per_frame"),
    (dict(kv_keep=(0.1,), reference_frames=0), "reference_frames"),
])
def test_invalid_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVSchedule(**kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_schedule(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedule(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else", "kv_keep": [0.1]}))
    with pytest.raises(ValueError, match="format"):
        load_schedule(tmp_path / "other.json")
    (tmp_path / "extra.json").write_text(json.dumps({"format": FORMAT, "kv_keep": [0.1], "typo_field": 1}))
    with pytest.raises(ValueError, match="typo_field"):
        load_schedule(tmp_path / "extra.json")
    with pytest.raises(ValueError, match="layer 3"):
        KVSchedule((0.1, 0.2)).kv_budget(3, 8, 100)
