"""spark3r train: objective, schedule, learning on a fixed batch, bit-identical resume, the
shipped-file round trip and the held-out metrics."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from spark3r.cli import main as cli_main
from spark3r.models.camera import extrinsics_intrinsics_to_pose_encoding
from spark3r.train.checkpoint import export_shipped, read_resume_payload
from spark3r.train.data import BatchStream, DataConfig, batch_layout, render_batch
from spark3r.eval.pose import pairwise_pose_errors, pose_auc
from spark3r.train.evaluate import constant_velocity_c2w, median_scaled_depth_errors
from spark3r.train.loop import Trainer, TrainConfig, batch_to_tensors, learning_rate
from spark3r.train.objective import ObjectiveConfig, compute_objective, normalize_scene

TINY_DATA = DataConfig(data_seed=5, min_frames=2, max_frames=3, widths=(56,), min_aspect=0.75, max_aspect=0.75)


def _tiny_args(out, *extra):
    return ["train", "--out", str(out), "--steps", "6", "--warmup-steps", "2", "--log-every", "3",
            "--ckpt-every", "3", "--eval-every", "100", "--eval-windows", "1", "--eval-width", "56",
            "--frames", "2", "3", "--widths", "56", "--workers", "0", "--threads", "1", *extra]


def test_normalized_scene_is_first_camera_frame_at_unit_mean_distance():
    batch = batch_to_tensors(render_batch(TINY_DATA, 0), "cpu")
    depth = batch["depth"].double()
    valid = depth > 0
    ext, nd, scale = normalize_scene(batch["c2w"].double(), depth, batch["K"].double(), valid)
    assert torch.allclose(ext[:, 0], torch.eye(4, dtype=torch.float64)[:3], atol=1e-9)
    assert torch.allclose(nd * scale[:, None, None, None], depth)
    # Re-normalising already normalised ground truth is the identity (scale 1).
    c2w = torch.linalg.inv(torch.cat([ext, torch.tensor([0, 0, 0, 1.0], dtype=ext.dtype).expand(*ext.shape[:2], 1, 4)], -2))
    _, _, scale2 = normalize_scene(c2w, nd, batch["K"].double(), valid)
    assert torch.allclose(scale2, torch.ones_like(scale2), atol=1e-9)


def test_objective_is_zero_ish_for_the_ground_truth():
    batch = batch_to_tensors(render_batch(TINY_DATA, 1), "cpu")
    depth = batch["depth"].double()
    ext, nd, _ = normalize_scene(batch["c2w"].double(), depth, batch["K"].double(), depth > 0)
    pose = extrinsics_intrinsics_to_pose_encoding(ext, batch["K"].double(), depth.shape[-2:]).float()
    outputs = {"pose_enc_list": [pose] * 4, "depth": nd.float()[..., None], "depth_conf": torch.ones_like(nd).float() + 1}
    losses = compute_objective(outputs, batch, ObjectiveConfig())
    assert losses["loss_camera"] < 1e-5 and losses["loss_reg_depth"] < 1e-5 and losses["loss_grad_depth"] < 1e-5
    worse = dict(outputs, depth=outputs["depth"] * 1.2)
    assert compute_objective(worse, batch, ObjectiveConfig())["loss_reg_depth"] > 0.05


def test_geometric_point_loss_is_zero_for_the_truth_and_moves_the_poses():
    batch = batch_to_tensors(render_batch(dataclasses.replace(TINY_DATA, min_frames=3, max_frames=3), 2), "cpu")
    depth = batch["depth"].double()
    ext, nd, _ = normalize_scene(batch["c2w"].double(), depth, batch["K"].double(), depth > 0)
    pose = extrinsics_intrinsics_to_pose_encoding(ext, batch["K"].double(), depth.shape[-2:]).float()
    cfg = ObjectiveConfig(point_weight=1.0)
    truth = {"pose_enc_list": [pose], "depth": nd.float()[..., None], "depth_conf": torch.ones_like(nd).float() + 1}
    assert compute_objective(truth, batch, cfg)["loss_point"] < 1e-4
    assert "loss_point" not in compute_objective(truth, batch, ObjectiveConfig())  # off by default
    # Every frame's pose gets a gradient from its pixels (frame 0's too: it is the frame all others are in).
    constant = pose.mean(1, keepdim=True).expand_as(pose).clone().requires_grad_(True)
    losses = compute_objective(dict(truth, pose_enc_list=[constant]), batch, cfg)
    assert losses["loss_point"] > 0.01
    losses["loss_point"].backward()
    assert (constant.grad[0].abs().sum(-1) > 0).all()


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(55, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert learning_rate(100, cfg) == pytest.approx(1e-4) and learning_rate(500, cfg) == pytest.approx(1e-4)
    lrs = [learning_rate(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_stream_is_a_function_of_the_index_whatever_the_workers():
    with BatchStream(TINY_DATA, start=3, num_workers=2) as stream:
        got = [next(stream) for _ in range(3)]
    for k, batch in enumerate(got):
        ref = render_batch(TINY_DATA, 3 + k)
        assert batch["index"] == 3 + k and np.array_equal(batch["images"], ref["images"])
    frames, h, w, seeds = batch_layout(TINY_DATA, 0)
    assert 2 <= frames <= 3 and (h, w) == (42, 56) and len(seeds) == 1


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(tmp_path):
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=40, warmup_steps=2, lr=1e-3, data=TINY_DATA)
    trainer = Trainer(cfg, tmp_path, workers=0)
    batch = render_batch(TINY_DATA, 0)
    losses = [trainer.train_step(batch)["objective"] for _ in range(25)]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_resume_continues_bit_identically(tmp_path, capsys):
    torch.set_num_threads(1)
    assert cli_main(_tiny_args(tmp_path / "straight")) == 0
    assert cli_main(_tiny_args(tmp_path / "split", "--until-step", "3")) == 0
    assert cli_main(["train", "--out", str(tmp_path / "split"), "--resume", str(tmp_path / "split"), "--workers", "1"]) == 0
    a, _ = read_resume_payload(tmp_path / "straight")
    b, _ = read_resume_payload(tmp_path / "split")
    assert a["run_state"]["step"] == b["run_state"]["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert (tmp_path / "split" / "eval" / "step_00000006.json").is_file()
    # A run folder with checkpoints is never silently restarted from scratch.
    assert cli_main(_tiny_args(tmp_path / "split")) == 2


def test_shipped_file_loads_strictly_and_resumes(tmp_path):
    from spark3r.models import load_pretrained

    torch.set_num_threads(1)
    assert cli_main(_tiny_args(tmp_path / "run", "--until-step", "3")) == 0
    payload, _ = read_resume_payload(tmp_path / "run")
    shipped = export_shipped(payload, tmp_path / "nano.safetensors", {"note": "test"})
    model = load_pretrained("vggt-nano", str(shipped))
    for k, v in model.state_dict().items():
        assert torch.equal(v, payload["model"][k]), k
    again, _ = read_resume_payload(shipped)
    assert again["run_state"]["step"] == 3 and again["train_config"] == payload["train_config"]
    assert cli_main(["train", "--out", str(tmp_path / "cont"), "--resume", str(shipped), "--workers", "0"]) == 0
    cont, _ = read_resume_payload(tmp_path / "cont")
    assert cont["run_state"]["step"] == 6


def test_init_starts_a_new_stage_from_trained_weights(tmp_path):
    torch.set_num_threads(1)
    assert cli_main(_tiny_args(tmp_path / "stage1", "--until-step", "3")) == 0
    first, src = read_resume_payload(tmp_path / "stage1")
    # Stage 2: other data and loss weights; the weights carry over, the optimizer and step do not.
    assert cli_main(_tiny_args(tmp_path / "stage2", "--init", str(tmp_path / "stage1"), "--until-step", "0",
                               "--frames", "2", "2", "--camera-weight", "10", "--rotation-weight", "4")) == 0
    second, _ = read_resume_payload(tmp_path / "stage2")
    assert second["run_state"]["step"] == 0 and not second["optimizer"]["state"]
    for k in first["model"]:
        assert torch.equal(first["model"][k], second["model"][k]), k
    cfg = second["train_config"]
    assert cfg["init_from"] == str(src) and cfg["objective"]["camera_weight"] == 10.0
    assert cfg["objective"]["weight_rot"] == 4.0
    assert cfg["data"]["max_frames"] == 2
    # Continuing a stage with --resume keeps its settings; mixing both, or a wrong preset, is refused.
    assert cli_main(["train", "--out", str(tmp_path / "stage2"), "--resume", str(tmp_path / "stage2"),
                     "--until-step", "2", "--workers", "0"]) == 0
    assert read_resume_payload(tmp_path / "stage2")[0]["train_config"]["init_from"] == str(src)
    assert cli_main(_tiny_args(tmp_path / "x", "--init", str(tmp_path / "stage1"), "--resume", str(tmp_path / "stage1"))) == 2
    assert cli_main(_tiny_args(tmp_path / "y", "--init", str(tmp_path / "stage1"), "--preset", "vggt-tiny")) == 2
    with pytest.raises(ValueError, match="camera_weight"):
        ObjectiveConfig(camera_weight=-1.0)


def test_motion_curriculum_draws_only_the_given_motions():
    cfg = dataclasses.replace(TINY_DATA, motions=("rotation",))
    batch = render_batch(cfg, 3)
    from spark3r.data.procedural import render_procedural
    frames, h, w, seeds = batch_layout(cfg, 3)
    assert np.array_equal(batch["c2w"][0], render_procedural(seeds[0], frames, h, w, motion="rotation").c2w)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="motions"):
        DataConfig(motions=("teleport",))


def test_depth_metrics_are_scale_invariant():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 5, (3, 8, 8))
    perfect = median_scaled_depth_errors(gt * 7.0, gt)
    assert perfect["abs_rel"] == pytest.approx(0.0, abs=1e-12) and perfect["delta_1_25"] == 1.0
    noisy = median_scaled_depth_errors(gt * rng.uniform(0.7, 1.3, gt.shape), gt)
    assert 0.05 < noisy["abs_rel"] < 0.2 and noisy["delta_1_25"] < 1.0


def test_pose_auc_and_baselines():
    from spark3r.data.procedural import camera_pose

    gt = np.stack([camera_pose(np.array([0.3 * k, 0.1 * k * k, 1.0]), 0.2 * k, 0.05 * k) for k in range(6)])
    r, t = pairwise_pose_errors(gt, gt, 0.01)
    assert np.allclose(r, 0, atol=1e-5) and np.allclose(t, 0, atol=1e-3) and pose_auc(r, t) == 1.0
    # Similarity-transformed predictions (other world frame and scale) score the same.
    sim = np.eye(4)
    sim[:3, :3] = camera_pose(np.zeros(3), 1.0, 0.3, 0.2)[:3, :3]
    moved = sim @ gt
    moved[:, :3, 3] *= 2.5
    assert pose_auc(*pairwise_pose_errors(moved, gt, 0.01)) == 1.0
    ident = np.repeat(np.eye(4)[None], 6, axis=0)
    assert pose_auc(*pairwise_pose_errors(ident, gt, 0.01)) < 0.2
    cv = constant_velocity_c2w(gt)
    assert np.allclose(cv[:2], gt[:2])
    assert 0.0 < pose_auc(*pairwise_pose_errors(cv, gt, 0.01)) < 1.0
