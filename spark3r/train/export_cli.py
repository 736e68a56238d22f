"""``spark3r train-export``: turn a training checkpoint into a shipped ``.safetensors``.

The file holds the float32 weights (loadable by ``load_pretrained``) plus bfloat16 AdamW moments
and the run's settings, so ``spark3r train --resume FILE`` continues it (see
:mod:`spark3r.train.checkpoint`). Example::

    spark3r train-export --from runs/nano --to spark3r/models/builtin/vggt-nano.safetensors
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, help="run folder (newest checkpoint) or step_*.pt")
    p.add_argument("--to", required=True, help="output .safetensors path")
    p.add_argument("--eval-json", default=None, help="held-out metrics (spark3r train-eval --json) to embed as metadata")
    p.add_argument("--max-mb", type=float, default=40.0, help="refuse to write a file larger than this (MB)")


def run(args) -> int:
    from spark3r.train.checkpoint import SHIPPED_FORMAT, export_shipped, read_resume_payload

    payload, path = read_resume_payload(args.source)
    if payload.get("format") == SHIPPED_FORMAT:
        raise ValueError(f"{path} is already a shipped file")
    extra = {"source_checkpoint": path.name}
    if args.eval_json:
        extra["heldout_eval"] = json.loads(Path(args.eval_json).read_text())
    out = export_shipped(payload, args.to, extra)
    size_mb = out.stat().st_size / 1e6
    if size_mb > args.max_mb:
        out.unlink()
        raise ValueError(f"exported file would be {size_mb:.1f} MB > --max-mb {args.max_mb}")
    print(f"wrote {out} ({size_mb:.1f} MB) from {path} at step {payload['run_state']['step']}")
    return 0
