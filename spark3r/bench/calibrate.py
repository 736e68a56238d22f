"""``spark3r calibrate``: measure each global layer's sensitivity to K/V pruning on your own images
and weights, then allocate the K/V budget across layers for a target attention-FLOP reduction.

Procedure (``frames`` images at ``size``):

1. One dense forward gives the reference outputs.
2. For every global layer l and every candidate keep fraction c, Spark3R is applied to layer l
   alone (its query merging + K/V budget round(P*c)); all other layers stay dense. Recorded:
   the relative error of that layer's attention output (on the dense forward's own q/k/v) and the
   error of the final outputs vs dense: ``depth_rel + points_rel + translation_rel +
   rotation (rad)`` (the fidelity metrics of ``spark3r bench``).
3. Allocation: each layer picks one candidate (1.0 = no K/V pruning) so that the summed output
   error is smallest while the global-attention FLOPs (closed form, overheads included, at
   ``frames``) stay within ``dense / target``. Solved by a Lagrangian sweep: for a price lambda
   every layer minimises ``error + lambda * flops`` independently; the smallest lambda meeting the
   budget is found by bisection.
4. The schedule (``reference_frames = frames``; larger windows shrink budgets by ``decay``) is
   written as JSON with the measurements under ``meta``.

``--recipe paper`` runs the paper recipe's one-time probe instead (:func:`probe_sensitivity`):
every layer at K/V factor ``probe_factors[0]`` (32) gives the base error vs dense; then each
layer in turn at ``probe_factors[1]`` (256) with the others at the base. A layer whose error
grows by more than ``sensitivity_threshold`` (1.05x) is high-sensitivity; the layer tiers are
written as JSON (``spark3r-layer-tiers/1``) with the measured errors under ``meta``. The factors
are temporal strides, so the probe needs more frames than the base factor (otherwise both
settings keep only frame 0's keys); use smaller ``--probe-factors`` for short inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from spark3r.accel.apply import global_modules, remove
from spark3r.accel.common import exact_attention, relative_error
from spark3r.accel.schedule import KVSchedule, LayerTiers, save_schedule, save_tiers
from spark3r.accel.spark3r import KV_SCORES, RECIPES, Spark3RConfig, Spark3ROp
from spark3r.accel.spark3r_paper import Spark3RPaperOp
from spark3r.data import strict_json
from spark3r.models.base import BackboneOutputs
from spark3r.threads import add_threads_argument, apply_threads, resolve_threads

from . import flops as flops_mod
from .runner import fidelity

DEFAULT_CANDIDATES = (0.03, 0.06, 0.1, 0.2, 0.35, 1.0)
PROBE_FACTORS = (32, 256)  # the paper's probe: base K/V factor, raised factor
SENSITIVITY_THRESHOLD = 1.05


@dataclass
class CalibrateConfig:
    model: str = "vggt-tiny"
    checkpoint: Optional[str] = None
    images: Optional[str] = None  # folder of images; None = a synthetic room sequence
    frames: int = 8
    size: tuple[int, int] = (392, 518)
    target: float = 8.0  # global-attention FLOP reduction at `frames`
    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    query_group: tuple[int, int] = (2, 2)
    query_keep: int = 2
    kv_score: str = "query_mean"
    kv_compensation: bool = True
    decay: float = 0.5
    min_per_frame: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    recipe: str = "ours"  # "paper": the two-tier probe instead of the budget allocation
    probe_factors: tuple[int, int] = PROBE_FACTORS
    sensitivity_threshold: float = SENSITIVITY_THRESHOLD

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        base, raised = (int(f) for f in self.probe_factors)
        if not 1 <= base < raised:
            raise ValueError(f"probe_factors must be (base, raised) with 1 <= base < raised, got {self.probe_factors}")
        if self.recipe == "paper" and self.frames <= base:
            raise ValueError(f"the probe strides keys/values over time: with {self.frames} frames a base factor of "
                             f"{base} keeps only frame 0 either way; give more than {base} frames or smaller "
                             f"--probe-factors")
        if not self.sensitivity_threshold > 1:
            raise ValueError(f"sensitivity_threshold must be > 1 (an error ratio), got {self.sensitivity_threshold}")
        if self.target < 1:
            raise ValueError(f"target (global-attention FLOP reduction) must be >= 1, got {self.target}")
        cands = tuple(sorted(set(float(c) for c in self.candidates)))
        if not cands or cands[0] <= 0:
            raise ValueError(f"candidates must be keep fractions > 0, got {self.candidates}")
        if cands[-1] < 1.0:
            cands = cands + (1.0,)  # "no pruning" is always an option
        self.candidates = cands
        if self.frames < 2:
            raise ValueError(f"calibration needs at least 2 frames (one reference + one reduced), got {self.frames}")


def load_inputs(cfg: CalibrateConfig) -> tuple[torch.Tensor, str]:
    """``[S, 3, H, W]`` in [0, 1] and a description of where they came from."""
    h, w = cfg.size
    if cfg.images:
        from spark3r.models.preprocess import list_images, load_images

        paths = list_images(cfg.images)
        if len(paths) < cfg.frames:
            raise ValueError(f"{cfg.images} has {len(paths)} images; calibration asked for {cfg.frames}")
        pick = [paths[round(i * (len(paths) - 1) / max(1, cfg.frames - 1))] for i in range(cfg.frames)]
        imgs = load_images(pick, mode="crop", target_size=w)
        if imgs.shape[-2:] != (h, w):
            imgs = torch.nn.functional.interpolate(imgs, size=(h, w), mode="bilinear", align_corners=False)
        return imgs, f"{cfg.frames} images from {cfg.images}"
    from spark3r.data.synthetic import render_sequence

    seq = render_sequence(num_frames=cfg.frames, height=h, width=w, seed=cfg.seed)
    imgs = torch.from_numpy(seq.images).permute(0, 3, 1, 2).float() / 255.0
    return imgs, f"{cfg.frames} frames of the synthetic room sequence (seed {cfg.seed})"


def output_error(out: BackboneOutputs, ref: BackboneOutputs) -> tuple[float, dict]:
    """One number per run: the sum of the bench's fidelity metrics (rotation in radians)."""
    fid = fidelity(out, ref)
    total = (fid.get("depth_rel", 0.0) + fid.get("points_rel", 0.0) + fid.get("translation_rel", 0.0)
             + math.radians(fid.get("rotation_deg", 0.0)))
    return total, fid


class _LayerProbe:
    """Global op: exact attention everywhere, plus — on one layer — the candidate ops' attention
    error on the dense q/k/v, and optionally the reduced output fed forward."""

    def __init__(self, layer: int, ops: dict, apply_op=None) -> None:
        self.layer, self.ops, self.apply_op = layer, ops, apply_op
        self.errors: dict = {}

    def __call__(self, q, k, v, layout, scale=None):
        exact = exact_attention(q, k, v, scale)
        if layout.layer != self.layer:
            return exact
        for c, op in self.ops.items():
            self.errors[c] = relative_error(op(q, k, v, layout, scale), exact)
        return exact if self.apply_op is None else self.apply_op(q, k, v, layout, scale)


def allocate(errors: list[dict], costs: list[dict], budget: float) -> list[float]:
    """Pick one candidate per layer minimising the summed error with summed cost <= budget."""
    def choose(lam: float) -> list[float]:
        return [min(err, key=lambda c: (err[c] + lam * cost[c], cost[c])) for err, cost in zip(errors, costs)]

    def total(choice) -> float:
        return sum(cost[c] for cost, c in zip(costs, choice))

    cheapest = [min(cost, key=cost.get) for cost in costs]
    if total(cheapest) > budget:
        raise ValueError(f"the target cannot be met even with the smallest candidate in every layer "
                         f"({total(cheapest):.3g} > budget {budget:.3g} FLOPs); lower --target or add smaller candidates")
    if total(choose(0.0)) <= budget:
        return choose(0.0)
    scale = max(max(e.values()) for e in errors) / max(min(c.values()) for c in costs) + 1e-30
    lo, hi = 0.0, scale
    while total(choose(hi)) > budget:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(choose(mid)) > budget else (lo, mid)
    return choose(hi)


def check_target_reachable(cfg: CalibrateConfig, dense: float, costs: list[dict]) -> None:
    """ValueError if even the smallest candidate in every layer misses ``cfg.target`` (global-
    attention FLOP reduction at ``cfg.frames``); ``costs``: per layer, candidate -> FLOPs."""
    best = dense / sum(min(cost.values()) for cost in costs)
    if best < cfg.target:
        raise ValueError(
            f"--target {cfg.target:g} cannot be reached: with the smallest candidate ({min(cfg.candidates):g}) in every "
            f"global layer the FLOP model gives {best:.3g}x at {cfg.frames} frames of {cfg.size[0]}x{cfg.size[1]} "
            f"(query merging and overheads included); lower --target to at most {math.floor(best * 100) / 100:g}, "
            "add smaller --candidates or calibrate at more --frames. Nothing was measured.")


def calibrate(cfg: CalibrateConfig, log=print) -> tuple[KVSchedule, dict]:
    from spark3r.models import load_pretrained
    from spark3r.models.registry import inference_overrides

    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model = load_pretrained(cfg.model, cfg.checkpoint or "seeded", device=device, dtype=dtype,
                            **inference_overrides(cfg.model)).eval()
    weights = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else "seeded-v1 (synthetic)"
    h, w = cfg.size
    modules = global_modules(model)
    num_layers = len(modules)
    spark = dict(query_group=cfg.query_group, query_keep=cfg.query_keep, kv_score=cfg.kv_score,
                 kv_compensation=cfg.kv_compensation)

    def single_layer_op(layer: int, keep: float) -> Spark3ROp:
        kv = [1.0] * num_layers
        kv[layer] = keep
        sched = KVSchedule(tuple(kv), reference_frames=cfg.frames, decay=cfg.decay, min_per_frame=cfg.min_per_frame)
        return Spark3ROp(Spark3RConfig(schedule=sched, **spark), sched)

    geometry = flops_mod.model_geometry(model, cfg.frames, h, w)
    # Every candidate is priced by the FLOP model before anything is measured, so a target that
    # no choice of candidates reaches is refused at once instead of after minutes of forwards.
    costs = [{c: flops_mod.layer_flops(single_layer_op(layer, c), geometry.layouts[layer], geometry.heads,
                                       geometry.head_dim)["total"] for c in cfg.candidates} for layer in range(num_layers)]
    dense = flops_mod.global_attention_flops(None, geometry)["total"]
    check_target_reachable(cfg, dense, costs)
    images, source = load_inputs(cfg)
    images = images.to(device, dtype)
    layer_errors, attn_errors = [], []
    with torch.inference_mode():
        remove(model)
        # The per-frame encoder does not see the global layers: encode once, reuse in every run.
        patch_tokens = model.encode_patches(images)
        ref = model.decode(model(images, patch_tokens=patch_tokens), (h, w))
        for layer in range(num_layers):
            ops = {c: single_layer_op(layer, c) for c in cfg.candidates}
            errs, attn = {}, {}
            for c, op in ops.items():
                probe = _LayerProbe(layer, {c: op}, apply_op=op)
                for m in modules:
                    m.global_op = probe
                out = model(images, patch_tokens=patch_tokens)
                remove(model)
                errs[c], _ = output_error(model.decode(out, (h, w)), ref)
                attn[c] = probe.errors[c]
            layer_errors.append(errs)
            attn_errors.append(attn)
            log(f"layer {layer}: " + ", ".join(f"keep {c:g}: out {errs[c]:.3g} attn {attn[c]:.3g}" for c in cfg.candidates))
    budget = dense / cfg.target
    choice = allocate(layer_errors, costs, budget)
    achieved = dense / sum(cost[c] for cost, c in zip(costs, choice))
    schedule = KVSchedule(
        kv_keep=tuple(choice), reference_frames=cfg.frames, decay=cfg.decay, min_per_frame=cfg.min_per_frame,
        backbone=cfg.model,
        note=f"calibrated: target {cfg.target:g}x global-attention FLOP reduction at {cfg.frames} frames of {h}x{w}",
        meta={
            "weights": weights, "inputs": source, "target": cfg.target, "achieved_global_attention_reduction": achieved,
            "query": {"query_group": list(cfg.query_group), "query_keep": cfg.query_keep},
            "candidates": list(cfg.candidates),
            "output_error": [[errs[c] for c in cfg.candidates] for errs in layer_errors],
            "attention_error": [[a[c] for c in cfg.candidates] for a in attn_errors],
        },
    )
    report = {"schedule": schedule.to_dict(), "achieved_global_attention_reduction": achieved,
              "predicted_output_error_sum": sum(e[c] for e, c in zip(layer_errors, choice))}
    return schedule, report


# ---------------------------------------------------------------------------------------------
# The paper recipe's two-tier probe


def classify_sensitivity(base_error: float, raised_errors, threshold: float = SENSITIVITY_THRESHOLD) -> tuple[int, ...]:
    """High-sensitivity layers: those whose output error with their own factor raised exceeds
    ``threshold`` x the error with every layer at the base factor."""
    return tuple(layer for layer, err in enumerate(raised_errors) if err > threshold * base_error)


def probe_sensitivity(evaluate, num_layers: int, factors: tuple[int, int] = PROBE_FACTORS,
                      threshold: float = SENSITIVITY_THRESHOLD) -> tuple[tuple[int, ...], float, list[float]]:
    """The paper's one-time probe. ``evaluate(kv_factors)`` -> output error of a run with one K/V
    factor per layer. Returns (high-sensitivity layers, base error, per-layer raised errors)."""
    base, raised = factors
    base_error = evaluate((base,) * num_layers)
    raised_errors = []
    for layer in range(num_layers):
        kv = [base] * num_layers
        kv[layer] = raised
        raised_errors.append(evaluate(tuple(kv)))
    return classify_sensitivity(base_error, raised_errors, threshold), base_error, raised_errors


def calibrate_tiers(cfg: CalibrateConfig, log=print) -> tuple[LayerTiers, dict]:
    """Run :func:`probe_sensitivity` on the model (see the module docstring)."""
    from spark3r.models import load_pretrained
    from spark3r.models.registry import inference_overrides

    device = torch.device(cfg.device)
    model = load_pretrained(cfg.model, cfg.checkpoint or "seeded", device=device, dtype=getattr(torch, cfg.dtype),
                            **inference_overrides(cfg.model)).eval()
    images, source = load_inputs(cfg)
    images = images.to(device, getattr(torch, cfg.dtype))
    h, w = cfg.size
    modules = global_modules(model)
    num_layers = len(modules)
    config = Spark3RConfig(recipe="paper")
    placeholder = LayerTiers((), num_layers, cfg.model)
    with torch.inference_mode():
        remove(model)
        patch_tokens = model.encode_patches(images)
        ref = model.decode(model(images, patch_tokens=patch_tokens), (h, w))

        def evaluate(kv_factors) -> float:
            op = Spark3RPaperOp(config, placeholder, fixed_kv_factors=kv_factors)
            for m in modules:
                m.global_op = op
            try:
                out = model(images, patch_tokens=patch_tokens)
            finally:
                remove(model)
            err, _ = output_error(model.decode(out, (h, w)), ref)
            log(f"K/V factors {list(kv_factors)}: output error {err:.4g}")
            return err

        high, base_error, raised = probe_sensitivity(evaluate, num_layers, tuple(cfg.probe_factors),
                                                     cfg.sensitivity_threshold)
    weights = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else "seeded-v1 (synthetic)"
    tiers = LayerTiers(high, num_layers, cfg.model,
                       note=f"probed: K/V factor {cfg.probe_factors[0]} -> {cfg.probe_factors[1]} one layer at a time, "
                            f"> {cfg.sensitivity_threshold:g}x error = high-sensitivity; {cfg.frames} frames of {h}x{w}",
                       meta={"weights": weights, "inputs": source, "probe_factors": list(cfg.probe_factors),
                             "threshold": cfg.sensitivity_threshold, "base_error": base_error,
                             "raised_error": raised, "error_ratio": [e / base_error if base_error > 0 else float("inf")
                                                                     for e in raised]})
    return tiers, {"layer_tiers": tiers.to_dict()}


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli_args import _parse_bool, _parse_pair

    d = CalibrateConfig()
    p.add_argument("--model", default=d.model, help=f"model preset (default {d.model})")
    p.add_argument("--checkpoint", help="your weights (file or HF directory); default seeded-v1 synthetic weights")
    p.add_argument("--images", help="folder with your images (default: a synthetic room sequence)")
    p.add_argument("--frames", type=int, default=d.frames, help=f"frames per forward (default {d.frames})")
    p.add_argument("--size", type=_parse_pair, default=d.size, help="input size HxW, multiples of 14 (default 392x518)")
    p.add_argument("--target", type=float, default=d.target,
                   help=f"global-attention FLOP reduction to reach at --frames (default {d.target:g}); checked "
                        "against the FLOP model before anything is measured")
    p.add_argument("--candidates", default=",".join(f"{c:g}" for c in d.candidates),
                   help="comma-separated K/V keep fractions to try per layer")
    p.add_argument("--query-group", type=_parse_pair, default=d.query_group,
                   help=f"Spark3R query merge group RxC of neighbouring patch tokens (default {d.query_group[0]}x{d.query_group[1]})")
    p.add_argument("--query-keep", type=int, default=d.query_keep,
                   help=f"queries kept per merge group, 1..R*C (default {d.query_keep})")
    p.add_argument("--kv-score", default=d.kv_score,
                   help=f"how keys/values are ranked for the K/V budget: {', '.join(KV_SCORES)} (default {d.kv_score})")
    p.add_argument("--kv-compensation", type=_parse_bool, default=d.kv_compensation,
                   help=f"true/false: per frame, one extra token stands for the pruned keys/values "
                        f"(default {str(d.kv_compensation).lower()})")
    p.add_argument("--decay", type=float, default=d.decay,
                   help=f"0..1, how per-frame K/V budgets shrink for windows larger than --frames: "
                        f"(frames / S) ** decay; written into the schedule (default {d.decay:g})")
    p.add_argument("--min-per-frame", type=int, default=d.min_per_frame,
                   help=f"keys/values kept per frame at least, written into the schedule (default {d.min_per_frame})")
    p.add_argument("--device", default=d.device, help=f"torch device: cpu, cuda, cuda:1, ... (default {d.device})")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"),
                   help=f"model/compute dtype (default {d.dtype})")
    add_threads_argument(p)
    p.add_argument("--recipe", default=d.recipe, choices=RECIPES,
                   help="ours: per-layer K/V budgets for --target; paper: the two-tier sensitivity probe -> layer tiers")
    p.add_argument("--probe-factors", type=_parse_factors, default=d.probe_factors,
                   help="recipe paper: base and raised K/V factor of the probe (default 32,256)")
    p.add_argument("--sensitivity-threshold", type=float, default=d.sensitivity_threshold,
                   help="recipe paper: error ratio above which a layer is high-sensitivity (default 1.05)")
    p.add_argument("--out", required=True, help="schedule (recipe ours) or layer-tiers (recipe paper) file to write (JSON)")


def _parse_factors(text: str) -> tuple[int, int]:
    try:
        base, raised = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 32,256, got {text!r}") from None
    return base, raised


def run(args: argparse.Namespace) -> int:
    import sys

    apply_threads(resolve_threads(args.threads))
    try:
        cands = tuple(float(c) for c in args.candidates.split(",") if c.strip())
    except ValueError as e:
        raise ValueError(f"--candidates must be comma-separated numbers, got {args.candidates!r}") from e
    fields = {f.name for f in dataclasses.fields(CalibrateConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and k != "candidates"}
    cfg = CalibrateConfig(candidates=cands, **kw)
    if cfg.recipe == "paper":
        tiers, report = calibrate_tiers(cfg, log=lambda s: print(s, file=sys.stderr))
        save_tiers(tiers, args.out)
        print(strict_json.dumps({**report, "written": str(args.out)}, indent=1))
        return 0
    schedule, report = calibrate(cfg, log=lambda s: print(s, file=sys.stderr))
    save_schedule(schedule, args.out)
    print(strict_json.dumps({**report, "written": str(args.out)}, indent=1))
    return 0
