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
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from spark3r.accel.apply import global_modules, remove
from spark3r.accel.common import exact_attention, relative_error
from spark3r.accel.schedule import KVSchedule, save_schedule
from spark3r.accel.spark3r import Spark3RConfig, Spark3ROp
from spark3r.models.base import BackboneOutputs

from . import flops as flops_mod
from .runner import fidelity

DEFAULT_CANDIDATES = (0.03, 0.06, 0.1, 0.2, 0.35, 1.0)


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

    def __post_init__(self) -> None:
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


def calibrate(cfg: CalibrateConfig, log=print) -> tuple[KVSchedule, dict]:
    from spark3r.models import load_pretrained
    from spark3r.models.registry import inference_overrides

    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model = load_pretrained(cfg.model, cfg.checkpoint or "seeded", device=device, dtype=dtype,
                            **inference_overrides(cfg.model)).eval()
    weights = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else "seeded-v1 (synthetic)"
    images, source = load_inputs(cfg)
    images = images.to(device, dtype)
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
    layer_errors, attn_errors, costs = [], [], []
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
            lay = geometry.layouts[layer]
            costs.append({c: flops_mod.layer_flops(op, lay, geometry.heads, geometry.head_dim)["total"] for c, op in ops.items()})
            layer_errors.append(errs)
            attn_errors.append(attn)
            log(f"layer {layer}: " + ", ".join(f"keep {c:g}: out {errs[c]:.3g} attn {attn[c]:.3g}" for c in cfg.candidates))
    dense = flops_mod.global_attention_flops(None, geometry)["total"]
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
                   help=f"global-attention FLOP reduction to reach at --frames (default {d.target:g})")
    p.add_argument("--candidates", default=",".join(f"{c:g}" for c in d.candidates),
                   help="comma-separated K/V keep fractions to try per layer")
    p.add_argument("--query-group", type=_parse_pair, default=d.query_group)
    p.add_argument("--query-keep", type=int, default=d.query_keep)
    p.add_argument("--kv-score", default=d.kv_score)
    p.add_argument("--kv-compensation", type=_parse_bool, default=d.kv_compensation)
    p.add_argument("--decay", type=float, default=d.decay)
    p.add_argument("--min-per-frame", type=int, default=d.min_per_frame)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int)
    p.add_argument("--out", required=True, help="schedule file to write (JSON)")


def run(args: argparse.Namespace) -> int:
    import sys

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cands = tuple(float(c) for c in args.candidates.split(",") if c.strip())
    except ValueError as e:
        raise ValueError(f"--candidates must be comma-separated numbers, got {args.candidates!r}") from e
    fields = {f.name for f in dataclasses.fields(CalibrateConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and k != "candidates"}
    cfg = CalibrateConfig(candidates=cands, **kw)
    schedule, report = calibrate(cfg, log=lambda s: print(s, file=sys.stderr))
    save_schedule(schedule, args.out)
    print(json.dumps({**report, "written": str(args.out)}, indent=1))
    return 0
