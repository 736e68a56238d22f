"""``spark3r train``: train a VGGT-family preset on procedural scenes (see :mod:`spark3r.train`).

Fresh run::

    spark3r train --preset vggt-nano --out runs/nano --threads 1 --workers 1

A new stage from trained weights (fresh optimizer and schedule, e.g. a curriculum step)::

    spark3r train --init runs/nano --out runs/nano-stage2 --frames 2 8 --lr 2e-4

Resume (the run's own settings come from the checkpoint; ``--steps`` may extend it)::

    spark3r train --resume runs/nano --out runs/nano --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spark3r.models.registry import list_presets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder: checkpoints/, eval/, eval.jsonl, train_log.jsonl")
    p.add_argument("--resume", default=None,
                   help="continue a run: a run folder (its newest checkpoint), a step_*.pt checkpoint, or a shipped "
                        ".safetensors ('builtin' = the packaged vggt-nano); training settings come from it")
    p.add_argument("--init", default=None,
                   help="start a new run (fresh optimizer and schedule, the settings given here) from the weights of a "
                        "run folder, step_*.pt, shipped .safetensors or 'builtin'; its preset is used")
    p.add_argument("--preset", default=None, choices=[x for x in list_presets() if x.startswith("vggt") and not x.endswith("-speed3r")],
                   help="model preset to train from scratch (VGGT family; default vggt-nano, or the --init model's)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps, cosine end (default 60000; on resume: keep)")
    p.add_argument("--until-step", type=int, default=None, help="stop (with a checkpoint) at this step, before --steps")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (0, 1]")
    p.add_argument("--min-lr-ratio", type=float, default=0.02, help="final lr as a fraction of --lr [0, 1]")
    p.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up steps [0, steps]")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay [0, 1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (> 0)")
    p.add_argument("--layer-scale-init", type=float, default=1.0,
                   help="initial LayerScale gamma of every block, from scratch (0, 10]; VGGT's own 0.01 leaves the "
                        "aggregator a near pass-through when nothing is pretrained")
    p.add_argument("--init-seed", type=int, default=0, help="parameter initialisation seed")
    p.add_argument("--data-seed", type=int, default=0, help="training stream seed (scenes come from the training seed range)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step [1, 256]")
    p.add_argument("--frames", type=int, nargs=2, default=(2, 24), metavar=("MIN", "MAX"), help="frames per sequence")
    p.add_argument("--widths", type=int, nargs="+", default=(126, 140, 154), help="input widths drawn per step (multiples of 14)")
    p.add_argument("--motions", nargs="+", default=(), metavar="MOTION",
                   help="camera motions drawn for the training sequences (orbit forward random_walk rotation; default: "
                        "each scene's own draw), e.g. a curriculum stage on near-pure rotations")
    p.add_argument("--aspect", type=float, nargs=2, default=(0.5, 1.0), metavar=("MIN", "MAX"), help="height/width range")
    p.add_argument("--camera-weight", type=float, default=5.0, help="weight of the camera loss (VGGT: 5) >= 0")
    p.add_argument("--depth-weight", type=float, default=1.0, help="weight of the depth loss (VGGT: 1) >= 0")
    p.add_argument("--rotation-weight", type=float, default=1.0,
                   help="weight of the rotation term inside the camera loss (VGGT: 1; translation 1, FoV 0.5) >= 0")
    p.add_argument("--point-weight", type=float, default=0.0,
                   help="weight of the geometric point loss (predicted depth unprojected with the predicted camera "
                        "vs true first-frame points; a dense cross-view signal) >= 0; 0 = VGGT's objective")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint interval in steps")
    p.add_argument("--keep", type=int, default=3, help="newest checkpoints kept")
    p.add_argument("--eval-every", type=int, default=500, help="held-out evaluation interval in steps")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per evaluation")
    p.add_argument("--eval-width", type=int, default=140, help="held-out evaluation input width")
    p.add_argument("--log-every", type=int, default=50, help="plain log line / train_log.jsonl interval in steps")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the trainer (>= 1)")
    p.add_argument("--workers", type=int, default=1, help="data worker processes (0 = render in the trainer)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    p.add_argument("--no-amp", action="store_true", help="on CUDA, train in float32 instead of autocast")


def _config_from_args(args, preset: str, init_from: str = ""):
    from spark3r.train.data import DataConfig
    from spark3r.train.objective import ObjectiveConfig
    from spark3r.train.evaluate import EvalConfig
    from spark3r.train.loop import TrainConfig

    data = DataConfig(data_seed=args.data_seed, batch_size=args.batch_size, min_frames=args.frames[0],
                      max_frames=args.frames[1], widths=tuple(args.widths), min_aspect=args.aspect[0],
                      max_aspect=args.aspect[1], motions=tuple(args.motions))
    evaluation = EvalConfig(num_windows=args.eval_windows, width=args.eval_width)
    objective = ObjectiveConfig(camera_weight=args.camera_weight, depth_weight=args.depth_weight,
                                point_weight=args.point_weight, weight_rot=args.rotation_weight)
    return TrainConfig(preset=preset, init_from=init_from, objective=objective, steps=args.steps or 60000, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       init_seed=args.init_seed, layer_scale_init=args.layer_scale_init, ckpt_every=args.ckpt_every, keep_checkpoints=args.keep,
                       eval_every=args.eval_every, log_every=args.log_every, data=data, evaluation=evaluation)


def run(args) -> int:
    import dataclasses

    import torch

    from spark3r.train.checkpoint import read_resume_payload
    from spark3r.train.loop import Trainer, TrainConfig

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    payload = None
    init_weights = None
    if args.resume and args.init:
        raise ValueError("--resume continues a run, --init starts a new one from its weights: pass one of them")
    if args.resume:
        payload, source = read_resume_payload(args.resume)
        cfg = TrainConfig.from_dict(payload["train_config"])
        if args.steps is not None and args.steps != cfg.steps:
            print(f"spark3r train: --steps {args.steps} replaces {cfg.steps}: the cosine schedule changes from here on",
                  file=sys.stderr)
            cfg = dataclasses.replace(cfg, steps=args.steps)
        print(f"resuming from {source} at step {payload['run_state']['step']}", flush=True)
    else:
        preset, init_from = args.preset or "vggt-nano", ""
        if args.init:
            init_payload, source = read_resume_payload(args.init)
            preset, init_from, init_weights = init_payload["preset"], str(source), init_payload["model"]
            if args.preset not in (None, preset):
                raise ValueError(f"--init {args.init} holds a {preset} model, not --preset {args.preset}")
        cfg = _config_from_args(args, preset, init_from)
        if Path(args.out).joinpath("checkpoints").is_dir() and any(Path(args.out, "checkpoints").glob("step_*.pt")):
            raise ValueError(f"{args.out} already holds checkpoints; pass --resume {args.out} to continue it")
    trainer = Trainer(cfg, args.out, device=args.device, workers=args.workers, amp=not args.no_amp,
                      echo=lambda s: print(s, flush=True))
    if payload is not None:
        trainer.load_state(payload)
    elif init_weights is not None:
        trainer.load_weights(init_weights)
        print(f"starting from the weights of {cfg.init_from} (fresh optimizer and schedule)", flush=True)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"training {cfg.preset} ({n_params / 1e6:.2f} M parameters) on {args.device}, {args.threads} thread(s), "
          f"{args.workers} data worker(s), steps {trainer.state.step} -> {cfg.steps}, pid {os.getpid()}", flush=True)
    state = trainer.run(until_step=args.until_step)
    print(f"stopped at step {state.step} ({state.train_seconds / 3600:.2f} h training, "
          f"{state.cpu_seconds / 3600:.2f} CPU-h in the trainer, {state.skipped_steps} skipped steps)", flush=True)
    return 0
