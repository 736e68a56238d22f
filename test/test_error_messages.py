"""Error messages that used to send users the wrong way (issue 16): a random .pt, a checkpoint of
another preset, a junk schedule file, an eval association error, strict JSON writing."""
import json
import math

import numpy as np
import pytest
import torch

from spark3r.accel.schedule import load_schedule
from spark3r.data import strict_json
from spark3r.eval import cli as eval_cli
from spark3r.eval.trajectory import evaluate_trajectory
from spark3r.models import CheckpointMismatchError, CheckpointReadError, build_model, load_pretrained
from spark3r.models.checkpoints import guess_preset
from spark3r.offline import cli as map_cli


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save(build_model("vggt-tiny").state_dict(), path)
    return path


def test_random_bytes_pt_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointReadError) as info:
        load_pretrained("vggt-tiny", path)
    text = str(info.value)
    assert f"cannot read {path}: not a PyTorch checkpoint" in text
    assert "zipfile" not in text and "re-save" not in text  # torch's misleading advice is gone


def test_legacy_torch_save_still_loads(tmp_path):
    sd = build_model("vggt-tiny").state_dict()
    path = tmp_path / "legacy.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    model = load_pretrained("vggt-tiny", path)
    assert torch.equal(model.state_dict()["aggregator.camera_token"], sd["aggregator.camera_token"])


@pytest.mark.parametrize("wrong", ["vggt-1b", "pi3-tiny", "da3-small"])
def test_checkpoint_of_another_preset_names_the_likely_preset(tiny_checkpoint, wrong):
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(wrong, tiny_checkpoint)
    text = str(info.value)
    assert len(text.splitlines()) == 1 and text.endswith("Wrong preset? --backbone vggt-tiny")
    assert f"does not fit preset {wrong!r}" in text and "(100% match)" in text
    assert info.value.missing or info.value.wrong_shape  # the details stay on the exception


def test_map_command_says_which_backbone_a_checkpoint_is_for(tiny_checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    import cv2

    cv2.imwrite(str(images / "0.png"), np.zeros((28, 28, 3), np.uint8))
    code = map_cli.main([str(images), "--out", str(tmp_path / "o"), "--backbone", "pi3-tiny",
                         "--checkpoint", str(tiny_checkpoint), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--backbone vggt-tiny" in err and len(err.strip().splitlines()) == 1


def test_an_unrelated_checkpoint_keeps_the_short_key_listing():
    sd = build_model("vggt-tiny").state_dict()
    sd.pop("aggregator.camera_token")
    assert guess_preset({k: tuple(v.shape) for k, v in sd.items()})[0] == "vggt-tiny"
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained("vggt-tiny", sd)  # its own preset: the listing says what is missing
    assert "missing keys (1)" in str(info.value) and "aggregator.camera_token" in str(info.value)
    assert guess_preset({"something": (3,)}) is None


def test_official_layouts_are_recognised(shared):
    for listing, preset in (("vggt", "vggt-1b"), ("pi3", "pi3"), ("da3_small", "da3-small"), ("da3_giant", "da3-giant")):
        rows = (shared / "specs" / f"{listing}_state_dict.tsv").read_text().strip().splitlines()[1:]
        shapes = {r.split("\t")[0]: tuple(int(x) for x in r.split("\t")[1].split("x") if x) for r in rows}
        name, share = guess_preset(shapes)
        assert name == preset and share > 0.95, (listing, name, share)


def test_junk_schedule_file_is_named(tmp_path):
    junk = tmp_path / "sched.json"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    with pytest.raises(ValueError, match=f"schedule file {junk} is not a text"):
        load_schedule(junk)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=f"schedule file {wrong}: unknown schedule format"):
        load_schedule(wrong)


def test_eval_association_error_names_the_flag(tmp_path, capsys):
    stamps = np.arange(5, dtype=np.int64) * 100_000_000
    poses = np.repeat(np.eye(4)[None], 5, axis=0)
    with pytest.raises(ValueError, match=r"spark3r eval --max-diff SECONDS"):
        evaluate_trajectory(stamps + 10**9, poses, stamps, poses, max_diff_ns=20_000_000)
    est = tmp_path / "est.tum"
    est.write_text("0 0 0 0 0 0 0 1\n")
    code = eval_cli.main([str(est), "--gt", str(est), "--max-diff", "-1", "--no-plots"])
    assert code == 2 and "--max-diff must be a non-negative number" in capsys.readouterr().err


def test_strict_json_writes_null_never_nan():
    value = {"a": float("nan"), "b": [np.float32("inf"), 1.5, np.int64(3)], "c": np.array([1.0, math.nan]),
             "d": {"e": -math.inf}, "f": (1, 2)}
    text = strict_json.dumps(value)
    assert json.loads(text) == {"a": None, "b": [None, 1.5, 3], "c": [1.0, None], "d": {"e": None}, "f": [1, 2]}
