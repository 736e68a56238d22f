"""``spark3r distill``: the loss pieces, and short runs on pi3-speed3r-tiny (CPU, synthetic) and on the
VGGT student vggt-nano-speed3r from the built-in vggt-nano (CPU, procedural)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spark3r.cli import main
from spark3r.distill.loss import distill_loss, relative_poses, vggt_distill_loss, weighted_l1_scale
from spark3r.distill.trainer import DistillConfig, SampleSource, build_models, distill, sample_loss
from spark3r.models import load_pretrained


def random_poses(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, n, 3, 3, generator=g))
    q = q * torch.det(q).sign()[..., None, None]
    pose = torch.eye(4).repeat(b, n, 1, 1)
    pose[..., :3, :3], pose[..., :3, 3] = q, torch.randn(b, n, 3, generator=g)
    return pose


def test_weighted_l1_scale_is_exact_and_robust():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 500, 3, generator=g)
    tgt = src * torch.tensor([2.5, 0.4]).view(2, 1, 1)
    weight = torch.rand(2, 500, generator=g)
    torch.testing.assert_close(weighted_l1_scale(src, tgt, weight), torch.tensor([2.5, 0.4]))
    tgt[:, :40] += 100.0  # a few gross outliers do not move an L1 fit
    torch.testing.assert_close(weighted_l1_scale(src, tgt, weight), torch.tensor([2.5, 0.4]))


def test_loss_ignores_global_scale_and_world_frame():
    g = torch.Generator().manual_seed(1)
    local = torch.randn(1, 3, 8, 8, 3, generator=g)
    local[..., 2] = local[..., 2].abs() + 0.5
    poses = random_poses(1, 3, 2)
    teacher = {"local_points": local, "camera_poses": poses}
    world = random_poses(1, 1, 3)
    scaled = poses.clone()
    scaled[..., :3, 3] *= 3.0
    student = {"local_points": local * 3.0, "camera_poses": world @ scaled}
    total, parts = distill_loss(student, teacher)
    assert total.item() < 1e-3 and parts["local_points"] < 1e-6  # acos is clamped at 1 - 1e-6
    moved = {"local_points": local * 3.0, "camera_poses": world @ random_poses(1, 3, 4)}
    assert distill_loss(moved, teacher)[1]["camera"] > 0.1
    assert relative_poses(poses).shape == (1, 6, 4, 4)


@pytest.mark.parametrize("bad", [{"frames": 1}, {"size": (100, 112)}, {"steps": 0}, {"lr": 0.0}])
def test_config_ranges(bad, tmp_path):
    with pytest.raises(ValueError):
        DistillConfig(out=str(tmp_path), **bad)


def test_distill_brings_the_student_closer_to_the_dense_teacher_and_resumes(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "run"), preset="pi3-speed3r-tiny", frames=2, size=(112, 112), steps=6,
                        lr=5e-6, scenes=1, save_every=3, reset_gates=True)
    student, teacher = build_models(cfg)  # the untrained-gate student
    images = SampleSource(cfg)(0)
    with torch.no_grad():
        before = sample_loss(student, teacher, images)[1]["total"]
    logs = []
    first = distill(cfg, progress=False, stop_after=3, log=logs.append)
    assert first["step"] == 3 and (tmp_path / "run" / "training_state.pt").is_file()
    last = distill(cfg, progress=False, log=logs.append)
    assert last["step"] == 6 and logs == ["resuming at step 3 of 6"]
    trained = load_pretrained("pi3-speed3r-tiny", str(tmp_path / "run" / "model.safetensors"))
    with torch.no_grad():
        after = sample_loss(trained, teacher, images)[1]["total"]
    assert math.isfinite(after) and after < before
    with pytest.raises(ValueError, match="different settings"):
        distill(DistillConfig(**{**cfg.__dict__, "lr": 1e-4}), progress=False)


def test_distill_command_runs_and_refuses_a_model_without_gates(tmp_path, capsys):
    args = ["distill", "--out", str(tmp_path / "cli"), "--preset", "pi3-speed3r-tiny", "--frames", "2",
            "--size", "112x112", "--steps", "1", "--no-progress"]
    assert main(args) == 0
    assert '"step": 1' in capsys.readouterr().out
    assert main(["distill", "--out", str(tmp_path / "x"), "--preset", "pi3-tiny", "--size", "112x112",
                 "--steps", "1", "--no-progress"]) == 2
    assert "no learned Speed3R gates" in capsys.readouterr().err


def test_student_from_pi3_weights_is_the_official_remapping(tmp_path):
    from spark3r.models.pi3_speed3r import speed3r_state_dict_from_pi3

    pi3 = load_pretrained("pi3-tiny", "seeded")
    state = speed3r_state_dict_from_pi3(pi3.state_dict(), num_heads=6)
    assert "register_token" not in state and torch.equal(state["global_decoder.1.attn.qkv.weight"],
                                                         pi3.state_dict()["decoder.3.attn.qkv.weight"])
    assert torch.equal(state["global_decoder.0.attn.gate.0.bias"], torch.tensor([-1.0, 1.0] * 6))
    cfg = DistillConfig(out=str(tmp_path / "p"), preset="pi3-speed3r-tiny", from_pi3="seeded", frames=2,
                        size=(112, 112), steps=1)
    student, teacher = build_models(cfg)  # loads strictly
    assert teacher.preset == "pi3-tiny" and not any(p.requires_grad for p in teacher.parameters())
    assert distill(cfg, progress=False)["step"] == 1


# -- a VGGT student: vggt-nano-speed3r from the built-in vggt-nano --------------------------------


def test_vggt_loss_is_zero_for_the_teacher_and_ignores_the_depth_scale():
    g = torch.Generator().manual_seed(3)
    quat = torch.nn.functional.normalize(torch.randn(1, 3, 4, generator=g), dim=-1)
    pose = torch.cat((0.1 * torch.randn(1, 3, 3, generator=g), quat, torch.full((1, 3, 2), 1.1)), dim=-1)
    depth = torch.rand(1, 3, 8, 10, 1, generator=g) + 0.5
    teacher = {"pose_enc": pose, "depth": depth}
    total, parts = vggt_distill_loss({"pose_enc": pose.clone(), "depth": 2.5 * depth}, teacher)
    assert parts["local_points"] < 1e-6 and parts["camera"] == 0 and total.item() < 1e-6
    moved = vggt_distill_loss({"pose_enc": pose + 0.1, "depth": depth * (1 + 0.2 * torch.rand_like(depth))}, teacher)[1]
    assert moved["camera"] > 0.05 and moved["local_points"] > 1e-3


def test_vggt_student_defaults_follow_the_nano():
    cfg = DistillConfig(out="x", preset="vggt-nano-speed3r")
    assert (cfg.weights, cfg.size, cfg.data) == ("builtin", (112, 140), "procedural")
    assert cfg.gate_lr > cfg.lr
    assert DistillConfig(out="x", preset="vggt-nano-speed3r", size=(42, 70)).size == (42, 70)  # multiples of 14
    with pytest.raises(ValueError, match="multiples of 14"):
        DistillConfig(out="x", preset="vggt-nano-speed3r", size=(50, 70))
    pi3 = DistillConfig(out="x")
    assert (pi3.weights, pi3.size, pi3.data, pi3.lr, pi3.gate_lr) == ("seeded", (224, 224), "synthetic", 1e-5, 1e-5)


def test_vggt_samples_are_procedural_training_scenes():
    from spark3r.data.procedural import is_heldout_seed, render_procedural, train_seed

    cfg = DistillConfig(out="x", preset="vggt-nano-speed3r", frames=2, size=(28, 42), scenes=2)
    source = SampleSource(cfg)
    first = source(0)
    assert first.shape == (2, 3, 28, 42) and torch.equal(first, source(2))  # scenes cycle
    seed = train_seed(np.random.default_rng([0, 0, 0xD157]))
    assert not is_heldout_seed(seed)
    expected = torch.from_numpy(render_procedural(seed, 2, 28, 42).images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(first, expected)


def test_vggt_distill_brings_the_student_closer_to_the_dense_nano_and_resumes(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "nano"), preset="vggt-nano-speed3r", weights="builtin", frames=3,
                        size=(56, 70), steps=6, scenes=1, save_every=3)
    student, teacher = build_models(cfg)  # the fresh-gate student
    assert teacher.preset == "vggt-nano" and not any(p.requires_grad for p in teacher.parameters())
    assert not any(p.requires_grad for p in student.encoder.parameters())
    shared = {p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in student.parameters()}
    assert not shared  # training the student must not move the teacher
    images = SampleSource(cfg)(0)
    with torch.no_grad():
        before = sample_loss(student, teacher, images)[1]
    assert before["total"] > 0 and before["local_points"] > 0
    logs = []
    assert distill(cfg, progress=False, stop_after=3, log=logs.append)["step"] == 3
    assert distill(cfg, progress=False, log=logs.append)["step"] == 6 and logs == ["resuming at step 3 of 6"]
    out = tmp_path / "nano"
    assert json.loads((out / "config.json").read_text()) == {"model_name": "vggt-nano-speed3r"}
    trained = load_pretrained("vggt-nano-speed3r", str(out))
    assert load_pretrained(None, str(out)).preset == "vggt-nano-speed3r"
    fresh_teacher = load_pretrained("vggt-nano", "builtin")
    with torch.no_grad():
        after = sample_loss(trained, fresh_teacher, images)[1]
    assert math.isfinite(after["total"]) and after["total"] < before["total"]
    gate = trained.aggregator.global_blocks[0].attn.gate[0].bias
    assert not torch.equal(gate, torch.tensor([-1.0, 1.0] * 2))  # the gates learned


def test_vggt_distill_command_and_weights_sources(tmp_path, capsys):
    args = ["distill", "--out", str(tmp_path / "cli"), "--preset", "vggt-nano-speed3r", "--weights", "builtin",
            "--frames", "2", "--size", "28x42", "--steps", "1", "--no-progress"]
    assert main(args) == 0
    assert '"step": 1' in capsys.readouterr().out
    # a `spark3r train` run folder: its newest checkpoint is the teacher
    from spark3r.models.builtin import builtin_checkpoint_path
    from spark3r.train.checkpoint import read_resume_payload

    payload, _ = read_resume_payload(builtin_checkpoint_path("vggt-nano"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": payload["model"]}, tmp_path / "run" / "checkpoints" / "step_00000010.pt")
    cfg = DistillConfig(out=str(tmp_path / "r"), preset="vggt-nano-speed3r", weights=str(tmp_path / "run"),
                        frames=2, size=(28, 42), steps=1)
    student, teacher = build_models(cfg)
    assert all(torch.equal(v, payload["model"][k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="from-pi3"):
        build_models(DistillConfig(out=str(tmp_path / "p"), preset="vggt-nano-speed3r", from_pi3="seeded"))
