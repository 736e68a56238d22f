"""``spark3r distill``: flags of :class:`~spark3r.distill.trainer.DistillConfig`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from spark3r.threads import add_threads_argument, apply_threads, resolve_threads

from .trainer import DATA_SOURCES, DistillConfig, distill


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 224x224, got {text!r}")
    return int(parts[0]), int(parts[1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = {f.name: f.default for f in dataclasses.fields(DistillConfig) if f.default is not dataclasses.MISSING}
    p.add_argument("--out", required=True, help="output directory: model.safetensors, training_state.pt (resumed from)")
    p.add_argument("--preset", default=d["preset"],
                   help="Speed3R student preset: pi3-speed3r, pi3-speed3r-tiny, or vggt-nano-speed3r (distilled from "
                        "the dense vggt-nano given by --weights)")
    p.add_argument("--weights", default=d["weights"],
                   help="student initialisation and teacher: file / dir / hub id / seeded / builtin; for "
                        "vggt-nano-speed3r the dense vggt-nano: builtin (default), a .safetensors or step_*.pt file "
                        "or a `spark3r train` run folder (default for π3 presets: seeded)")
    p.add_argument("--images", default=None, help="folder of images (default: generated sequences, see --data)")
    p.add_argument("--data", default=d["data"], choices=DATA_SOURCES,
                   help="generated sequences: synthetic rooms (π3 default) or procedural training scenes (VGGT default)")
    p.add_argument("--frames", type=int, default=d["frames"], help="images per sample, 2..24")
    p.add_argument("--size", type=_size, default=d["size"],
                   help="network input HxW: multiples of 56 for π3 Speed3R (default 224x224), of 14 for VGGT "
                        "(default: the native width, vggt-nano 112x140)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps in total")
    p.add_argument("--lr", type=float, default=d["lr"],
                   help="peak learning rate (one-cycle cosine); default 1e-5 (π3, official), 1e-7 for VGGT students")
    p.add_argument("--gate-lr", type=float, default=d["gate_lr"],
                   help="peak learning rate of the new gates; default: --lr (π3), 1e-2 for VGGT students")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay, >= 0")
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="maximum gradient norm, > 0")
    p.add_argument("--scenes", type=int, default=d["scenes"], help="generated sequences: distinct scenes cycled (0 = new per step)")
    p.add_argument("--save-every", type=int, default=d["save_every"], help="steps between saved training states")
    p.add_argument("--reset-gates", action="store_true",
                   help="start the gates from the official initialisation (a VGGT student always starts there)")
    p.add_argument("--from-pi3", default=None, help="π3 weights (file / dir / hub id / seeded): the official recipe, "
                                                    "teacher = that π3, student = its weights remapped (ignores --weights)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of the samples and the initialisation")
    p.add_argument("--device", default=d["device"], help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    config = DistillConfig(**{k: v for k, v in vars(args).items() if k in fields})
    apply_threads(resolve_threads(args.threads))  # training runs in this thread
    result = distill(config, progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(result))
    return 0
