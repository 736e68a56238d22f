"""The shipped vggt-nano checkpoint: strict loading, what it carries, its model card, the mapper
path with ``checkpoint: builtin``, and held-out quality against the trivial baselines."""
import json
import re

import numpy as np
import pytest
import torch

from spark3r.models import load_pretrained
from spark3r.models.builtin import builtin_checkpoint_path, builtin_presets
from spark3r.models.registry import native_width
from spark3r.train.checkpoint import SHIPPED_FORMAT, read_shipped_metadata
from spark3r.train.evaluate import EvalConfig, evaluate_windows, heldout_windows

PATH = builtin_checkpoint_path("vggt-nano")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_pretrained("vggt-nano", "builtin")


def test_shipped_file_is_small_and_carries_the_training_state():
    assert builtin_presets() == ["vggt-nano"]
    assert PATH.stat().st_size <= 40 * 1024 * 1024
    meta = read_shipped_metadata(PATH)
    assert meta["format"] == SHIPPED_FORMAT and meta["preset"] == "vggt-nano"
    run_state = json.loads(meta["run_state"])
    assert run_state["step"] > 0 and run_state["skipped_steps"] == 0
    # The model card reports the shipped step.
    card = PATH.with_suffix(".md").read_text()
    assert re.search(rf"\b{run_state['step']}\b", card.replace(",", ""))


def test_resume_builtin_restores_weights_and_optimizer_state(model):
    from spark3r.train.checkpoint import read_resume_payload
    from spark3r.train.loop import Trainer, TrainConfig

    payload, path = read_resume_payload("builtin")
    assert path == PATH and payload["preset"] == "vggt-nano"
    cfg = TrainConfig.from_dict(payload["train_config"])
    trainer = Trainer(cfg, "/nonexistent-not-written", workers=0)
    trainer.load_state(payload)
    assert trainer.state.step == json.loads(read_shipped_metadata(PATH)["run_state"])["step"]
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(payload["optimizer_moments"]) == trained
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), model.state_dict()[name]), name
        if name in trained:
            assert trainer.optimizer.state[p]["exp_avg_sq"].min() >= 0


def test_loads_strictly_by_default_source(model):
    again = load_pretrained("vggt-nano")  # the preset's default source is the built-in file
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(FileNotFoundError, match="built-in: vggt-nano"):
        load_pretrained("vggt-tiny", "builtin")


def test_beats_the_trivial_baselines_on_a_held_out_sequence(model):
    cfg = EvalConfig(num_windows=1, first_seed=3, min_frames=12, max_frames=12, width=native_width("vggt-nano"))
    result = evaluate_windows(heldout_windows(cfg), cfg, model)
    m, base = result["model"]["mean"], result["median_depth"]["mean"]
    assert m["abs_rel"] < base["abs_rel"] and m["delta_1_25"] > base["delta_1_25"]
    assert m["pose_auc_30"] > result["identity"]["mean"]["pose_auc_30"]


def test_mapper_backbone_with_checkpoint_builtin():
    from spark3r.data.procedural import render_procedural
    from spark3r.mapping import BackboneConfig
    from spark3r.mapping.frames import Keyframe
    from spark3r.mapping.model_backbone import ModelBackbone

    bb = ModelBackbone.from_config(BackboneConfig(backbone="vggt-nano", checkpoint="builtin",
                                                  image_width=native_width("vggt-nano")), 6, 3)
    seq = render_procedural(5, 6, 120, 160)
    window = [Keyframe(id=i, stamp_ns=int(seq.stamps_ns[i]), image=seq.images[i], K=seq.K) for i in range(6)]
    pred = bb.predict(window)
    assert np.all(np.isfinite(pred.depth)) and np.all(pred.depth > 0)
    assert pred.c2w.shape == (6, 4, 4) and np.all(np.isfinite(pred.c2w))


@pytest.mark.parametrize("preset,width", [("vggt-nano", 140), ("vggt-tiny", 518)])
def test_image_width_defaults_to_the_native_width(preset, width):
    from spark3r.mapping import BackboneConfig
    from spark3r.mapping.model_backbone import ModelBackbone

    assert native_width(preset) == width
    bb = ModelBackbone.from_config(BackboneConfig(backbone=preset, checkpoint="seeded"), 4, 2)
    assert bb.image_width == width
    assert ModelBackbone.from_config(BackboneConfig(backbone=preset, checkpoint="seeded", image_width=56), 4, 2).image_width == 56
