"""load_weights / load_pretrained: every source format, strictness, errors, memory behaviour."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from golden_utils import seeded_state_dict
from spark3r.models import (
    CheckpointMismatchError,
    CheckpointReadError,
    build_model,
    load_pretrained,
    load_weights,
)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return seeded_state_dict(build_model("vggt-tiny", device="meta"))


def assert_loaded(model, weights):
    sd = model.state_dict()
    assert list(sd) == list(weights)
    for k, v in weights.items():
        assert torch.equal(sd[k], v), k
    assert not any(t.is_meta for t in sd.values())


def write_checkpoint(kind: str, weights, tmp_path):
    if kind == "state_dict":
        return weights
    if kind in ("pt", "pth"):
        path = tmp_path / f"model.{kind}"
        torch.save(weights, path)
        return path
    if kind == "pt_wrapped":
        path = tmp_path / "wrapped.pt"
        torch.save({"model": weights, "epoch": torch.tensor(3)}, path)
        return path
    if kind == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
        return path
    if kind == "hf_dir":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps({"img_size": 518, "patch_size": 14, "embed_dim": 384}))
        return tmp_path
    if kind == "str_path":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
        return str(path)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["state_dict", "pt", "pth", "pt_wrapped", "safetensors", "hf_dir", "str_path"])
def test_round_trip(kind, weights, tmp_path):
    source = write_checkpoint(kind, weights, tmp_path)
    assert_loaded(load_weights(build_model("vggt-tiny", device="meta"), source), weights)


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_round_trip_into_a_materialised_model(kind, weights, tmp_path):
    source = write_checkpoint(kind, weights, tmp_path)
    model = build_model("vggt-tiny")
    storage = model.aggregator.camera_token.data_ptr()
    assert_loaded(load_weights(model, source), weights)
    assert model.aggregator.camera_token.data_ptr() == storage  # copied into the existing tensors


def test_load_pretrained_with_dtype(weights, tmp_path):
    source = write_checkpoint("hf_dir", weights, tmp_path)
    model = load_pretrained("vggt-tiny", source, dtype=torch.bfloat16)
    assert model.preset == "vggt-tiny" and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    key = "aggregator.camera_token"
    assert torch.equal(model.state_dict()[key], weights[key].to(torch.bfloat16))
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 28, 28), heads=("camera",))
    assert out["pose_enc"].dtype == torch.bfloat16 and torch.isfinite(out["pose_enc"]).all()


def test_mixed_precision_heads(weights):
    model = load_weights(build_model("vggt-tiny", device="meta"), weights, dtype=torch.bfloat16, head_dtype=torch.float32)
    assert model.aggregator.camera_token.dtype == torch.bfloat16
    assert model.depth_head.norm.weight.dtype == torch.float32 and model.camera_head.embed_pose.weight.dtype == torch.float32
    # Head weights are exact (not rounded through bf16).
    assert torch.equal(model.depth_head.norm.weight, weights["depth_head.norm.weight"])
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 28, 28))
    assert out["depth"].dtype == torch.float32 and out["pose_enc"].dtype == torch.float32


def test_meta_model_takes_the_checkpoint_tensors_without_copying(weights):
    model = load_weights(build_model("vggt-tiny", device="meta"), weights)
    key = "aggregator.patch_embed.blocks.0.attn.qkv.weight"
    assert model.state_dict()[key].data_ptr() == weights[key].data_ptr()


def test_safetensors_into_meta_model_reads_each_tensor_once(weights, tmp_path, monkeypatch):
    path = write_checkpoint("safetensors", weights, tmp_path)
    import safetensors

    reads: list[str] = []
    real_open = safetensors.safe_open

    class CountingHandle:
        def __init__(self, *a, **k):
            self._h = real_open(*a, **k)

        def keys(self):
            return self._h.keys()

        def get_slice(self, k):
            return self._h.get_slice(k)

        def get_tensor(self, k):
            reads.append(k)
            return self._h.get_tensor(k)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    load_weights(build_model("vggt-tiny", device="meta"), path)
    assert sorted(reads) == sorted(weights)


def test_missing_unexpected_and_wrong_shape_are_all_listed(weights):
    broken = dict(weights)
    del broken["camera_head.embed_pose.weight"]
    broken["head.extra.weight"] = torch.zeros(3)
    broken["depth_head.norm.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(build_model("vggt-tiny", device="meta"), broken)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["camera_head.embed_pose.weight"]
    assert err.unexpected == ["head.extra.weight"]
    assert err.wrong_shape == [("depth_head.norm.bias", (5,), (768,))]
    text = str(err)
    assert "missing keys (1)" in text and "head.extra.weight" in text and "[5] vs [768]" in text


def test_non_strict_loading_skips_missing_and_unexpected(weights):
    partial = {k: v for k, v in weights.items() if k.startswith("aggregator.")}
    partial["something.else"] = torch.zeros(1)
    model = load_weights(build_model("vggt-tiny"), partial, strict=False)
    assert torch.equal(model.state_dict()["aggregator.camera_token"], weights["aggregator.camera_token"])
    with pytest.raises(CheckpointMismatchError):
        load_weights(build_model("vggt-tiny"), {"aggregator.camera_token": torch.zeros(1)}, strict=False)


def test_full_checkpoint_loads_into_a_model_with_heads_switched_off(weights):
    model = load_weights(build_model("vggt-tiny", device="meta", enable_point=False, enable_camera=False), weights)
    assert model.point_head is None and model.camera_head is None
    assert not any(k.startswith(("point_head.", "camera_head.")) for k in model.state_dict())
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 28, 28))
    assert set(out) == {"depth", "depth_conf", "images"}


def test_official_1b_layout_loads_strictly(shared):
    # Meta tensors carry names and shapes only: checks the full 1797-entry layout at no cost.
    rows = (shared / "specs" / "vggt_state_dict.tsv").read_text().strip().splitlines()[1:]
    official = {
        r.split("\t")[0]: torch.empty([int(x) for x in r.split("\t")[1].split("x")], device="meta") for r in rows
    }
    model = load_weights(build_model("vggt-1b", device="meta"), official, device="meta")
    assert len(model.state_dict()) == 1797
    official.pop("track_head.tracker.fmap_norm.bias")
    with pytest.raises(CheckpointMismatchError, match="track_head.tracker.fmap_norm.bias"):
        load_weights(build_model("vggt-1b", device="meta"), official, device="meta")


@pytest.mark.parametrize("content, suffix", [(b"not a zip or pickle", ".pt"), (b"\x00\x01garbage", ".safetensors")])
def test_corrupt_files_give_a_clear_error(tmp_path, content, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointReadError, match="cannot read"):
        load_weights(build_model("vggt-tiny", device="meta"), path)


def test_unreadable_sources(tmp_path):
    model = build_model("vggt-tiny", device="meta")
    with pytest.raises(CheckpointReadError, match="not found"):
        load_weights(model, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointReadError, match="no weights in directory"):
        load_weights(model, tmp_path)
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointReadError, match="unsupported checkpoint type"):
        load_weights(model, tmp_path / "w.onnx")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointReadError, match="does not contain a state dict"):
        load_weights(model, tmp_path / "list.pt")
    with pytest.raises(TypeError, match="source must be"):
        load_weights(model, 42)


def test_hf_config_mismatch_is_reported(weights, tmp_path):
    write_checkpoint("hf_dir", weights, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"embed_dim": 1024}))
    with pytest.raises(CheckpointMismatchError, match="embed_dim"):
        load_pretrained("vggt-tiny", tmp_path)


def test_hub_id_offline_says_how_to_get_the_file(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointReadError, match="huggingface-cli download facebook/VGGT-1B"):
        load_pretrained("vggt-1b")


def test_hub_id_uses_the_downloaded_file(weights, tmp_path, monkeypatch):
    import huggingface_hub

    path = write_checkpoint("safetensors", weights, tmp_path)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = load_weights(build_model("vggt-tiny", device="meta"), "someone/vggt-tiny-test")
    assert calls == [("someone/vggt-tiny-test", "model.safetensors")]
    assert_loaded(model, weights)


def test_preset_without_checkpoint_needs_a_source():
    with pytest.raises(ValueError, match="no published checkpoint"):
        load_pretrained("vggt-tiny")


def test_non_strict_partial_load_with_dtype_converts_everything(weights):
    partial = {k: v for k, v in weights.items() if k.startswith("aggregator.")}
    model = load_weights(build_model("vggt-tiny"), partial, strict=False, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.aggregator.camera_token, weights["aggregator.camera_token"].to(torch.bfloat16))


def test_load_pretrained_seeded_source_gives_the_seeded_v1_weights():
    from spark3r.models import load_pretrained
    from spark3r.seeded import seeded_v1

    model = load_pretrained("vggt-tiny", "seeded", enable_point=False)
    sd = model.state_dict()
    for name in ("aggregator.camera_token", "camera_head.pose_branch.fc2.weight"):
        assert torch.equal(sd[name], seeded_v1(name, sd[name].shape)), name
    assert not model.training and sd["aggregator.camera_token"].device.type == "cpu"
