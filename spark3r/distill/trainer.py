"""``spark3r distill``: Speed3R's training recipe — a student with learned sparse global layers
imitates the dense teacher (the same weights with dense global attention).

* student: ``load_pretrained(preset, weights)`` of a Speed3R backbone (``pi3-speed3r``,
  ``pi3-speed3r-tiny``), its learned sparse attention installed; the DINOv2 encoder frozen,
  everything else trained. ``reset_gates`` starts the gates from the official initialisation
  (weight 0, bias -1 / +1: compression branch ~0.27, selection branch ~0.73).
* teacher: the same weights with dense global attention (``spark3r.accel.remove``), frozen; or,
  with ``from_pi3``, the official recipe: the π3 model itself, the student starting from its
  remapped weights (:func:`spark3r.models.pi3_speed3r.speed3r_state_dict_from_pi3`).
* **VGGT students** (``vggt-nano-speed3r``, :mod:`spark3r.models.vggt_speed3r`): the teacher is
  the dense preset it is distilled from (``DENSE_TEACHER_PRESETS``: ``vggt-nano``) loaded from
  ``weights`` (``builtin`` = the shipped vggt-nano, the default; a ``.safetensors`` / ``step_*.pt``
  file or a ``spark3r train`` run folder), the student its weights plus fresh gates at the
  official initialisation (:func:`~spark3r.models.vggt_speed3r.speed3r_state_dict_from_dense`);
  loss :func:`spark3r.distill.loss.vggt_distill_loss` on the camera and depth heads; data
  procedural training scenes (``spark3r.data.procedural``, training seeds only) at the preset's
  native width (vggt-nano: 112x140).
* loss: :func:`spark3r.distill.loss.distill_loss`; AdamW (lr 1e-5, weight decay 0.05, betas
  0.9 / 0.95), one-cycle cosine schedule, gradient clipping at 1.0 — the official settings.
* data: random windows of ``frames`` images from a folder, synthetic room sequences (π3
  default) or procedural training scenes (VGGT default).
* output directory: ``model.safetensors`` (the student, strict-loadable with the preset),
  ``config.json`` for the full preset (so ``load_pretrained(None, dir)`` recognises it) and
  ``training_state.pt`` (optimizer, schedule, step, random state) from which a rerun resumes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from spark3r.models.registry import DENSE_TEACHER_PRESETS, HF_MODEL_NAMES

from .loss import distill_loss, vggt_distill_loss

STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "model.safetensors"
DATA_SOURCES = ("synthetic", "procedural")
# VGGT students: the gates are new and must move far (bias -1/+1 towards what the layer needs),
# the pretrained weights hardly at all. On short CPU runs of vggt-nano-speed3r every rate of
# 1e-6 or more on the pretrained weights moved the student *away* from the teacher (AdamW steps
# of ~lr on every weight outweigh the small gap the sparse layers open), while the gates at 1e-2
# closed most of that gap; so the pretrained weights get 1e-7 and the gates 1e-2 by default.
VGGT_LR = 1e-7
VGGT_GATE_LR = 1e-2


@dataclass(frozen=True)
class DistillConfig:
    """Parameters of ``spark3r distill`` (flag = field name with dashes)."""

    out: str                                   # output directory (created; resumed from if it holds a state)
    preset: str = "pi3-speed3r"                # a Speed3R backbone preset
    weights: Optional[str] = None              # student initialisation and teacher (file / dir / hub id / seeded /
                                               # builtin); None: builtin for vggt-nano-speed3r, else seeded
    images: Optional[str] = None               # folder of images; None = generated sequences (``data``)
    frames: int = 4                            # images per sample, 2..24
    size: Optional[tuple[int, int]] = None     # network input (height, width), multiples of the model's
                                               # image multiple (π3 Speed3R 56, VGGT 14); None: 224x224 for
                                               # π3, the native width for VGGT (vggt-nano: 112x140)
    data: Optional[str] = None                 # generated sequences: synthetic (room) or procedural (training
                                               # seeds); None: synthetic for π3, procedural for VGGT
    steps: int = 1000                          # optimizer steps in total, >= 1
    lr: Optional[float] = None                 # peak learning rate, > 0; None: 1e-5 (π3, official) or
                                               # VGGT_LR (VGGT students)
    gate_lr: Optional[float] = None            # peak learning rate of the gates, > 0; None: lr (π3) or
                                               # VGGT_GATE_LR (VGGT students)
    weight_decay: float = 0.05                 # >= 0
    grad_clip: float = 1.0                     # max gradient norm, > 0
    scenes: int = 0                            # generated: distinct scenes cycled through (0 = a new one per step)
    save_every: int = 100                      # steps between training-state saves, >= 1
    reset_gates: bool = False                  # start the gates from the official initialisation
    from_pi3: Optional[str] = None             # π3 weights: the official recipe (teacher = that π3, student = its remapped weights)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from spark3r.models.registry import DEFAULT_SOURCES, native_width, preset_config

        vggt_student = self.preset in DENSE_TEACHER_PRESETS
        teacher = DENSE_TEACHER_PRESETS.get(self.preset, self.preset)
        if self.weights is None:
            object.__setattr__(self, "weights", "builtin" if DEFAULT_SOURCES.get(teacher) == "builtin" else "seeded")
        model_config = preset_config(self.preset)  # also: a clear error for an unknown preset
        multiple = int(getattr(model_config, "image_multiple", model_config.patch_size))
        if self.size is None:  # VGGT: the native width at 4:5 (the quality bench's default 112x140 for the nano)
            width = native_width(self.preset) if vggt_student else 224
            height = width if not vggt_student else max(multiple, round(width * 0.8 / multiple) * multiple)
            object.__setattr__(self, "size", (height, width))
        object.__setattr__(self, "size", tuple(int(x) for x in self.size))
        if self.lr is None:
            object.__setattr__(self, "lr", VGGT_LR if vggt_student else 1e-5)
        if self.gate_lr is None:
            object.__setattr__(self, "gate_lr", VGGT_GATE_LR if vggt_student else self.lr)
        if self.data is None:
            object.__setattr__(self, "data", "procedural" if vggt_student else "synthetic")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        if not 2 <= self.frames <= 24:
            raise ValueError(f"frames must be in 2..24, got {self.frames}")
        if len(self.size) != 2 or min(self.size) < multiple or self.size[0] % multiple or self.size[1] % multiple:
            raise ValueError(f"size must be (height, width), positive multiples of {multiple} for {self.preset}, "
                             f"got {self.size}")
        if self.steps < 1 or self.save_every < 1 or self.scenes < 0:
            raise ValueError("steps and save_every must be >= 1, scenes >= 0")
        if not (self.lr > 0 and self.gate_lr > 0 and self.grad_clip > 0 and self.weight_decay >= 0):
            raise ValueError("lr, gate_lr and grad_clip must be > 0, weight_decay >= 0")


def official_gate_init(model) -> None:
    """Gates as the official constructor makes them: weight 0, bias (-1, +1) per head."""
    with torch.no_grad():
        for attn in model.global_attention_modules():
            linear = attn.gate[0]
            linear.weight.zero_()
            linear.bias.copy_(torch.tensor([-1.0, 1.0]).repeat(linear.bias.numel() // 2))


# The π3 preset whose weights a Speed3R preset starts from (--from-pi3).
PI3_OF = {"pi3-speed3r": "pi3", "pi3-speed3r-tiny": "pi3-tiny"}


def _own_copy(state: dict) -> dict:
    """A state dict whose tensors share no storage with the model it came from: a meta-device
    student built from it takes the tensors themselves (``load_weights``), and training it
    must not move the frozen teacher."""
    return {k: v.detach().clone() for k, v in state.items()}


def _dense_weights_source(weights: str):
    """What ``load_pretrained`` reads for a dense teacher's ``weights``: a ``spark3r train``
    run folder becomes its newest ``checkpoints/step_*.pt``; everything else is passed on."""
    path = Path(weights).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        from spark3r.train.loop import latest_checkpoint

        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{weights}: a run folder without checkpoints/step_*.pt")
        return str(found)
    return weights


def build_vggt_models(config: DistillConfig):
    """(student, teacher) for a VGGT student: the dense teacher preset loaded from ``weights``,
    the student its weights plus gates at the official initialisation (strict load)."""
    from spark3r.models import load_pretrained, load_weights
    from spark3r.models.registry import build_model
    from spark3r.models.vggt_speed3r import speed3r_state_dict_from_dense

    teacher_preset = DENSE_TEACHER_PRESETS[config.preset]
    teacher = load_pretrained(teacher_preset, _dense_weights_source(config.weights),
                              device=config.device)
    state = speed3r_state_dict_from_dense(_own_copy(teacher.state_dict()), teacher.config.num_heads)
    student = load_weights(build_model(config.preset, device="meta"), state, device=config.device)
    teacher.requires_grad_(False).eval()
    student.encoder.requires_grad_(False)
    return student, teacher


def build_models(config: DistillConfig):
    """(student, teacher): the same weights with learned sparse vs dense global attention, or —
    with ``from_pi3`` — the π3 model as teacher and its remapped weights as student."""
    from spark3r import accel
    from spark3r.models import load_pretrained, load_weights
    from spark3r.models.pi3_speed3r import speed3r_state_dict_from_pi3
    from spark3r.models.registry import build_model

    if config.preset in DENSE_TEACHER_PRESETS:
        if config.from_pi3 is not None:
            raise ValueError(f"--from-pi3 is for Speed3R π3 presets; {config.preset} starts from --weights")
        return build_vggt_models(config)
    if config.from_pi3 is not None:
        if config.preset not in PI3_OF:
            raise ValueError(f"--from-pi3 needs a Speed3R π3 preset ({sorted(PI3_OF)}), got {config.preset!r}")
        teacher = load_pretrained(PI3_OF[config.preset], config.from_pi3, device=config.device)
        state = speed3r_state_dict_from_pi3(_own_copy(teacher.state_dict()), teacher.config.num_heads)
        student = load_weights(build_model(config.preset, device="meta"), state, device=config.device)
        teacher.requires_grad_(False).eval()
        student.encoder.requires_grad_(False)
        return student, teacher
    student = load_pretrained(config.preset, config.weights, device=config.device)
    if not all(getattr(m, "gate", None) is not None for m in student.global_attention_modules()):
        raise ValueError(f"preset {config.preset!r} has no learned Speed3R gates; use pi3-speed3r or pi3-speed3r-tiny")
    if config.reset_gates:
        official_gate_init(student)
    teacher = load_pretrained(config.preset, config.weights, device=config.device)
    accel.remove(teacher)
    teacher.requires_grad_(False).eval()
    student.encoder.requires_grad_(False)
    return student, teacher


class SampleSource:
    """Samples of ``frames`` images ``[frames, 3, H, W]`` in [0, 1], reproducible per step."""

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.pool = None
        if config.images is not None:
            from spark3r.models.preprocess import load_images

            from spark3r.models.registry import preset_config

            model_config = preset_config(config.preset)
            multiple = int(getattr(model_config, "image_multiple", model_config.patch_size))
            self.pool = load_images(config.images, "crop", config.size[1], multiple=multiple)
            if self.pool.shape[0] < config.frames:
                raise ValueError(f"{config.images} holds {self.pool.shape[0]} images, fewer than frames={config.frames}")
            h = self.pool.shape[2] // multiple * multiple
            self.pool = self.pool[:, :, :min(h, config.size[0])]

    def __call__(self, step: int) -> torch.Tensor:
        cfg = self.config
        if self.pool is not None:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            pick = torch.randperm(self.pool.shape[0], generator=g)[: cfg.frames].sort().values
            return self.pool[pick]
        scene = step % cfg.scenes if cfg.scenes else step
        if cfg.data == "procedural":
            from spark3r.data.procedural import render_procedural, train_seed

            seed = train_seed(np.random.default_rng([cfg.seed, scene, 0xD157]))  # never a held-out scene
            seq = render_procedural(seed, cfg.frames, cfg.size[0], cfg.size[1])
        else:
            from spark3r.data.synthetic import render_sequence

            seq = render_sequence(num_frames=cfg.frames, height=cfg.size[0], width=cfg.size[1], seed=cfg.seed + scene)
        return torch.from_numpy(np.ascontiguousarray(seq.images)).permute(0, 3, 1, 2).float().div(255.0)


def parameter_groups(student, config: DistillConfig) -> list[dict]:
    """The trainable parameters (all but the frozen encoder) as AdamW groups: the gates at
    ``gate_lr``, everything else at ``lr`` (one group when they are equal)."""
    gates = {id(p) for m in student.global_attention_modules() if getattr(m, "gate", None) is not None
             for p in m.gate.parameters()}
    trainable = [p for p in student.parameters() if p.requires_grad]
    if config.gate_lr == config.lr:
        return [{"params": trainable, "lr": config.lr}]
    return [{"params": [p for p in trainable if id(p) not in gates], "lr": config.lr},
            {"params": [p for p in trainable if id(p) in gates], "lr": config.gate_lr}]


def sample_loss(student, teacher, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The distillation loss of ``student`` on one sample (teacher without gradients): π3's
    local points + cameras, or for a VGGT student its cameras + depth (:mod:`.loss`)."""
    from spark3r.models.vggt import VGGT

    vggt = isinstance(student, VGGT)
    heads = ("camera", "depth") if vggt else ("camera", "point")
    with torch.no_grad():
        target = teacher(images, heads=heads)
    return (vggt_distill_loss if vggt else distill_loss)(student(images, heads=heads), target)


def distill(config: DistillConfig, progress: bool = True, log: Callable[[str], None] = print,
            stop_after: Optional[int] = None) -> dict:
    """Train (or resume) and write the output directory; returns the last losses and step.
    ``stop_after``: run at most this many steps in this call (a later call resumes)."""
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    student, teacher = build_models(config)
    groups = parameter_groups(student, config)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=config.steps,
                                                   anneal_strategy="cos")
    start = 0
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        # States written before `data` and `gate_lr` existed: synthetic sequences, one learning rate.
        saved = {"data": "synthetic", "gate_lr": state["config"].get("lr"), **state["config"]}
        if saved != _comparable(config):
            raise ValueError(f"{state_path} was written with different settings {saved}; "
                             f"use another --out or the same settings to resume")
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = int(state["step"])
        log(f"resuming at step {start} of {config.steps}")
    source = SampleSource(config)
    student.train()
    last: dict = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="distill", unit="step")
    end = config.steps if stop_after is None else min(config.steps, start + int(stop_after))
    for step in range(start, end):
        images = source(step).to(config.device)
        loss, parts = sample_loss(student, teacher, images)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss at step {step}: {parts}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        schedule.step()
        last = {**parts, "step": step + 1}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.4g}")
        if (step + 1) % config.save_every == 0 or step + 1 == end:
            _save(out, student, optimizer, schedule, step + 1, config)
    if bar is not None:
        bar.close()
    student.eval()
    return last


def _comparable(config: DistillConfig) -> dict:
    """Settings a resumed run must share (the output path and device may differ)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "device", "save_every")}


def _save(out: Path, student, optimizer, schedule, step: int, config: DistillConfig) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    save_file(weights, str(out / (WEIGHTS_FILE + ".tmp")))
    (out / (WEIGHTS_FILE + ".tmp")).replace(out / WEIGHTS_FILE)
    if config.preset == "pi3-speed3r":  # what the official checkpoint's config.json says
        (out / "config.json").write_text(json.dumps({"decoder_size": "large", "pos_type": "rope100"}))
    elif config.preset in HF_MODEL_NAMES.values():  # load_pretrained(None, out) then knows the preset
        (out / "config.json").write_text(json.dumps({"model_name": config.preset}))
    state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "step": step, "config": _comparable(config)}
    torch.save(state, out / (STATE_FILE + ".tmp"))
    (out / (STATE_FILE + ".tmp")).replace(out / STATE_FILE)
