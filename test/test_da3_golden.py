"""Depth-Anything-3 against the official network's golden outputs (../shared/golden da3_small and
da3_large, rule seeded-v1 with the ``model.`` prefix and the tied output_conv2_aux LayerNorm)."""
from __future__ import annotations

import json

import pytest
import torch

from golden_utils import load_case, mismatch_report, tensor_digest
from spark3r.models import CheckpointMismatchError, build_model, load_pretrained, load_weights
from spark3r.models.checkpoints import CheckpointReadError, preset_from_hf_config, tied_state_dict_names
from spark3r.seeded import seeded_v1_state_dict

OUTPUT_KEYS = ("depth", "depth_conf", "extrinsics", "intrinsics")
TIED = [f"model.head.scratch.output_conv2_aux.{i}.2.{p}" for i in range(4) for p in ("weight", "bias")]


def run_with_debug(model, images: torch.Tensor, strategy=None) -> dict[str, torch.Tensor]:
    captured = []
    hook = model.vit.patch_embed.register_forward_hook(lambda m, a, o: captured.append(o))
    try:
        with torch.inference_mode():
            out = model(images, ref_view_strategy=strategy)
            h, w = images.shape[-2:]
            outputs, _ = model.run_backbone(model.encode_patches(images), (h // 14, w // 14), strategy)
            feats, cam = model.head_features(outputs)
            ray, ray_conf = model.model.head.ray_outputs(feats, (h, w))
    finally:
        hook.remove()
    frames = images.shape[0]
    return {**{k: out[k] for k in OUTPUT_KEYS}, "dbg.pose_enc": out["pose_enc"], "ref_view_index": out["ref_view_index"],
            "dbg.patch_embed": torch.cat(captured[:frames]), "dbg.backbone_feat0": feats[0], "dbg.backbone_feat3": feats[3],
            "dbg.cam_tokens": cam, "dbg.head_ray": ray, "dbg.head_ray_conf": ray_conf}


def assert_matches_golden(case, results: dict[str, torch.Tensor]) -> None:
    failures = []
    for key, spec in case.meta["tolerance"]["per_tensor"].items():
        # Elementwise, |golden| as the scale (also for the intrinsics with their 1e-6-clamped focals).
        report = mismatch_report(results[key], case.tensors[key], spec["tol"])
        if report:
            failures.append(f"{key}: {report}")
    assert torch.equal(results["ref_view_index"], case.tensors["ref_view_index"])
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def small_case(shared):
    return load_case(shared, "da3_small")


@pytest.fixture(scope="module")
def small_model(small_case):
    return load_weights(build_model("da3-small", device="meta"), small_case.state_dict())


def test_small_matches_golden_with_reference_view_selection(small_case, small_model):
    assert_matches_golden(small_case, run_with_debug(small_model, small_case.tensors["images"]))


def test_large_matches_golden(shared):
    case = load_case(shared, "da3_large")
    model = load_weights(build_model("da3-large", device="meta"), case.state_dict())
    assert_matches_golden(case, run_with_debug(model, case.tensors["images"]))


@pytest.mark.parametrize("preset, listing", [("da3-small", "da3_small"), ("da3-base", "da3_base"),
                                             ("da3-large", "da3_large"), ("da3-giant", "da3_giant")])
def test_presets_are_the_official_listings_on_meta(shared, preset, listing):
    rows = (shared / "specs" / f"{listing}_state_dict.tsv").read_text().strip().splitlines()[1:]
    expected = {r.split("\t")[0]: [int(x) for x in r.split("\t")[1].split("x")] for r in rows}
    model = build_model(preset, device="meta")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    # Levels 1-3 of the shared LayerNorm are aliases of level 0 (weight -> weight, bias -> bias).
    assert tied_state_dict_names(model) == {n: TIED[i % 2] for i, n in enumerate(TIED) if i >= 2}
    cfg = model.config
    assert len(model.global_attention_modules()) == len([i for i in range(cfg.alt_start, cfg.depth) if i % 2])


def test_seeded_weights_reproduce_golden_digests_and_aliases(small_case):
    values = seeded_v1_state_dict(build_model("da3-small"))
    for name, _, kind, _, digest in small_case.entries:
        assert tensor_digest(values[name]) == digest, (name, kind)
    assert all(values[n] is values[TIED[i % 2]] for i, n in enumerate(TIED))


@pytest.mark.parametrize("keep", [0, 3, None])
def test_tied_layernorm_loads_from_any_of_its_names(small_case, keep):
    weights = small_case.state_dict()
    expected = weights[TIED[0]].clone()
    for i in range(4):
        if keep is not None and i != keep:
            for p in ("weight", "bias"):
                del weights[f"model.head.scratch.output_conv2_aux.{i}.2.{p}"]
    if keep is None:  # none of the four names: strict loading names the canonical one
        for name in TIED:
            weights.pop(name, None)
        with pytest.raises(CheckpointMismatchError, match=r"output_conv2_aux\.0\.2\.weight"):
            load_weights(build_model("da3-small", device="meta"), weights)
        return
    model = load_weights(build_model("da3-small", device="meta"), weights)
    for level in model.model.head.scratch.output_conv2_aux:
        assert torch.equal(level[2].weight, expected)
    assert model.model.head.scratch.output_conv2_aux[0][2] is model.model.head.scratch.output_conv2_aux[3][2]


def test_reference_strategies_restore_input_order(small_case, small_model):
    images = small_case.tensors["images"]
    with torch.inference_mode():
        middle = small_model(images, ref_view_strategy="middle")
        # "middle" of 4 views is view 2 -> order (2, 0, 1, 3); "first" on that order is the same network run.
        order = torch.tensor([2, 0, 1, 3])
        first = small_model(images[order], ref_view_strategy="first")
        default = small_model(images)
    assert int(middle["ref_view_index"]) == 2 and int(first["ref_view_index"]) == 0
    restore = torch.argsort(order)
    for key in OUTPUT_KEYS:
        torch.testing.assert_close(middle[key], first[key][:, restore], rtol=1e-4, atol=1e-4)
    # The golden's saddle_balanced choice is also view 2.
    torch.testing.assert_close(default["depth"], middle["depth"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="ref_view_strategy"):
        small_model(images, ref_view_strategy="random")


def test_cached_tokens_and_two_views_skip_selection(small_case, small_model):
    images = small_case.tensors["images"]
    with torch.inference_mode():
        direct = small_model(images)
        tokens = torch.cat([small_model.encode_patches(images[:2]), small_model.encode_patches(images[2:])], dim=1)
        cached = small_model(images, patch_tokens=tokens)
        pair = small_model(images[:2])
    for key in OUTPUT_KEYS:
        assert torch.equal(direct[key], cached[key]), key
    assert int(pair["ref_view_index"]) == -1 and pair["depth"].shape == (1, 2, 112, 140)
    with pytest.raises(ValueError, match="patch_tokens must have shape"):
        small_model(images, patch_tokens=tokens[:, :, 1:])


def test_global_layers_protect_camera_tokens_and_reference_view(small_case, small_model):
    layouts = []

    def record(q, k, v, layout, scale=None):
        layouts.append(layout)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    modules = small_model.global_attention_modules()
    try:
        for m in modules:
            m.global_op = record
        with torch.inference_mode():
            small_model(small_case.tensors["images"], heads=("camera",))
    finally:
        for m in modules:
            m.global_op = None
    assert [l.layer for l in layouts] == [0, 1, 2, 3]
    assert all((l.frames, l.tokens_per_frame, l.special_tokens, l.reference_frame, l.num_layers) == (4, 81, 1, 0, 4)
               for l in layouts)


def test_config_json_model_name_selects_the_preset(tmp_path, small_case):
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in small_case.state_dict().items() if k not in TIED[2:]}
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "da3-small"}))
    assert preset_from_hf_config(tmp_path) == "da3-small"
    model = load_pretrained(None, tmp_path)
    assert model.preset == "da3-small"
    assert torch.equal(model.model.head.scratch.output_conv2_aux[2][2].bias, weights[TIED[1]])
    with pytest.raises(CheckpointMismatchError, match="model_name"):
        load_pretrained("da3-base", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "da3-huge"}))
    with pytest.raises(CheckpointReadError, match="da3-huge"):
        load_pretrained(None, tmp_path)
    with pytest.raises(ValueError, match="preset=None"):
        load_pretrained(None, tmp_path / "model.safetensors")


def test_giant_builds_with_swiglu_and_weights_only_heads():
    model = build_model("da3-giant", device="meta")
    block = model.vit.blocks[0]
    assert tuple(block.mlp.w12.weight.shape) == (8192, 1536)
    assert model.model.gs_head is not None and model.model.cam_enc is not None
    lean = build_model("da3-giant", device="meta", enable_gs_head=False, enable_cam_enc=False)
    assert lean.disabled_head_prefixes() == ("model.cam_enc.", "model.gs_head.")
    with pytest.raises(NotImplementedError):
        model.model.gs_head()
