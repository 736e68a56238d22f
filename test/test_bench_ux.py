"""`spark3r calibrate` refuses an unreachable target before measuring; `spark3r bench` applies the
thread setting and writes strict JSON; `bench --stream --busy-core` runs every window beside a
competing busy process and cleans it up (a bench figure: no timing is asserted)."""
from __future__ import annotations

import json
import os

import pytest

from spark3r import threads
from spark3r.bench import calibrate as calibrate_mod
from spark3r.bench.runner import BenchConfig, run_bench
from spark3r.bench.stream import BusyCore, StreamBenchConfig, run_stream_bench
from spark3r.cli import main


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_calibrate_refuses_an_unreachable_target_before_measuring(tmp_path, capsys, monkeypatch):
    def no_measuring(cfg):
        raise AssertionError("calibrate loaded its inputs for measuring although the target is unreachable")

    monkeypatch.setattr(calibrate_mod, "load_inputs", no_measuring)
    out = tmp_path / "sched.json"
    code = main(["calibrate", "--model", "vggt-tiny", "--frames", "3", "--size", "56x70", "--target", "1000",
                 "--candidates", "0.1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--target 1000 cannot be reached" in err and "Nothing was measured" in err
    assert "lower --target to at most" in err and "layer 0:" not in err and not out.exists()


def test_bench_applies_the_thread_setting_and_reports_it():
    res = run_bench(BenchConfig("vggt-tiny", 50, (56, 70), flops_only=True, threads=1))
    env = res["environment"]
    assert env["threads"] == 1 and env["usable_cpus"] == threads.usable_cpus()
    assert env["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
    auto = run_bench(BenchConfig("vggt-tiny", 50, (56, 70), flops_only=True))  # threads 0 = auto
    assert auto["environment"]["threads"] == threads.default_threads()


def test_stream_bench_busy_core_times_every_window_twice_and_ends_the_competitor():
    cfg = StreamBenchConfig(window=3, stride=1, windows=1, methods=("dense",), image_hw=(28, 42), image_width=28,
                            threads=1, busy_core=True)
    result = run_stream_bench(cfg)
    _strict(json.dumps(result, allow_nan=False))
    assert result["environment"]["threads"] == 1 and result["config"]["busy_core"] is True
    for name in ("naive-dense", "dense"):
        entry = result["pipelines"][name]
        assert len(entry["busy_core_window_s"]) == len(entry["window_s"]) == 1
        assert entry["per_keyframe_busy_core_s"] > 0 and entry["busy_core_slowdown"] > 0
    with pytest.raises(ProcessLookupError):  # the competing process is gone, not left spinning
        os.kill(result["busy_core"]["pid"], 0)


def test_busy_core_process_burns_cpu_only_while_resumed():
    import time

    def cpu_seconds(pid: int) -> float:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("needs /proc")
    with BusyCore() as busy:
        time.sleep(0.3)
        paused = cpu_seconds(busy.pid)
        time.sleep(0.3)
        assert cpu_seconds(busy.pid) - paused < 0.05  # SIGSTOPped: no CPU
        busy.resume()
        time.sleep(0.5)
        busy.pause()
        assert cpu_seconds(busy.pid) - paused > 0.05  # running: it competes for a core
    assert busy.proc.returncode is not None


def test_every_bench_json_is_strict(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--flops-only", "--out", str(out)]) == 0
    assert _strict(capsys.readouterr().out) == _strict(out.read_text())
