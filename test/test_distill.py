"""``spark3r distill``: the loss pieces, and a short run on pi3-speed3r-tiny (CPU, synthetic)."""
from __future__ import annotations

import math

import pytest
import torch

from spark3r.cli import main
from spark3r.distill.loss import distill_loss, relative_poses, weighted_l1_scale
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
