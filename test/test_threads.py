"""CPU threads on a shared machine (spark3r/threads.py): OpenMP's passive waiting is in place
before torch loads OpenMP in every entry point, the default count leaves a core to the rest,
and a count applies to the thread that runs inference."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from spark3r import threads

REPO = Path(__file__).resolve().parents[1]


def _openmp_settings(code: str, **env_overrides) -> dict:
    """OpenMP's settings as libgomp reports them when torch loads it in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **env_overrides)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    settings = {}
    for line in proc.stderr.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep:
            settings[name] = value.strip("'")
    if "GOMP_SPINCOUNT" not in settings:
        pytest.skip("torch's OpenMP runtime is not libgomp (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")
    return settings


@pytest.mark.parametrize("entry", ["spark3r.cli", "spark3r_ros.mapping_node"])
def test_entry_points_make_openmp_wait_passively(entry):
    settings = _openmp_settings(f"import {entry}; import torch; torch.ones(64, 64) @ torch.ones(64, 64)")
    assert settings["GOMP_SPINCOUNT"] == "0"  # idle threads sleep at once instead of spinning


def test_without_spark3r_first_openmp_spins():
    """Why the entry points matter: torch imported first reads the environment without it."""
    settings = _openmp_settings("import torch, os; import spark3r; print(os.environ['OMP_WAIT_POLICY'])")
    assert int(settings["GOMP_SPINCOUNT"]) > 0


def test_a_users_wait_policy_is_kept():
    settings = _openmp_settings("import spark3r, torch", OMP_WAIT_POLICY="ACTIVE")
    assert settings["OMP_WAIT_POLICY"] == "ACTIVE" and int(settings["GOMP_SPINCOUNT"]) > 0
    assert threads.prefer_passive_waiting({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert threads.prefer_passive_waiting({}) == "PASSIVE"


def test_default_leaves_a_core_to_the_rest():
    assert threads.default_threads(cpus=1) == 1
    assert threads.default_threads(cpus=2) == 1
    assert threads.default_threads(cpus=16) == 15
    assert threads.default_threads(cpus=16, reserved=3) == 13
    assert threads.resolve_threads(0) == threads.default_threads() == max(1, threads.usable_cpus() - 1)
    assert threads.resolve_threads(3) == 3
    for bad in (-1, 1.5, True, "2", threads.MAX_THREADS + 1):
        with pytest.raises(ValueError, match=r"threads must be an integer in \[0, 1024\]"):
            threads.resolve_threads(bad)


def test_usable_cpus_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from spark3r import threads; print(threads.usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1", out.stderr
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert threads._cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) is None
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 0.5)
    assert threads.usable_cpus() == 1


def test_the_count_applies_to_the_calling_thread_only():
    """torch.set_num_threads from one thread does not resize another thread's OpenMP team; hence
    apply_threads runs in the inference thread itself."""
    main_before = torch.get_num_threads()
    seen = {}

    def worker():
        seen["applied"] = threads.apply_threads(1)
        seen["in_worker"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"applied": 1, "in_worker": 1}
    if main_before > 1:
        assert torch.get_num_threads() == main_before  # the main thread's team kept its size


def test_model_backbone_runs_its_forward_with_the_configured_count_in_the_calling_thread():
    """The node's worker (here: a fresh thread whose team size is something else) gets the
    configured count for the encoder and the forward, and reports what it used."""
    from spark3r.data.synthetic import render_sequence
    from spark3r.mapping import BackboneConfig, Keyframe
    from spark3r.mapping.model_backbone import ModelBackbone

    backbone = ModelBackbone.from_config(BackboneConfig(backbone="vggt-tiny", checkpoint="seeded", image_width=28,
                                                        threads=1), window_size=2, window_stride=1)
    assert backbone.threads == 1 and backbone.threads_used is None
    during = []
    backbone.model.register_forward_pre_hook(lambda module, args: during.append(torch.get_num_threads()))
    seq = render_sequence(num_frames=2, height=28, width=42, seed=0)
    window = [Keyframe(i, int(seq.stamps_ns[i]), seq.images[i]) for i in range(2)]
    seen = {}

    def worker():
        torch.set_num_threads(3)  # what this thread would use otherwise
        backbone.predict(window)
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=worker, name="spark3r_mapping_worker")
    t.start()
    t.join()
    assert during and set(during) == {1} and backbone.threads_used == 1 and seen["after"] == 1
    auto = ModelBackbone(backbone.model, image_width=28, cache_max_frames=0)
    assert auto.threads == threads.default_threads()
