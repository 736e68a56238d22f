"""``spark3r bench``: run several reduction methods in one process on the same input and weights.

Per method it reports wall time (min/median over repeats, methods interleaved so background load
hits all alike), speedup vs dense, analytic FLOPs (scope and global attention) with the
FLOP-model speedup and the Amdahl bound, peak memory, fidelity vs dense, and — measured on the
q/k/v of one real global layer captured during the dense run — the attention op's own speedup and
its efficiency (measured speedup / FLOP-model speedup, overheads included).

Weights are seeded-v1 (deterministic synthetic, ``spark3r.models.seeded``) unless a checkpoint is given;
with synthetic weights the fidelity numbers say how much a method perturbs *this* network, not
how good real reconstructions are.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from spark3r.accel import native
from spark3r.accel.apply import apply, build_op, make_config, remove
from spark3r.accel.common import relative_error
from spark3r.models.base import BackboneOutputs
from spark3r.models.camera import invert_rigid
from spark3r.models.layers.layout import TokenLayout
from spark3r.threads import apply_threads, resolve_threads, usable_cpus

from . import flops as flops_mod


@dataclass(frozen=True)
class BenchPreset:
    model: str
    frames: int
    size: tuple[int, int]  # (height, width)
    scope: str = "model"
    methods: tuple[str, ...] = ("dense", "uniform", "spark3r", "speed3r")
    repeats: int = 2
    flops_only: bool = False
    note: str = ""


PRESETS: dict[str, BenchPreset] = {
    # ~1 minute on 2 CPU cores: the whole model, 8 frames of 518x392 (8328 tokens per global layer).
    "cpu-quick": BenchPreset("vggt-tiny", 8, (392, 518), "model", repeats=2,
                             note="vggt-tiny, seeded-v1 weights, full model"),
    # The attention op alone at VGGT-1B head shape (16 x 64), 16 frames of 518x392 (16656 tokens).
    "cpu-attn": BenchPreset("vggt-1b", 16, (392, 518), "attention", repeats=5,
                            note="one global layer of VGGT-1B shape on synthetic q/k/v"),
    # Seconds: for tests and smoke runs.
    "tiny": BenchPreset("vggt-tiny", 2, (56, 70), "model", repeats=1, note="smoke test size"),
    # The paper's headline size, FLOPs only.
    "flops-1000": BenchPreset("vggt-1b", 1000, (392, 518), "model", flops_only=True,
                              note="VGGT-1B, 1000 frames of 518x392, analytic FLOPs only"),
    # Speed3R's headline size: the learned Speed3R-π3 vs its dense form, FLOPs only.
    "flops-1024-speed3r": BenchPreset("pi3-speed3r", 1024, (336, 504), "model", methods=("dense", "speed3r"),
                                      flops_only=True, note="pi3-speed3r, 1024 frames of 504x336, analytic FLOPs only"),
}

SCOPES = ("attention", "aggregator", "model")


# ---------------------------------------------------------------------------------------------
# Measurement helpers


class PeakMemory:
    """Peak memory while the block runs. CUDA: ``max_memory_allocated`` over the block. CPU: the
    process's resident set size sampled every 2 ms by a thread, minus the RSS at the start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    @property
    def how(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the run minus allocated before"
        return "process RSS high-water (sampled every 2 ms from /proc/self/statm) minus RSS before the run"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss()
            self._high = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._high = max(self._high, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._high = max(self._high, _rss())
            self.peak_bytes = self._high - self._base


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime high-water mark
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, cpu_times: Optional[list] = None) -> tuple[float, Any]:
    """Wall time of ``fn()``; the process CPU time (all threads) is appended to ``cpu_times`` —
    on a shared machine it is far less disturbed by other processes than wall time."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    t = time.perf_counter() - t0
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c0)
    return t, out


def time_stats(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "all": times}


# ---------------------------------------------------------------------------------------------
# Fidelity


def _rotation_angle_deg(r: torch.Tensor) -> torch.Tensor:
    cos = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def fidelity(out: BackboneOutputs, ref: BackboneOutputs) -> dict:
    """Errors of decoded model outputs vs the decoded dense outputs (float64, averaged over
    frames/pixels): ``depth_rel``, ``points_rel`` (where the model predicts world points),
    ``rotation_deg`` and ``translation_rel`` of the world-to-camera poses. Any backbone: both
    sides come from its own :meth:`~spark3r.models.base.BackboneModel.decode`."""
    res: dict[str, float] = {}
    if out.depth is not None and ref.depth is not None:
        d, dr = out.depth.double(), ref.depth.double()
        res["depth_rel"] = float(((d - dr).abs() / dr.abs().clamp_min(1e-12)).mean())
    if out.points is not None and ref.points is not None:
        p, pr = out.points.double(), ref.points.double()
        res["points_rel"] = float((p - pr).norm(dim=-1).mean() / pr.norm(dim=-1).mean().clamp_min(1e-12))
    if out.c2w is not None and ref.c2w is not None:
        e, er = invert_rigid(out.c2w.double()), invert_rigid(ref.c2w.double())
        rel = e[..., :3, :3] @ er[..., :3, :3].transpose(-1, -2)
        res["rotation_deg"] = float(_rotation_angle_deg(rel).mean())
        t, tr = e[..., :3, 3], er[..., :3, 3]
        res["translation_rel"] = float((t - tr).norm(dim=-1).mean() / tr.norm(dim=-1).mean().clamp_min(1e-12))
    return res


# ---------------------------------------------------------------------------------------------
# Synthetic q/k/v for the attention scope


def synthetic_qkv(layout: TokenLayout, heads: int, head_dim: int, seed: int = 0, device="cpu",
                  dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v shaped and strided like a real global layer: smooth over the patch grid (neighbours
    similar, as in real images), a per-frame component, LayerNorm'd q/k (qk-norm), and v a strided
    view into a fused qkv tensor (as the model's projection produces it)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = layout.grid
    s, p = layout.frames, layout.tokens_per_frame

    def field_():
        coarse = torch.randn(heads, s, (rows + 1) // 2, (cols + 1) // 2, head_dim, generator=g)
        fine = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :rows, :cols]
        patches = fine + 0.5 * torch.randn(fine.shape, generator=g)
        special = torch.randn(heads, s, layout.special_tokens, head_dim, generator=g)
        x = torch.cat((special, patches.reshape(heads, s, rows * cols, head_dim)), 2)
        x = x + torch.randn(heads, s, 1, head_dim, generator=g)
        return x.reshape(heads, s * p, head_dim)

    qkv = torch.stack([field_() for _ in range(3)]).permute(0, 2, 1, 3)  # [3, N, H, d]
    qkv = qkv.reshape(1, s * p, 3, heads, head_dim).to(device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = torch.nn.functional.layer_norm(q, (head_dim,))
    k = torch.nn.functional.layer_norm(k, (head_dim,))
    return q, k, v


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class BenchConfig:
    model: str
    frames: int
    size: tuple[int, int]
    scope: str = "model"
    methods: tuple[str, ...] = ("dense", "uniform", "spark3r", "speed3r")
    method_params: dict = field(default_factory=dict)  # method -> {param: value}
    repeats: int = 2
    flops_only: bool = False
    threads: int = 0  # 0 = auto (spark3r.threads.default_threads)
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint: Optional[str] = None
    seed: int = 0
    layer: Optional[int] = None  # attention-op layer (default: the middle global layer)
    preset: Optional[str] = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if len(self.size) != 2 or min(self.size) < 14 or self.size[0] % 14 or self.size[1] % 14:
            raise ValueError(f"size must be (height, width), positive multiples of 14, got {self.size}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.methods:
            raise ValueError("give at least one method")
        for m in self.methods:
            make_config(m, **self.method_params.get(m, {}))  # validates names and parameters early
        unknown = set(self.method_params) - set(self.methods)
        if unknown:
            raise ValueError(f"parameters given for methods not being run: {sorted(unknown)}")
        from spark3r.models.registry import preset_class

        supported = getattr(preset_class(self.model), "supported_accel_methods", None)
        if supported is not None and set(self.methods) - set(supported):
            raise ValueError(f"{self.model} supports only the methods {list(supported)} (--methods), "
                             f"not {sorted(set(self.methods) - set(supported))}")


def config_from_preset(name: str, **overrides) -> BenchConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown bench preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    base = dict(model=p.model, frames=p.frames, size=p.size, scope=p.scope, methods=p.methods,
                repeats=p.repeats, flops_only=p.flops_only, preset=name)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**base)


def _build_model(cfg: BenchConfig, device, dtype, meta: bool = False):
    from spark3r.models import build_model, load_pretrained
    from spark3r.models.registry import inference_overrides

    if meta:
        return build_model(cfg.model, device="meta", **inference_overrides(cfg.model))
    model = load_pretrained(cfg.model, cfg.checkpoint or "seeded", device=device, dtype=dtype,
                            **inference_overrides(cfg.model))
    weights = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else "seeded-v1 (synthetic)"
    return model.eval(), weights


class _Capture:
    """Global op that keeps q/k/v of one layer (for the op-level timing) and runs dense."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.qkv = None
        self.layout = None

    def __call__(self, q, k, v, layout, scale=None):
        if layout.layer == self.layer:
            self.qkv = (q.clone(), k.clone(), v)
            self.layout = layout
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _op_timing(cfg: BenchConfig, ops: dict, q, k, v, layout: TokenLayout, device) -> dict:
    """Time each method's op on the same q/k/v (interleaved repeats) and compare with its
    closed-form FLOP speedup for this layer."""
    heads, head_dim = q.shape[1], q.shape[3]
    reference = ops["dense"](q, k, v, layout)
    times: dict[str, list[float]] = {m: [] for m in ops}
    cpu: dict[str, list[float]] = {m: [] for m in ops}
    outputs = {}
    for m, op in ops.items():  # warm-up (allocator, caches)
        outputs[m] = op(q, k, v, layout)
    for _ in range(max(3, cfg.repeats)):
        for m, op in ops.items():
            t, _ = timed(lambda: op(q, k, v, layout), device, cpu[m])
            times[m].append(t)
    dense_flops = flops_mod.layer_flops(None, layout, heads, head_dim)["total"]
    res = {}
    for m, op in ops.items():
        lf = flops_mod.layer_flops(op, layout, heads, head_dim)
        speed = min(times["dense"]) / min(times[m])
        flop_speed = dense_flops / lf["total"]
        res[m] = {
            "time_s": time_stats(times[m]),
            "cpu_time_s": time_stats(cpu[m]),
            "speedup": speed,
            "cpu_time_speedup": min(cpu["dense"]) / min(cpu[m]),
            "flops": lf["total"], "flops_overhead": lf["overhead"], "queries": lf["queries"], "keys": lf["keys"],
            "flop_speedup": flop_speed,
            "efficiency": speed / flop_speed,
            "cpu_time_efficiency": min(cpu["dense"]) / min(cpu[m]) / flop_speed,
            "output_rel_error": relative_error(outputs[m], reference),
        }
    return {"layer": layout.layer, "tokens": layout.num_tokens, "heads": heads, "head_dim": head_dim, "methods": res}


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark and return the JSON-ready result."""
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    threads = apply_threads(resolve_threads(cfg.threads))
    h, w = cfg.size
    result: dict[str, Any] = {
        "format": "spark3r-bench/1",
        "preset": cfg.preset,
        "config": {**dataclasses.asdict(cfg), "size": list(cfg.size), "methods": list(cfg.methods)},
        "environment": {"torch": torch.__version__, "threads": threads, "usable_cpus": usable_cpus(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "device": str(device),
                        "dtype": cfg.dtype,
                        # whether spark3r's fused CPU merge kernel could be built (else eager PyTorch)
                        "native_merge_kernel": device.type == "cpu" and native.load("pair_merge") is not None,
                        # the same for speed3r's fused block-attention kernel
                        "native_block_attention_kernel": device.type == "cpu"
                        and native.load("block_attention") is not None},
        "methods": {},
    }

    meta_model = _build_model(cfg, device, dtype, meta=True)
    num_layers = len(meta_model.global_attention_modules())
    ops = {m: build_op(m, num_layers, cfg.model, **cfg.method_params.get(m, {})) for m in cfg.methods}
    if "dense" not in ops:
        ops = {"dense": build_op("dense", num_layers, cfg.model), **ops}
    geometry = flops_mod.model_geometry(meta_model, cfg.frames, h, w)
    layer = cfg.layer if cfg.layer is not None else num_layers // 2
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in 0..{num_layers - 1}, got {layer}")
    flop_scope = "aggregator" if cfg.scope == "aggregator" else "model"
    for m in cfg.methods:
        entry: dict[str, Any] = {"params": _params(ops[m])}
        if cfg.scope == "attention":
            lay = geometry.layouts[layer]
            lf = flops_mod.layer_flops(ops[m], lay, geometry.heads, geometry.head_dim)
            dense_lf = flops_mod.layer_flops(None, lay, geometry.heads, geometry.head_dim)
            entry["flops"] = {"scope": "attention", "layer": layer, "dense": dense_lf["total"], "method": lf["total"],
                              "overhead": lf["overhead"], "queries": lf["queries"], "keys": lf["keys"]}
            entry["flop_speedup"] = dense_lf["total"] / lf["total"]
        else:
            mf = flops_mod.model_flops(meta_model, ops[m], cfg.frames, h, w, scope=flop_scope)
            entry["flops"] = mf
            entry["flop_speedup"] = mf["speedup"]
            entry["amdahl_bound"] = mf["amdahl_bound"]
        result["methods"][m] = entry
    if cfg.flops_only:
        result["note"] = "flops-only: nothing was run"
        return result

    if cfg.scope == "attention":
        lay = geometry.layouts[layer]
        q, k, v = synthetic_qkv(lay, geometry.heads, geometry.head_dim, cfg.seed, device, dtype)
        result["weights"] = "synthetic q/k/v (spatially smooth, qk-normed); fidelity = op output error"
        with torch.inference_mode():
            timing = _op_timing(cfg, ops, q, k, v, lay, device)
        for m in cfg.methods:
            t = timing["methods"][m]
            result["methods"][m].update(time_s=t["time_s"], cpu_time_s=t["cpu_time_s"], speedup_vs_dense=t["speedup"],
                                        cpu_time_speedup_vs_dense=t["cpu_time_speedup"], efficiency=t["efficiency"],
                                        fidelity={"attention_output_rel": t["output_rel_error"]})
        result["attention_op"] = timing
        return result

    model, weights = _build_model(cfg, device, dtype)
    result["weights"] = weights
    from .calibrate import CalibrateConfig, load_inputs

    images, source = load_inputs(CalibrateConfig(frames=max(2, cfg.frames), size=(h, w), seed=cfg.seed))
    images = images[: cfg.frames].to(device, dtype)
    result["inputs"] = source

    def forward():
        if cfg.scope == "aggregator":
            tokens = model.encode_patches(images)
            p = model.config.patch_size
            return {"aggregator": model.aggregate(tokens, (h // p, w // p))[-1]}
        return model(images)

    times: dict[str, list[float]] = {m: [] for m in cfg.methods}
    cpu: dict[str, list[float]] = {m: [] for m in cfg.methods}
    memory: dict[str, int] = {}
    outputs: dict[str, dict] = {}
    capture = _Capture(layer)
    with torch.inference_mode():
        modules = model.global_attention_modules()
        for m in modules:  # the first dense run also captures one layer's q/k/v
            m.global_op = capture
        ref = forward()
        remove(model)
        for r in range(cfg.repeats):
            for m in cfg.methods:
                apply(model, m, **cfg.method_params.get(m, {}))
                with PeakMemory(device) as pm:
                    t, out = timed(forward, device, cpu[m])
                remove(model)
                times[m].append(t)
                memory[m] = max(memory.get(m, 0), pm.peak_bytes)
                if r == 0:
                    outputs[m] = out
        timing = _op_timing(cfg, ops, *capture.qkv, capture.layout, device)
    dense_min = min(times["dense"]) if "dense" in times else None
    for m in cfg.methods:
        e = result["methods"][m]
        e["time_s"] = time_stats(times[m])
        e["cpu_time_s"] = time_stats(cpu[m])
        if dense_min is not None:
            e["speedup_vs_dense"] = dense_min / min(times[m])
            e["cpu_time_speedup_vs_dense"] = min(cpu["dense"]) / min(cpu[m])
            e["efficiency"] = e["speedup_vs_dense"] / e["flop_speedup"]
        e["peak_memory_bytes"] = memory[m]
        if cfg.scope == "aggregator":
            e["fidelity"] = {"aggregator_rel": relative_error(outputs[m]["aggregator"], ref["aggregator"])}
        else:
            e["fidelity"] = fidelity(model.decode(outputs[m], (h, w)), model.decode(ref, (h, w)))
        e["attention_op"] = timing["methods"][m]
    result["memory_measurement"] = PeakMemory(device).how
    result["attention_op"] = {k: v for k, v in timing.items() if k != "methods"}
    return result


def _params(op) -> dict:
    cfg = op.config
    d = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        d[f.name] = v if isinstance(v, (int, float, str, bool, type(None), tuple, list)) else str(v)
    if hasattr(op, "schedule"):
        d["schedule"] = op.schedule.to_dict()
    return d


def summary_table(result: dict) -> str:
    """A Markdown table of the main numbers (for the README / terminal)."""
    rows = ["| method | wall min / median (s) | speedup (wall / CPU time) | FLOP speedup | efficiency | attn-op speedup / FLOP / eff. | fidelity |",
            "|---|---|---|---|---|---|---|"]
    for m, e in result["methods"].items():
        t = e.get("time_s")
        op = e.get("attention_op") or {}
        fid = ", ".join(f"{k} {v:.3g}" for k, v in (e.get("fidelity") or {}).items())
        times = "%.2f / %.2f" % (t["min"], t["median"]) if t else "-"
        op_text = "%.2f / %.2f / %.2f" % (op["speedup"], op["flop_speedup"], op["efficiency"]) if op else "-"
        rows.append(f"| {m} | {times} | {e.get('speedup_vs_dense', float('nan')):.2f} / "
                    f"{e.get('cpu_time_speedup_vs_dense', float('nan')):.2f} | {e['flop_speedup']:.2f} | "
                    f"{e.get('efficiency', float('nan')):.2f} | {op_text} | {fid} |")
    return "\n".join(rows)
