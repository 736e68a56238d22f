"""``spark3r bench --quality``: reduction methods judged by reconstruction quality against ground
truth, side by side with their speed, at several frame counts.

For each frame count, ``sequences`` held-out sequences (images + ground-truth depth, poses and
intrinsics; any object with ``images`` uint8 ``[S, H, W, 3]``, ``depth [S, H, W]``, ``c2w
[S, 4, 4]``, ``K [3, 3]`` and ``stamps_ns`` — :class:`~spark3r.data.synthetic.SyntheticSequence`)
run through the model once per method variant (methods interleaved per repeat). Per variant:

* wall time (min over repeats, summed over the sequences) and the speedup vs dense; model FLOPs
  from the FLOP model (``flops.model_flops``: the op prices itself) and the FLOP speedup;
* quality, from the model's own :meth:`~spark3r.models.base.BackboneModel.decode` and the metrics
  of ``spark3r eval`` (``spark3r.eval``): pose AUC@30 (pairwise relative poses), ATE and RPE
  (translation, rotation) RMSE after a Sim(3) alignment of the camera centres, depth AbsRel and
  delta<1.25 (per-frame median scaling, as ``spark3r eval --depth-scale median``), and the
  point map's accuracy / completeness (mean nearest-neighbour distances) after the same Sim(3),
  the predicted depth unprojected with the predicted cameras against the ground-truth depth
  unprojected with the true ones (every ``cloud_stride``-th pixel);
* the change of every quality metric vs dense at the same frame count.

A method variant is ``NAME`` or ``NAME:FIELD=VALUE[:FIELD=VALUE...]`` (``spark3r:recipe=paper``),
so one run can hold the same method in two configurations. ``weights=PATH`` runs that variant on
another model: the checkpoint at PATH (a ``spark3r distill`` output folder or a weights file) in
its own preset, which must be the bench model's architecture and size, give or take Speed3R
gates — e.g. ``speed3r:weights=runs/nano-speed3r``, the distilled ``vggt-nano-speed3r``
student with its learned layer, next to ``speed3r`` (training-free) on the built-in vggt-nano.
The table names each variant's model. Results: JSON, a Markdown table and a PNG of quality loss
vs speedup per method.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from spark3r.accel.apply import METHODS, apply, build_op, make_config, remove
from spark3r.eval.cloud import cloud_metrics
from spark3r.eval.depth import aggregate, frame_depth_metrics
from spark3r.eval.pose import pairwise_pose_errors, pose_auc
from spark3r.eval.trajectory import evaluate_trajectory

from . import flops as flops_mod
from .runner import time_stats, timed

DATA_SOURCES = ("procedural", "synthetic")
DEFAULT_DATA = "procedural"  # held-out procedural scenes (the trained vggt-nano never saw them)
DEFAULT_MODEL = "vggt-nano"
DEFAULT_FRAMES = (16, 64, 256)
DEFAULT_SIZE = (112, 140)  # the nano model's input size (height x width)
# (metric, higher is better): what the table, the deltas and the plot report
QUALITY_METRICS = (("pose_auc_30", True), ("ate_rmse", False), ("rpe_translation_rmse", False),
                   ("rpe_rotation_deg_rmse", False), ("depth_abs_rel", False), ("depth_delta1", True),
                   ("cloud_accuracy", False), ("cloud_completeness", False))


# ---------------------------------------------------------------------------------------------
# Method variants


@dataclass(frozen=True)
class MethodVariant:
    label: str   # as given, e.g. "spark3r:recipe=paper"
    method: str
    params: dict = field(default_factory=dict)
    weights: Optional[str] = None  # another model for this variant (``weights=PATH``); None: the bench's


def _field_value(method: str, name: str, text: str):
    from .cli_args import _parse_bool, _parse_pair

    fields = {f.name: f for f in dataclasses.fields(METHODS[method].config_cls)}
    if name not in fields:
        raise ValueError(f"method {method!r} has no parameter {name!r} (it takes {sorted(fields) or 'none'})")
    default = fields[name].default
    try:
        if isinstance(default, bool):
            return _parse_bool(text)
        if isinstance(default, tuple):
            return _parse_pair(text)
        if isinstance(default, (int, float)):
            return type(default)(text)
    except Exception as e:  # argparse's error types and int()/float() errors alike
        raise ValueError(f"{method}:{name}={text!r}: {e}") from None
    return text


def parse_variants(text: str, common: Optional[dict] = None) -> list[MethodVariant]:
    """``"dense,spark3r,spark3r:recipe=paper"`` -> variants; ``common`` maps a method to the
    parameters every variant of it gets (the bench's per-method flags), which a variant's own
    ``FIELD=VALUE`` overrides."""
    common = common or {}
    out, seen = [], set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        method, *pairs = item.split(":")
        if method not in METHODS:
            raise ValueError(f"unknown reduction method {method!r} in {item!r}; known: {sorted(METHODS)}")
        params = dict(common.get(method, {}))
        weights = None
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"method variant {item!r}: expected FIELD=VALUE after ':', got {pair!r}")
            if name.strip() == "weights":
                weights = value.strip()
                if not weights or not Path(weights).expanduser().exists():
                    raise ValueError(f"method variant {item!r}: weights={weights!r} is not a file or folder")
                continue
            params[name.strip()] = _field_value(method, name.strip(), value.strip())
        make_config(method, **params)  # validates early, with the method's own message
        if item in seen:
            raise ValueError(f"method variant {item!r} is listed twice")
        seen.add(item)
        out.append(MethodVariant(item, method, params, weights))
    if not out:
        raise ValueError("give at least one method")
    return out


def default_variants_text() -> str:
    """dense, uniform, spark3r (ours), spark3r (paper recipe), and speed3r when registered."""
    names = ["dense", "uniform", "spark3r", "spark3r:recipe=paper"]
    return ",".join(names + (["speed3r"] if "speed3r" in METHODS else []))


# ---------------------------------------------------------------------------------------------
# Data


def load_sequences(data: str, frames: int, size: tuple[int, int], count: int, first_seed: int = 0) -> list:
    """``count`` sequences of ``frames`` frames at ``size`` (height, width) from ``data``."""
    h, w = size
    if data == "procedural":
        from spark3r.data.procedural import HELDOUT_SEED_LIMIT, render_procedural

        if not 0 <= first_seed or first_seed + count > HELDOUT_SEED_LIMIT:
            raise ValueError(f"procedural sequences for evaluation use the held-out seeds [0, {HELDOUT_SEED_LIMIT}); "
                             f"got {first_seed}..{first_seed + count - 1}")
        return [render_procedural(first_seed + i, frames, h, w) for i in range(count)]
    if data == "synthetic":
        from spark3r.data.synthetic import render_sequence

        motions = ("orbit", "forward")
        return [render_sequence(num_frames=frames, height=h, width=w, seed=first_seed + i,
                                trajectory=motions[(first_seed + i) % len(motions)]) for i in range(count)]
    raise ValueError(f"unknown quality data {data!r}; known: {DATA_SOURCES}")


# ---------------------------------------------------------------------------------------------
# Metrics (numpy, float64)


def unproject_depth(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray, stride: int = 1) -> np.ndarray:
    """World points ``[M, 3]`` of every ``stride``-th pixel with finite positive depth;
    ``depth [S, H, W]``, ``K [3, 3]`` or ``[S, 3, 3]`` (pixel centres at integer coordinates),
    ``c2w [S, 4, 4]``."""
    depth = np.asarray(depth, dtype=np.float64)[:, ::stride, ::stride]
    s, h, w = depth.shape
    K = np.broadcast_to(np.asarray(K, dtype=np.float64), (s, 3, 3))
    v, u = np.meshgrid(np.arange(h) * stride, np.arange(w) * stride, indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64)  # [h, w, 3]
    rays = np.einsum("sij,hwj->shwi", np.linalg.inv(K), pix)
    cam = rays * depth[..., None]
    world = np.einsum("sij,shwj->shwi", np.asarray(c2w, dtype=np.float64)[:, :3, :3], cam) \
        + np.asarray(c2w, dtype=np.float64)[:, None, None, :3, 3]
    valid = np.isfinite(depth) & (depth > 0)
    return world[valid]


@dataclass(frozen=True)
class Prediction:
    """One sequence's decoded predictions (numpy): c2w ``[S, 4, 4]``, K ``[S, 3, 3]``, depth ``[S, H, W]``."""

    c2w: np.ndarray
    K: np.ndarray
    depth: np.ndarray

    @classmethod
    def from_outputs(cls, decoded) -> "Prediction":
        """From :class:`~spark3r.models.base.BackboneOutputs` of one batch element."""
        if decoded.c2w is None or decoded.intrinsics is None or decoded.depth is None:
            raise ValueError("the quality bench needs camera and depth outputs from the model's decode()")
        return cls(decoded.c2w[0].double().cpu().numpy(), decoded.intrinsics[0].double().cpu().numpy(),
                   decoded.depth[0].double().cpu().numpy())


def sequence_metrics(pred: Prediction, seq, cloud_threshold: float = 0.05, cloud_stride: int = 2,
                     min_baseline: float = 0.05) -> dict:
    """Every quality metric of one sequence (see the module docstring); ``None`` for a metric that
    cannot be computed (e.g. no valid predicted depth), with the reason under ``errors``."""
    stamps = np.asarray(seq.stamps_ns, dtype=np.int64)
    res: dict[str, Any] = {}
    errors = {}
    r_err, t_err = pairwise_pose_errors(pred.c2w, seq.c2w, min_baseline)
    res["pose_auc_30"] = pose_auc(r_err, t_err, 30)
    alignment = None
    try:
        trajectory = evaluate_trajectory(stamps, pred.c2w, stamps, np.asarray(seq.c2w), alignment="sim3")
        summary = trajectory.summary()
        res["ate_rmse"] = summary["ate_m"]["rmse"]
        res["rpe_translation_rmse"] = summary["rpe"]["translation_m"].get("rmse")
        res["rpe_rotation_deg_rmse"] = summary["rpe"]["rotation_deg"].get("rmse")
        alignment = trajectory.alignment
    except (ValueError, np.linalg.LinAlgError) as e:
        errors["trajectory"] = str(e)
    depth = aggregate([frame_depth_metrics(p, g, scale="median") for p, g in zip(pred.depth, np.asarray(seq.depth))])
    res["depth_abs_rel"] = depth.get("abs_rel")
    res["depth_delta1"] = depth.get("delta1")
    if not depth.get("frames"):
        errors["depth"] = "no frame has valid predicted and ground-truth depth"
    if alignment is not None:
        try:
            est = alignment.apply(unproject_depth(pred.depth, pred.K, pred.c2w, cloud_stride))
            ref = unproject_depth(seq.depth, seq.K, seq.c2w, cloud_stride)
            cloud = cloud_metrics(est, ref, cloud_threshold)
            res["cloud_accuracy"], res["cloud_completeness"] = cloud["accuracy_mean"], cloud["completeness_mean"]
            res["cloud_fscore"] = cloud["fscore"]
        except ValueError as e:
            errors["cloud"] = str(e)
    for name, _ in QUALITY_METRICS:
        value = res.get(name)
        res[name] = None if value is None or not math.isfinite(value) else float(value)
    if errors:
        res["errors"] = errors
    return res


def mean_metrics(per_sequence: list[dict]) -> dict:
    """Mean of each metric over the sequences where it is defined (None if nowhere)."""
    out = {}
    for name, _ in QUALITY_METRICS:
        values = [m[name] for m in per_sequence if m.get(name) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def quality_change(method: dict, dense: dict) -> dict:
    """``method - dense`` per metric (None where either is undefined)."""
    return {name: (None if method.get(name) is None or dense.get(name) is None else method[name] - dense[name])
            for name, _ in QUALITY_METRICS}


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class QualityConfig:
    model: str = DEFAULT_MODEL
    checkpoint: Optional[str] = None  # None: the weights shipped in the package (vggt-nano), else seeded-v1
    data: str = DEFAULT_DATA
    frames: tuple[int, ...] = DEFAULT_FRAMES
    size: tuple[int, int] = DEFAULT_SIZE
    sequences: int = 1
    first_seed: int = 0
    methods: str = field(default_factory=default_variants_text)
    method_params: dict = field(default_factory=dict)  # method -> {param: value} for all its variants
    repeats: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None
    cloud_threshold: float = 0.05
    cloud_stride: int = 2
    flops: bool = True  # FLOP model per variant (a few seconds per frame count on first use)

    def __post_init__(self) -> None:
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        self.frames = tuple(int(f) for f in self.frames)
        if not self.frames or min(self.frames) < 3:
            raise ValueError(f"frames must be frame counts >= 3 (a Sim(3) alignment needs 3 poses), got {self.frames}")
        if len(self.size) != 2 or min(self.size) < 14 or self.size[0] % 14 or self.size[1] % 14:
            raise ValueError(f"size must be (height, width), positive multiples of 14, got {self.size}")
        for name in ("sequences", "repeats", "cloud_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.cloud_threshold) and self.cloud_threshold > 0):
            raise ValueError(f"cloud_threshold must be a positive distance, got {self.cloud_threshold}")
        self.variants = parse_variants(self.methods, self.method_params)
        from spark3r.models.registry import preset_class

        supported = getattr(preset_class(self.model), "supported_accel_methods", None)
        refused = sorted({v.method for v in self.variants} - set(supported)) if supported is not None else []
        if refused:
            raise ValueError(f"{self.model} supports only the methods {list(supported)} (--methods), not {refused}")
        unknown = set(self.method_params) - {v.method for v in self.variants}
        if unknown:
            raise ValueError(f"parameters given for methods not being run: {sorted(unknown)}")


def _load_model(cfg: QualityConfig):
    from spark3r.models import load_pretrained
    from spark3r.models.registry import inference_overrides

    from spark3r.models.registry import DEFAULT_SOURCES

    source = cfg.checkpoint or ("builtin" if DEFAULT_SOURCES.get(cfg.model) == "builtin" else "seeded")
    model = load_pretrained(cfg.model, source, device=torch.device(cfg.device),
                            dtype=getattr(torch, cfg.dtype), **inference_overrides(cfg.model)).eval()
    return model, {"seeded": "seeded-v1 (synthetic)", "builtin": "built-in (shipped, trained here)"}.get(
        source, f"checkpoint {source}")


def _gate_free_shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".attn.gate." not in k}


def load_variant_model(cfg: QualityConfig, weights: str, bench_model):
    """The model of a ``weights=PATH`` variant: PATH in the preset its ``config.json`` names (a
    ``spark3r distill`` output) or, failing that, the preset its entries match; it must be the
    bench model's architecture and size apart from Speed3R gates. Returns ``(model, preset)``."""
    from spark3r.models.checkpoints import checkpoint_shapes, guess_preset, load_pretrained, preset_from_hf_config
    from spark3r.models.registry import inference_overrides

    path = Path(weights).expanduser()
    preset = preset_from_hf_config(path) if path.is_dir() else None
    if preset is None:
        guess = guess_preset(checkpoint_shapes(path))
        if guess is None:
            raise ValueError(f"weights={weights}: not a checkpoint of any spark3r preset")
        preset = guess[0]
    model = load_pretrained(preset, str(path), device=torch.device(cfg.device), dtype=getattr(torch, cfg.dtype),
                            **inference_overrides(preset)).eval()
    want, have = _gate_free_shapes(bench_model), _gate_free_shapes(model)
    if want != have:
        differ = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise ValueError(f"weights={weights} holds a {preset} model, not the bench model {cfg.model} (+ Speed3R gates): "
                         f"{len(differ)} entries differ, e.g. {differ[:3]}; run the bench with the --model it was "
                         f"distilled from")
    return model, preset


def variant_description(variant: MethodVariant, model) -> str:
    """What model and mode a variant runs, for the table: e.g. ``training-free`` for speed3r on a
    model without gates, ``vggt-nano-speed3r, learned`` for a distilled student."""
    gated = any(getattr(m, "gate", None) is not None for m in model.global_attention_modules())
    if variant.method == "speed3r":
        mode = "learned" if gated else "training-free"
        return f"{model.preset}, {mode}" if variant.weights else mode
    return f"{model.preset} weights" if variant.weights else ""


def run_quality(cfg: QualityConfig, log=None, predictions: Optional[dict] = None) -> dict:
    """Run the quality benchmark; JSON-ready result. ``predictions``, if given, receives every
    :class:`Prediction` and sequence as ``{(frames, label, index): (prediction, sequence)}``."""
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    model, weights = _load_model(cfg)
    h, w = cfg.size
    variants = cfg.variants
    if "dense" not in [v.label for v in variants]:
        variants = [MethodVariant("dense", "dense")] + variants
    num_layers = len(model.global_attention_modules())
    models = {v.label: model for v in variants}
    presets = {v.label: cfg.model for v in variants}
    for v in variants:
        if v.weights is not None:
            models[v.label], presets[v.label] = load_variant_model(cfg, v.weights, model)
    result: dict[str, Any] = {
        "format": "spark3r-quality-bench/1",
        "config": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "method_params"},
                   "size": list(cfg.size), "frames": list(cfg.frames), "methods": [v.label for v in variants],
                   "method_params": {m: {k: str(x) for k, x in p.items()} for m, p in cfg.method_params.items()}},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                        "dtype": cfg.dtype},
        "weights": weights, "data": cfg.data, "frame_counts": {},
    }
    for frames in cfg.frames:
        seqs = load_sequences(cfg.data, frames, cfg.size, cfg.sequences, cfg.first_seed)
        images = [torch.from_numpy(s.images).permute(0, 3, 1, 2).to(device, getattr(torch, cfg.dtype)) / 255.0
                  for s in seqs]
        times = {v.label: [[] for _ in seqs] for v in variants}
        cpu = {v.label: [[] for _ in seqs] for v in variants}  # steadier than wall time on a shared machine
        outputs: dict[str, list] = {v.label: [None] * len(seqs) for v in variants}
        with torch.inference_mode():
            for r in range(cfg.repeats):
                for v in variants:
                    run = models[v.label]
                    apply(run, v.method, **v.params)
                    try:
                        for i, x in enumerate(images):
                            t, out = timed(lambda: run(x), device, cpu[v.label][i])
                            times[v.label][i].append(t)
                            if r == 0:
                                outputs[v.label][i] = Prediction.from_outputs(run.decode(out, (h, w)))
                    finally:
                        remove(run)
        entry: dict[str, Any] = {"sequences": [getattr(s, "seed", i) for i, s in enumerate(seqs)], "methods": {}}
        dense_time = sum(min(t) for t in times["dense"])
        dense_cpu = sum(min(t) for t in cpu["dense"])
        if cfg.flops:  # the non-global part once per frame count; each op prices its global layers
            dense_flops = flops_mod.model_flops(model, None, frames, h, w)
            non_global = dense_flops["dense"] - dense_flops["global_attention_dense"]
            geometry = flops_mod.model_geometry(model, frames, h, w)
        for v in variants:
            per_seq = [sequence_metrics(p, s, cfg.cloud_threshold, cfg.cloud_stride) for p, s in zip(outputs[v.label], seqs)]
            if predictions is not None:
                for i, (p, s) in enumerate(zip(outputs[v.label], seqs)):
                    predictions[(frames, v.label, i)] = (p, s)
            total = sum(min(t) for t in times[v.label])
            m: dict[str, Any] = {"method": v.method, "params": {k: str(x) for k, x in v.params.items()},
                                 "model": {"preset": presets[v.label], "weights": v.weights or weights,
                                           "description": variant_description(v, models[v.label])},
                                 "time_s": {"total_min": total, "per_sequence": [time_stats(t) for t in times[v.label]]},
                                 "cpu_time_s": {"total_min": sum(min(t) for t in cpu[v.label])},
                                 "speedup_vs_dense": dense_time / total,
                                 "cpu_time_speedup_vs_dense": dense_cpu / sum(min(t) for t in cpu[v.label]),
                                 "quality": mean_metrics(per_seq),
                                 "per_sequence": per_seq}
            if cfg.flops:
                attention = flops_mod.global_attention_flops(build_op(v.method, num_layers, cfg.model, **v.params),
                                                             geometry)["total"]
                m["flops"] = {"model": non_global + attention, "model_dense": dense_flops["dense"],
                              "global_attention": attention,
                              "global_attention_dense": dense_flops["global_attention_dense"]}
                m["flop_speedup"] = dense_flops["dense"] / m["flops"]["model"]
            entry["methods"][v.label] = m
        dense_q = entry["methods"]["dense"]["quality"]
        for m in entry["methods"].values():
            m["change_vs_dense"] = quality_change(m["quality"], dense_q)
        result["frame_counts"][str(frames)] = entry
        if log:
            log(f"{frames} frames: " + ", ".join(f"{k} {e['speedup_vs_dense']:.2f}x" for k, e in entry["methods"].items()))
    return result


# ---------------------------------------------------------------------------------------------
# Reports


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def quality_table(result: dict) -> str:
    """Markdown: one row per (frame count, method): speed, FLOPs and quality with the change vs dense."""
    head = ["frames", "method", "wall / CPU-time speedup", "FLOP speedup", "model GFLOPs"] + [n for n, _ in QUALITY_METRICS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for frames, entry in result["frame_counts"].items():
        for label, m in entry["methods"].items():
            about = m.get("model", {}).get("description")
            name = f"`{label}`" + (f" ({about})" if about else "")
            cells = [frames, name, f"{m['speedup_vs_dense']:.2f}× / {m['cpu_time_speedup_vs_dense']:.2f}×", _fmt(m.get("flop_speedup"), ".2f"),
                     _fmt(m["flops"]["model"] / 1e9 if "flops" in m else None, ".3g")]
            for name, _ in QUALITY_METRICS:
                value, change = m["quality"][name], m["change_vs_dense"][name]
                cells.append(_fmt(value) + ("" if label == "dense" or change is None else f" ({change:+.2g})"))
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def quality_loss(change: dict, name: str, higher_is_better: bool) -> Optional[float]:
    """Loss vs dense in the metric's bad direction (positive = worse than dense)."""
    c = change.get(name)
    return None if c is None else (-c if higher_is_better else c)


def plot_quality_vs_speedup(result: dict, path, metrics=(("pose_auc_30", True), ("ate_rmse", False),
                                                         ("depth_abs_rel", False), ("cloud_accuracy", False))) -> Path:
    """One panel per metric: quality loss vs dense (y) against wall speedup (x, log), a line per
    method through its frame counts (annotated)."""
    from spark3r.eval.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    try:
        labels = list(next(iter(result["frame_counts"].values()))["methods"])
        for ax, (name, higher) in zip(axes[0], metrics):
            for label in labels:
                xs, ys, ns = [], [], []
                for frames, entry in result["frame_counts"].items():
                    m = entry["methods"].get(label)
                    loss = None if m is None else quality_loss(m["change_vs_dense"], name, higher)
                    if loss is not None:
                        xs.append(m["speedup_vs_dense"])
                        ys.append(loss)
                        ns.append(frames)
                if xs:
                    ax.plot(xs, ys, "-o", ms=4, label=label)
                    for x, y, n in zip(xs, ys, ns):
                        ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("wall speedup vs dense")
            ax.set_ylabel(f"{name} loss vs dense" + (" (drop)" if higher else " (increase)"))
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"quality loss vs speedup ({result['config']['model']}, {result['weights']}, "
                     f"labels = frames)", fontsize=9)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_reports(result: dict, out_dir) -> dict:
    """``quality.json``, ``quality.md`` and ``quality.png`` into ``out_dir``; returns their paths."""
    import json

    from spark3r.data.io import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "table": out / "quality.md", "plot": out / "quality.png"}
    with atomic_write(paths["json"], "w") as fh:
        json.dump(result, fh, indent=1)
    with atomic_write(paths["table"], "w") as fh:
        fh.write(quality_table(result))
    plot_quality_vs_speedup(result, paths["plot"])
    return {k: str(p) for k, p in paths.items()}


# ---------------------------------------------------------------------------------------------
# CLI (``spark3r bench --quality``)


def add_quality_arguments(p) -> None:
    g = p.add_argument_group("quality (--quality): methods vs ground truth at several frame counts")
    g.add_argument("--quality", action="store_true", help="run the quality benchmark instead")
    g.add_argument("--frame-counts", help=f"comma-separated frame counts (default {','.join(map(str, DEFAULT_FRAMES))})")
    g.add_argument("--sequences", type=int, default=1, help="held-out sequences per frame count (default 1)")
    g.add_argument("--data", default=DEFAULT_DATA, choices=DATA_SOURCES,
                   help=f"where the sequences come from: held-out procedural scenes or the synthetic room (default {DEFAULT_DATA})")
    g.add_argument("--first-seed", type=int, default=0, help="seed of the first sequence")
    g.add_argument("--cloud-threshold", type=float, default=0.05, help="precision/recall distance of the point maps")


def run_quality_from_args(args) -> int:
    import json
    import sys

    from .cli_args import method_params, parse_size

    if args.flops_only:
        raise ValueError("--flops-only does not combine with --quality (quality needs the runs)")
    methods = args.methods or default_variants_text()
    method_names = {item.split(":")[0].strip() for item in methods.split(",") if item.strip()}
    frames = tuple(int(f) for f in args.frame_counts.split(",")) if args.frame_counts else DEFAULT_FRAMES
    cfg = QualityConfig(model=args.model or DEFAULT_MODEL, checkpoint=args.checkpoint, data=args.data, frames=frames,
                        size=parse_size(args.size) if args.size else DEFAULT_SIZE, sequences=args.sequences,
                        first_seed=args.first_seed, methods=methods, method_params=method_params(args, method_names),
                        repeats=args.repeats or 1, device=args.device or "cpu", dtype=args.dtype or "float32",
                        threads=args.threads, cloud_threshold=args.cloud_threshold)
    start = time.perf_counter()
    result = run_quality(cfg, log=lambda s: print(s, file=sys.stderr))
    result["elapsed_s"] = time.perf_counter() - start
    if args.out:
        result["reports"] = write_reports(result, args.out)
    print(json.dumps(result, indent=1))
    if args.table:
        print(quality_table(result), file=sys.stderr)
    return 0
