"""``spark3r bench --stream``: per-keyframe cost of the node's streaming pipeline.

The node runs the backbone on a sliding window of ``window`` keyframes every ``stride`` new
keyframes. Its pipeline keeps the patch embeddings of keyframes already seen (encoder cache)
and runs global attention with the chosen token reduction. The naive alternative re-runs the
dense model on every whole window. Both are measured in one process on the same synthetic
sequence and weights: the per-keyframe cost is a window's wall time / ``stride`` (each window
adds ``stride`` keyframes), over the steady-state windows (the first window, which fills the
cache, is reported separately). Methods and the naive baseline are interleaved window by window
so background load hits all alike. Fidelity: depth of each method relative to the naive dense
result on the same window (synthetic weights: how much a method perturbs *this* network).

``--busy-core`` (:class:`BusyCore`): the same windows are also run while a competing process
keeps one core busy, as a camera driver or another node does on a robot. Every pipeline has a
twin (same model, own encoder cache) that sees the same windows; per window the pipeline runs
with the competitor paused (SIGSTOP) and its twin with it running (SIGCONT), so background load
hits both alike. ``busy_core_slowdown`` = busy / idle per-keyframe time; with the default thread
count (spark3r/threads.py: usable cores - 1) it should stay near 1 (the issue-16 target: below
1.5); with ``--threads`` = all cores it shows what oversubscription costs. A bench figure, not
a test: it depends on the machine.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from spark3r.data import strict_json
from spark3r.threads import apply_threads, resolve_threads, usable_cpus


@dataclass(frozen=True)
class StreamBenchConfig:
    backbone: str = "vggt-tiny"
    checkpoint: str = ""           # empty = seeded-v1 synthetic weights
    window: int = 32
    stride: int = 8
    windows: int = 3               # timed windows after the first (cache-filling) one
    methods: tuple[str, ...] = ("dense", "uniform", "spark3r")
    method_params: dict = field(default_factory=dict)
    image_hw: tuple[int, int] = (120, 160)
    image_width: int = 112         # network input width
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0               # 0 = auto (spark3r.threads.default_threads)
    seed: int = 0
    busy_core: bool = False        # also time each window with one core kept busy by another process

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window >= 2):
            raise ValueError(f"window must be an integer >= 2, got {self.window!r}")
        if not (isinstance(self.stride, int) and 1 <= self.stride < self.window):
            raise ValueError(f"stride must be an integer in [1, window - 1] = [1, {self.window - 1}], got {self.stride!r}")
        if not (isinstance(self.windows, int) and self.windows >= 1):
            raise ValueError(f"windows must be an integer >= 1, got {self.windows!r}")
        if not self.methods:
            raise ValueError("methods must name at least one reduction method")


def _backbone(cfg: StreamBenchConfig, reduction: str, cache: bool):
    from spark3r.mapping import BackboneConfig
    from spark3r.mapping.model_backbone import ModelBackbone

    bcfg = BackboneConfig(backbone=cfg.backbone, checkpoint=cfg.checkpoint or "seeded", device=cfg.device,
                          dtype=cfg.dtype, reduction=reduction, reduction_params=dict(cfg.method_params.get(reduction, {})),
                          image_width=cfg.image_width)
    built = ModelBackbone.from_config(bcfg, cfg.window, cfg.stride)  # "seeded": the weights `spark3r bench` uses
    if cache:
        return built
    return ModelBackbone(built.model, image_width=cfg.image_width, cache_max_frames=0, device=cfg.device)


def _twin(backbone):
    """A second pipeline on the same model (reduction included) with its own encoder cache."""
    from spark3r.mapping.model_backbone import ModelBackbone

    cache = backbone.cache.max_frames if backbone.cache is not None else 0
    return ModelBackbone(backbone.model, image_width=backbone.image_width, cache_max_frames=cache,
                         device=backbone.device)


class BusyCore:
    """A competing process that keeps one core busy while resumed (a pure-Python spin loop,
    placed by the OS scheduler like any other load). Starts paused; a context manager that
    always ends the process."""

    SETTLE_S = 0.05  # let the scheduler place the resumed process before timing

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pause()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        time.sleep(self.SETTLE_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "BusyCore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _windows(cfg: StreamBenchConfig, keyframes: list) -> list[list]:
    """The windows the mapper runs: the first ``window`` keyframes, then every ``stride`` more."""
    out = []
    end = cfg.window
    while end <= len(keyframes) and len(out) < cfg.windows + 1:
        out.append(keyframes[end - cfg.window:end])
        end += cfg.stride
    return out


def run_stream_bench(cfg: StreamBenchConfig) -> dict:
    from contextlib import nullcontext

    from spark3r.data.synthetic import render_sequence
    from spark3r.mapping import Keyframe

    threads = apply_threads(resolve_threads(cfg.threads))
    n = cfg.window + cfg.windows * cfg.stride
    seq = render_sequence(num_frames=n, height=cfg.image_hw[0], width=cfg.image_hw[1], seed=cfg.seed)
    keyframes = [Keyframe(i, int(seq.stamps_ns[i]), seq.images[i], None) for i in range(n)]
    windows = _windows(cfg, keyframes)
    pipelines = {"naive-dense": _backbone(cfg, "dense", cache=False)}
    pipelines.update({m: _backbone(cfg, m, cache=True) for m in cfg.methods})
    twins = {name: _twin(bb) for name, bb in pipelines.items()} if cfg.busy_core else {}
    times = {name: [] for name in pipelines}
    busy_times = {name: [] for name in twins}
    depth_err = {name: [] for name in pipelines}
    previous_ids: set[int] = set()
    with BusyCore() if cfg.busy_core else nullcontext() as busy:
        busy_pid = busy.pid if busy is not None else None
        for w in windows:
            ids = {kf.id for kf in w}
            reference = None
            for name, bb in pipelines.items():  # interleaved per window
                bb.forget(sorted(previous_ids - ids))  # what the mapper tells the backbone
                t0 = time.perf_counter()
                pred = bb.predict(w)
                times[name].append(time.perf_counter() - t0)
                if name == "naive-dense":
                    reference = pred.depth
                else:
                    rel = np.abs(pred.depth - reference) / np.maximum(np.abs(reference), 1e-6)
                    depth_err[name].append(float(np.median(rel)))
                if busy is not None:
                    twin = twins[name]
                    twin.forget(sorted(previous_ids - ids))
                    busy.resume()
                    try:
                        t0 = time.perf_counter()
                        twin.predict(w)
                        busy_times[name].append(time.perf_counter() - t0)
                    finally:
                        busy.pause()
            previous_ids = ids
    result = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
              "weights": cfg.checkpoint or "seeded-v1 (synthetic)",
              "environment": {"threads": threads, "usable_cpus": usable_cpus(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "pipelines": {}}
    if busy_pid is not None:
        result["busy_core"] = {"competing_processes": 1, "pid": busy_pid,
                               "what": "a pure-Python spin loop, resumed only while the twin pipelines run"}
    naive_steady = statistics.median(times["naive-dense"][1:]) / cfg.stride
    for name, t in times.items():
        steady = statistics.median(t[1:]) / cfg.stride
        entry = {"encoder_cache": name != "naive-dense", "reduction": "dense" if name == "naive-dense" else name,
                 "first_window_s": t[0], "window_s": t[1:], "per_keyframe_s": steady,
                 "speedup_vs_naive": naive_steady / steady if steady > 0 else None}
        if depth_err[name]:
            entry["depth_median_rel_diff_vs_naive"] = float(np.median(depth_err[name]))
        if name in busy_times:
            busy_steady = statistics.median(busy_times[name][1:]) / cfg.stride
            entry.update(busy_core_window_s=busy_times[name][1:], per_keyframe_busy_core_s=busy_steady,
                         busy_core_slowdown=busy_steady / steady if steady > 0 else None)
        result["pipelines"][name] = entry
    return result


def add_stream_arguments(p) -> None:
    """Options of ``spark3r bench --stream`` beyond the bench's own (--model, --methods, ...)."""
    g = p.add_argument_group("streaming (--stream): per-keyframe cost, encoder cache + reduction vs naive dense")
    g.add_argument("--stream", action="store_true", help="measure the node's streaming pipeline instead")
    g.add_argument("--window", type=int, default=32, help="keyframes per window (default 32)")
    g.add_argument("--stride", type=int, default=8, help="new keyframes per window (default 8)")
    g.add_argument("--stream-windows", type=int, default=3, help="timed windows after the first")
    g.add_argument("--image-width", type=int, default=112, help="network input width (multiple of 14)")
    g.add_argument("--busy-core", action="store_true",
                   help="also time every window while another process keeps one core busy (busy_core_slowdown "
                        "per pipeline; compare --threads values)")
    g.add_argument("--backend", action="store_true",
                   help="with --stream: the SLAM back end's per-keyframe cost and RSS over a long keyframe stream "
                        "(a cheap test double stands in for the model; see spark3r/bench/backend.py)")
    g.add_argument("--keyframes", type=int, default=2000, help="--backend: keyframes in the stream (default 2000)")
    g.add_argument("--bucket", type=int, default=200, help="--backend: keyframes per reported bucket (default 200)")


def stream_config_from_args(args, methods, method_params) -> StreamBenchConfig:
    return StreamBenchConfig(backbone=args.model or "vggt-tiny", checkpoint=args.checkpoint or "", window=args.window,
                             stride=args.stride, windows=args.stream_windows, methods=tuple(methods or ("dense", "uniform", "spark3r")),
                             method_params=method_params or {}, image_width=args.image_width, device=args.device or "cpu",
                             dtype=args.dtype or "float32", threads=args.threads or 0, seed=args.seed or 0,
                             busy_core=bool(getattr(args, "busy_core", False)))


def run_stream_from_args(args) -> int:
    """``spark3r bench --stream``: run, print the JSON, optionally write it to ``--out``."""
    from pathlib import Path

    from .cli_args import method_params

    if args.backend:
        from .backend import backend_stream_benchmark

        result = backend_stream_benchmark(args.keyframes, args.bucket, seed=args.seed or 0)
        text = strict_json.dumps(result, indent=1)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        return 0
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else ("dense", "uniform", "spark3r")
    result = run_stream_bench(stream_config_from_args(args, methods, method_params(args, methods)))
    text = strict_json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
