"""Arguments and entry point of ``spark3r bench`` (the measurement itself is in ``bench.py``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .runner import PRESETS, SCOPES, config_from_preset, run_bench, summary_table
from spark3r.data import strict_json
from spark3r.threads import add_threads_argument

from .cli_args import add_method_arguments, method_params, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-quick", help=f"bench preset: {', '.join(sorted(PRESETS))} (default cpu-quick); "
                   "the options below override its fields")
    p.add_argument("--model", help="model preset: vggt-1b, pi3, da3-small, da3-base, da3-large, da3-giant, vggt-tiny, pi3-tiny")
    p.add_argument("--frames", type=int, help="frames per forward")
    p.add_argument("--size", help="input size HxW, multiples of 14 (e.g. 392x518)")
    p.add_argument("--scope", choices=SCOPES, help="what is timed: one global attention op, the aggregator, or the model")
    p.add_argument("--methods", help="comma-separated methods (default dense,uniform,spark3r,speed3r); --quality takes "
                                     "variants NAME[:FIELD=VALUE...], e.g. spark3r:recipe=paper, and weights=DIR to run "
                                     "one on another checkpoint of the model, e.g. speed3r:weights=runs/nano-speed3r")
    p.add_argument("--repeats", type=int, help="timed repeats per method (min and median are reported)")
    p.add_argument("--flops-only", action="store_true", default=None, help="analytic FLOPs only, run nothing")
    add_threads_argument(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model/compute dtype (default float32)")
    p.add_argument("--checkpoint", help="real weights (file, HF directory); default: seeded-v1 synthetic weights")
    p.add_argument("--layer", type=int, help="global layer whose attention op is timed (default: the middle one)")
    p.add_argument("--input-seed", type=int, dest="seed", help="seed of the synthetic input images / q,k,v")
    p.add_argument("--out", help="also write the JSON here (--quality: a folder for quality.json/.md/.png)")
    p.add_argument("--table", action="store_true", help="print a Markdown summary table to stderr")
    add_method_arguments(p)
    from .stream import add_stream_arguments  # --stream: the node's pipeline
    add_stream_arguments(p)
    from .quality import add_quality_arguments  # --quality: methods vs ground truth
    add_quality_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.stream and args.quality:
        raise ValueError("--stream and --quality are two different benchmarks; give one")
    if args.stream:
        from .stream import run_stream_from_args
        return run_stream_from_args(args)
    if args.quality:
        from .quality import run_quality_from_args
        return run_quality_from_args(args)
    overrides = {k: getattr(args, k) for k in ("model", "frames", "scope", "repeats", "flops_only", "threads",
                                               "device", "dtype", "checkpoint", "layer", "seed")}
    if args.size:
        overrides["size"] = parse_size(args.size)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else \
        PRESETS[args.preset].methods if args.preset in PRESETS else None
    overrides["methods"] = methods
    overrides["method_params"] = method_params(args, methods or ())
    cfg = config_from_preset(args.preset, **overrides)
    result = run_bench(cfg)
    text = strict_json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.table:
        print(summary_table(result), file=sys.stderr)
    return 0
