"""``spark3r bench --stream --backend``: the back end's per-keyframe cost report runs and says
what it measured (the numbers themselves are for a quiet machine, not for asserts)."""
import json

from spark3r.bench.backend import backend_stream_benchmark
from spark3r.cli import main


def test_backend_stream_benchmark_reports_buckets_loops_and_memory():
    r = backend_stream_benchmark(num_keyframes=80, bucket=20, frames_per_lap=30)
    assert r["benchmark"] == "backend_stream" and [b["keyframes"] for b in r["buckets"]] == [20, 40, 60, 80]
    for b in r["buckets"]:
        assert b["backend_s_per_keyframe_mean"] > 0 and b["rss_mib"] > 0 and b["voxel_map_s_per_keyframe_mean"] >= 0
    assert r["totals"]["graph_nodes"] == 80 and r["totals"]["loops_accepted"] >= 1   # the stream revisits its start
    assert r["cost_growth"]["keyframes_ratio"] == 4.0


def test_bench_cli_stream_backend_prints_json(tmp_path, capsys):
    out = tmp_path / "backend.json"
    assert main(["bench", "--stream", "--backend", "--keyframes", "40", "--bucket", "20", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["keyframes"] == 40
