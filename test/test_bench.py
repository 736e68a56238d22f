"""`spark3r bench` / `spark3r calibrate` on tiny sizes: well-formed JSON and files (no timing asserts)."""
from __future__ import annotations

import json

import pytest

from spark3r.accel import native
from spark3r.bench.runner import BenchConfig, run_bench
from spark3r.accel.schedule import load_schedule
from spark3r.cli import main


def test_bench_json_is_well_formed_on_the_tiny_preset(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--out", str(out), "--query-keep", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    data = json.loads(out.read_text())
    assert printed == data
    assert data["format"] == "spark3r-bench/1" and data["weights"].startswith("seeded-v1")
    assert list(data["methods"]) == ["dense", "uniform", "spark3r", "speed3r"]
    assert data["methods"]["spark3r"]["params"]["query_keep"] == 1
    for name, m in data["methods"].items():
        assert len(m["time_s"]["all"]) == 1 and m["time_s"]["min"] > 0
        assert m["flops"]["dense"] >= m["flops"]["method"] > 0
        assert m["flop_speedup"] == pytest.approx(m["flops"]["dense"] / m["flops"]["method"])
        assert m["amdahl_bound"] >= m["flop_speedup"]
        assert m["peak_memory_bytes"] >= 0
        assert set(m["fidelity"]) == {"depth_rel", "points_rel", "rotation_deg", "translation_rel"}
        op = m["attention_op"]
        assert op["efficiency"] == pytest.approx(op["speedup"] / op["flop_speedup"])
    assert all(v == 0 for v in data["methods"]["dense"]["fidelity"].values())
    assert data["methods"]["spark3r"]["fidelity"]["depth_rel"] > 0
    assert "RSS" in data["memory_measurement"]
    assert data["environment"]["native_merge_kernel"] is (native.load("pair_merge") is not None)
    assert data["environment"]["native_block_attention_kernel"] is (native.load("block_attention") is not None)


def test_flops_only_and_attention_scope():
    res = run_bench(BenchConfig("vggt-tiny", 50, (56, 70), flops_only=True))
    assert "note" in res and all(res["methods"][m]["flop_speedup"] > 1 for m in ("uniform", "spark3r"))
    assert "time_s" not in res["methods"]["spark3r"]
    att = run_bench(BenchConfig("vggt-tiny", 3, (56, 70), scope="attention", repeats=1))
    m = att["methods"]["spark3r"]
    assert m["flops"]["scope"] == "attention" and m["fidelity"]["attention_output_rel"] > 0
    assert att["attention_op"]["tokens"] == 75


def test_bench_rejects_bad_configuration(capsys):
    with pytest.raises(ValueError, match="scope"):
        BenchConfig("vggt-tiny", 2, (56, 70), scope="everything")
    with pytest.raises(ValueError, match="multiples of 14"):
        BenchConfig("vggt-tiny", 2, (50, 70))
    with pytest.raises(ValueError, match="unknown reduction method"):
        BenchConfig("vggt-tiny", 2, (56, 70), methods=("dense", "magic"))
    assert main(["bench", "--preset", "tiny", "--methods", "dense", "--ratio", "0.5"]) == 2
    assert "ratio" in capsys.readouterr().err


def test_calibrate_writes_a_loadable_schedule(tmp_path, capsys):
    out = tmp_path / "sched.json"
    code = main(["calibrate", "--model", "vggt-tiny", "--frames", "3", "--size", "56x70", "--target", "1.5",
                 "--candidates", "0.1", "--out", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    sched = load_schedule(out)
    assert sched.num_layers == 4 and sched.reference_frames == 3
    assert set(sched.kv_keep) <= {0.1, 1.0}
    assert report["achieved_global_attention_reduction"] >= 1.5
    assert len(sched.meta["output_error"]) == 4 and len(sched.meta["output_error"][0]) == 2
