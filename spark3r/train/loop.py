"""The training loop: AdamW + linear warm-up + cosine decay, gradient clipping, checkpoints,
bit-identical resume and periodic held-out evaluation.

Run state = (model, optimizer moments, step). The learning rate is a pure function of the step
(:func:`learning_rate`), the data stream's position is the step (batch ``i`` is trained at step
``i``, see :mod:`.data`), and nothing else in a step draws random numbers, so a run resumed from
a checkpoint computes exactly the steps it would have computed without the interruption
(bitwise on the same device with the same ``--threads``). Torch's RNG states are saved anyway.

Output folder layout::

    OUT/checkpoints/step_00001000.pt   full state (atomic write; the newest ``keep`` are kept)
    OUT/eval/step_00001000.json        held-out metrics at that step
    OUT/eval.jsonl                     the same, one line per evaluation
    OUT/train_log.jsonl                averaged loss terms, lr and throughput every log interval
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from spark3r.models.registry import build_model, preset_class
from spark3r.models.vggt import VGGT

from .data import BatchStream, DataConfig
from .evaluate import EvalConfig, evaluate_windows, floor_check, heldout_windows, write_json
from .objective import ObjectiveConfig, compute_objective

CHECKPOINT_FORMAT = "spark3r-train-v1"
from spark3r.models.checkpoints import TRAINING_STATE_PREFIX as TRAIN_STATE_PREFIX  # noqa: E402


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    preset: str = "vggt-nano"
    steps: int = 60000  # total optimizer steps (the cosine schedule ends here)
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.02  # final lr = lr * min_lr_ratio
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm
    init_seed: int = 0  # parameter initialisation
    init_from: str = ""  # weights this run started from (a checkpoint or "builtin"); "" = from scratch
    # Initial LayerScale gamma of every block when training from scratch. VGGT's 0.01 suits an
    # aggregator on a pretrained encoder; from scratch it keeps the aggregator and camera head a
    # near pass-through (measured: the gammas drifted to ~0.005 and the predicted poses stayed
    # constant across frames for 6,000 steps), so from-scratch runs start every block at 1.
    layer_scale_init: float = 1.0
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    log_every: int = 50
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not issubclass(preset_class(self.preset), VGGT):
            raise ValueError(f"spark3r train supports the VGGT family (its objective); got preset {self.preset!r}")
        for name in ("steps", "ckpt_every", "eval_every", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be an integer in [0, steps], got {self.warmup_steps!r}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1.0):
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not (math.isfinite(self.layer_scale_init) and 0 < self.layer_scale_init <= 10):
            raise ValueError(f"layer_scale_init must be in (0, 10], got {self.layer_scale_init}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"] = self.data.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["data"] = DataConfig.from_dict(d["data"])
        d["objective"] = ObjectiveConfig(**d["objective"])
        d["evaluation"] = EvalConfig(**d["evaluation"])
        d.setdefault("init_from", "")  # checkpoints written before these fields existed
        d.setdefault("layer_scale_init", 0.01)
        return cls(**d)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine decay to
    ``lr * min_lr_ratio`` at ``steps`` (constant after)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def init_for_training(model: nn.Module, seed: int, layer_scale: Optional[float] = None) -> nn.Module:
    """Re-initialise ``model`` for training from scratch (ViT conventions: truncated-normal
    0.02 linear weights and position embeddings, zero biases, near-zero special tokens; every
    LayerScale ``gamma`` set to ``layer_scale`` unless None)."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.nn.init.trunc_normal_(torch.empty_like(mod.weight), std=0.02, a=-0.04, b=0.04, generator=gen))
                if mod.bias is not None:
                    mod.bias.zero_()
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                p.copy_(torch.nn.init.trunc_normal_(torch.empty_like(p), std=0.02, a=-0.04, b=0.04, generator=gen))
            elif layer_scale is not None and name.endswith(".gamma") and ".ls" in name:
                p.fill_(layer_scale)
            elif name.endswith(("camera_token", "register_token", "register_tokens", "cls_token")):
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-6 if "aggregator." in name and "patch_embed" not in name
                        else torch.randn(p.shape, generator=gen) * 0.02)
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW groups (no decay on biases, norms, tokens and embeddings) and the parameter names
    in optimizer order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(("token", "tokens", "pos_embed")) else decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return groups, [n for n, _ in decay] + [n for n, _ in no_decay]


def batch_to_tensors(batch: dict, device) -> dict:
    """numpy batch from :mod:`.data` -> tensors on ``device`` (images [B,S,3,H,W] in [0, 1])."""
    images = torch.from_numpy(batch["images"]).to(device).permute(0, 1, 4, 2, 3).float().div_(255.0)
    return {"images": images, "depth": torch.from_numpy(batch["depth"]).to(device),
            "c2w": torch.from_numpy(batch["c2w"]).to(device), "K": torch.from_numpy(batch["K"]).to(device)}


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


@dataclass
class RunState:
    step: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient was not finite (no update)
    train_seconds: float = 0.0  # wall time spent in training steps (excludes pauses between runs)
    cpu_seconds: float = 0.0  # CPU time of the training process (all its threads)


class Trainer:
    """One training run (see the module docstring). ``device`` "cuda" trains with autocast
    (bfloat16 where supported, else float16 with loss scaling)."""

    def __init__(self, cfg: TrainConfig, out_dir, *, device="cpu", workers: int = 1, amp: bool = True,
                 echo=print) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.workers = workers
        self.echo = echo
        torch.manual_seed(cfg.init_seed)
        model = build_model(cfg.preset)
        self.model = init_for_training(model, cfg.init_seed, cfg.layer_scale_init).to(self.device).train()
        groups, self.param_names = parameter_groups(self.model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        self.amp_dtype = None
        if amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.state = RunState()

    def load_weights(self, state_dict: dict) -> None:
        """Start from trained weights (strict) with a fresh optimizer and schedule: a new stage
        of training, e.g. a curriculum step, unlike :meth:`load_state` which continues a run."""
        self.model.load_state_dict(state_dict, strict=True)

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_payload(self) -> dict:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "preset": self.cfg.preset,
            "train_config": self.cfg.to_dict(),
            "run_state": asdict(self.state),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "param_names": self.param_names,
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            payload["cuda_rng"] = torch.cuda.get_rng_state_all()
        return payload

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoints" / f"step_{self.state.step:08d}.pt"
        atomic_torch_save(self.checkpoint_payload(), path)
        old = sorted((self.out / "checkpoints").glob("step_*.pt"))[: -self.cfg.keep_checkpoints]
        for p in old:
            p.unlink(missing_ok=True)
        return path

    def load_state(self, payload: dict) -> None:
        """Restore from :meth:`checkpoint_payload` output (or a shipped-file equivalent)."""
        self.model.load_state_dict(payload["model"], strict=True)
        if "optimizer" in payload:
            if payload.get("param_names") not in (None, self.param_names):
                raise ValueError("checkpoint optimizer state was saved for different parameters")
            self.optimizer.load_state_dict(payload["optimizer"])
        elif "optimizer_moments" in payload:  # a shipped file (see .checkpoint)
            params = dict(self.model.named_parameters())
            for name, moments in payload["optimizer_moments"].items():
                p = params[name]
                self.optimizer.state[p] = {"step": torch.tensor(payload["adam_step"]),
                                           "exp_avg": moments["exp_avg"].to(p), "exp_avg_sq": moments["exp_avg_sq"].to(p)}
        if "scaler" in payload and payload["scaler"]:
            self.scaler.load_state_dict(payload["scaler"])
        if "torch_rng" in payload:
            torch.set_rng_state(payload["torch_rng"])
        if "cuda_rng" in payload and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        self.state = RunState(**payload.get("run_state", {}))

    # -- one step --------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict[str, float]:
        tensors = batch_to_tensors(batch, self.device)
        lr = learning_rate(self.state.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext())
        with autocast:
            outputs = self.model(tensors["images"], heads=("camera", "depth"))
        losses = compute_objective(outputs, tensors, self.cfg.objective)
        loss = losses["objective"]
        self.optimizer.zero_grad(set_to_none=True)
        stats = {k: float(v.detach()) for k, v in losses.items()}
        if not torch.isfinite(loss):
            self.state.skipped_steps += 1
            stats["skipped"] = 1.0
            return stats | {"lr": lr, "grad_norm": float("nan")}
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if torch.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
        else:
            self.state.skipped_steps += 1
            stats["skipped"] = 1.0
        self.scaler.update()
        return stats | {"lr": lr, "grad_norm": float(grad_norm)}

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, windows) -> dict:
        self.model.eval()
        try:
            result = evaluate_windows(windows, self.cfg.evaluation, self.model, self.device)
        finally:
            self.model.train()
        result["step"] = self.state.step
        result["floor"] = floor_check(result)
        write_json(self.out / "eval" / f"step_{self.state.step:08d}.json", result)
        with open(self.out / "eval.jsonl", "a") as fh:
            fh.write(json.dumps(result, sort_keys=True) + "\n")
        return result

    # -- the loop --------------------------------------------------------------------------------

    def run(self, until_step: Optional[int] = None) -> RunState:
        """Train from the current step to ``until_step`` (default ``cfg.steps``). SIGTERM/SIGINT
        finish the current step, save a checkpoint and return."""
        cfg = self.cfg
        end = cfg.steps if until_step is None else min(until_step, cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        windows = heldout_windows(cfg.evaluation)
        stop = {"flag": False}

        def request_stop(signum, frame):
            stop["flag"] = True

        old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        progress = Progress(end, self.state.step, self.echo)
        stream = BatchStream(cfg.data, start=self.state.step, num_workers=self.workers)
        accum: dict[str, float] = {}
        n_accum = 0
        frames_since = 0
        try:
            while self.state.step < end and not stop["flag"]:
                batch = next(stream)
                t0, c0 = time.perf_counter(), time.process_time()
                stats = self.train_step(batch)
                self.state.train_seconds += time.perf_counter() - t0
                self.state.cpu_seconds += time.process_time() - c0
                self.state.step += 1
                frames_since += int(np.prod(batch["images"].shape[:2]))
                for k, v in stats.items():
                    accum[k] = accum.get(k, 0.0) + v
                n_accum += 1
                progress.update(self.state.step, stats["objective"], frames_since)
                if self.state.step % cfg.log_every == 0 or self.state.step == end:
                    row = {k: v / n_accum for k, v in accum.items()} | {
                        "step": self.state.step, "train_seconds": self.state.train_seconds,
                        "cpu_seconds": self.state.cpu_seconds, "skipped_steps": self.state.skipped_steps,
                        "frames_per_s": progress.frames_per_s(), "time": time.time()}
                    with open(self.out / "train_log.jsonl", "a") as fh:
                        fh.write(json.dumps(row, sort_keys=True) + "\n")
                    progress.line(row)
                    accum, n_accum = {}, 0
                if self.state.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                if self.state.step % cfg.eval_every == 0:
                    result = self.evaluate(windows)
                    self.echo(_eval_line(result))
            if stop["flag"] or self.state.step == end:
                self.save_checkpoint()
                if self.state.step == end and self.state.step % cfg.eval_every:
                    self.echo(_eval_line(self.evaluate(windows)))
        finally:
            stream.close()
            progress.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        return self.state


def _eval_line(result: dict) -> str:
    m = result.get("model", {}).get("mean", {})
    base = result["median_depth"]["mean"]
    cv = result["constant_velocity"]["mean"]
    return (f"[eval step {result['step']}] abs_rel {m.get('abs_rel', float('nan')):.3f} "
            f"(median-depth {base['abs_rel']:.3f})  delta<1.25 {m.get('delta_1_25', float('nan')):.3f} "
            f"({base['delta_1_25']:.3f})  pose AUC@30 {m.get('pose_auc_30', float('nan')):.3f} "
            f"(const-velocity {cv['pose_auc_30']:.3f}, identity {result['identity']['mean']['pose_auc_30']:.3f})")


class Progress:
    """A one-line progress bar on a terminal; otherwise nothing between the periodic plain lines
    (:meth:`line`), so logs stay readable."""

    def __init__(self, total: int, start: int, echo=print, stream=None) -> None:
        self.total, self.echo = total, echo
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t_start, self.step_start = time.perf_counter(), start
        self.window: list[tuple[float, int, int]] = []  # (time, step, frames) for the throughput
        self.last_draw = 0.0
        self.loss_ema: Optional[float] = None

    def update(self, step: int, loss: float, frames: int) -> None:
        now = time.perf_counter()
        self.window.append((now, step, frames))
        self.window = self.window[-50:]
        if math.isfinite(loss):
            self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss
        if self.tty and now - self.last_draw > 0.5:
            self.last_draw = now
            done = step / max(1, self.total)
            bar = "#" * int(30 * done)
            self.stream.write(f"\r[{bar:<30}] {step}/{self.total} loss {self.loss_ema or float('nan'):.4f} "
                              f"{self.steps_per_s():.2f} it/s {self.frames_per_s():.1f} frames/s ")
            self.stream.flush()

    def steps_per_s(self) -> float:
        if len(self.window) < 2:
            return 0.0
        (t0, s0, _), (t1, s1, _) = self.window[0], self.window[-1]
        return (s1 - s0) / max(t1 - t0, 1e-9)

    def frames_per_s(self) -> float:
        if len(self.window) < 2:
            return 0.0
        (t0, _, f0), (t1, _, f1) = self.window[0], self.window[-1]
        return (f1 - f0) / max(t1 - t0, 1e-9)

    def line(self, row: dict) -> None:
        text = (f"step {row['step']}/{self.total} loss {row['objective']:.4f} "
                f"(camera {row.get('loss_camera', float('nan')):.4f} depth {row.get('loss_depth', float('nan')):.4f}) "
                f"lr {row['lr']:.2e} |g| {row['grad_norm']:.2f} {self.steps_per_s():.2f} it/s "
                f"{row['frames_per_s']:.1f} frames/s")
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.echo(text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
