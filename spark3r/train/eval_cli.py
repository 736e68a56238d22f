"""``spark3r train-eval``: held-out metrics of a checkpoint against the trivial baselines (JSON).

Metrics and baselines are defined in :mod:`spark3r.train.evaluate`. Example::

    spark3r train-eval --checkpoint builtin --windows 32 --json nano_eval.json
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="vggt-nano", help="model preset of the checkpoint")
    p.add_argument("--checkpoint", default="builtin",
                   help="'builtin', a .safetensors / .pt file, a training step_*.pt, or a run folder (its newest checkpoint)")
    p.add_argument("--windows", type=int, default=32, help="held-out windows (scene seeds first-seed, first-seed+1, ...)")
    p.add_argument("--first-seed", type=int, default=0, help="first held-out scene seed")
    p.add_argument("--frames", type=int, nargs=2, default=(8, 16), metavar=("MIN", "MAX"), help="frames per window")
    p.add_argument("--width", type=int, default=None, help="network input width (default: the preset's native width)")
    p.add_argument("--aspect", type=float, default=0.75, help="height / width of the rendered windows")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--json", default=None, help="write the result here (default: stdout only)")


def run(args) -> int:
    from pathlib import Path

    import torch

    from spark3r.models import load_pretrained
    from spark3r.models.registry import native_width
    from spark3r.train.evaluate import EvalConfig, evaluate_windows, floor_check, heldout_windows, write_json
    from spark3r.train.loop import latest_checkpoint

    torch.set_num_threads(max(1, args.threads))
    source = args.checkpoint
    if source != "builtin" and Path(source).is_dir() and (Path(source) / "checkpoints").is_dir():
        found = latest_checkpoint(Path(source))
        if found is None:
            raise FileNotFoundError(f"no checkpoints/step_*.pt under {source}")
        source = str(found)
    model = load_pretrained(args.preset, source, device=args.device).eval()
    cfg = EvalConfig(num_windows=args.windows, first_seed=args.first_seed, min_frames=args.frames[0],
                     max_frames=args.frames[1], width=args.width or native_width(args.preset), aspect=args.aspect)
    result = evaluate_windows(heldout_windows(cfg), cfg, model, args.device)
    result["checkpoint"] = str(source)
    result["preset"] = args.preset
    result["floor"] = floor_check(result)
    if args.json:
        write_json(args.json, result)
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0
