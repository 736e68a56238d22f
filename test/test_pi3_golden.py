"""π3 against the official model's golden outputs (../shared/golden pi3_tiny and pi3, rule seeded-v1)."""
from __future__ import annotations

import pytest
import torch

from golden_utils import load_case, mismatch_report, tensor_digest
from spark3r.models import CheckpointMismatchError, build_model, load_weights
from spark3r.seeded import seeded_v1_state_dict

OUTPUT_KEYS = ("points", "local_points", "conf", "camera_poses")
DEFAULTS = {"image_mean": torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
            "image_std": torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)}


def golden_weights(case) -> dict[str, torch.Tensor]:
    """The case's weights: seeded-v1 entries plus the two buffers kept at their defaults."""
    return {**case.state_dict(), **DEFAULTS}


def run_with_debug(model, images: torch.Tensor, blocks: dict[str, int]) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, output: captured.__setitem__(name, output)

    hooks = [model.decoder[i].register_forward_hook(keep(name)) for name, i in blocks.items()]
    hooks.append(model.point_decoder.register_forward_hook(keep("dbg.point_decoder")))
    hooks.append(model.camera_decoder.register_forward_hook(keep("dbg.camera_decoder")))
    try:
        with torch.inference_mode():
            out = model(images[None])
            captured["dbg.encoder"] = model.encode_patches(images).flatten(0, 1)
    finally:
        for h in hooks:
            h.remove()
    return {**{k: out[k] for k in OUTPUT_KEYS}, **captured}


def assert_matches_golden(case, results: dict[str, torch.Tensor]) -> None:
    local_norm = case.tensors["local_points"].norm(dim=-1, keepdim=True)
    failures = []
    for key, spec in case.meta["tolerance"]["per_tensor"].items():
        # Points are judged relative to the pixel's local-point norm (golden README §5).
        scale = local_norm if key in ("points", "local_points") else None
        report = mismatch_report(results[key], case.tensors[key], spec["tol"], scale)
        if report:
            failures.append(f"{key}: {report}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def tiny_case(shared):
    return load_case(shared, "pi3_tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_case):
    return load_weights(build_model("pi3-tiny", device="meta"), golden_weights(tiny_case))


def test_tiny_state_dict_is_the_golden_listing(tiny_case):
    model = build_model("pi3-tiny", device="meta")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {e[0]: e[1] for e in tiny_case.entries}
    assert len(model.global_attention_modules()) == 2


def test_seeded_weights_reproduce_golden_digests_with_default_buffers(tiny_case):
    values = seeded_v1_state_dict(build_model("pi3-tiny"))
    for name, _, kind, _, digest in tiny_case.entries:
        assert tensor_digest(values[name]) == digest, (name, kind)


def test_tiny_matches_golden(tiny_case, tiny_model):
    results = run_with_debug(tiny_model, tiny_case.tensors["images"],
                             {"dbg.decoder_block0": 0, "dbg.decoder_block2": 2, "dbg.decoder_block3": 3})
    assert_matches_golden(tiny_case, results)


def test_cached_patch_tokens_give_identical_outputs(tiny_case, tiny_model):
    images = tiny_case.tensors["images"]
    with torch.inference_mode():
        direct = tiny_model(images)
        tokens = torch.cat([tiny_model.encode_patches(images[:1]), tiny_model.encode_patches(images[1:])], dim=1)
        cached = tiny_model(images, patch_tokens=tokens)
    for key in OUTPUT_KEYS:
        assert torch.equal(direct[key], cached[key]), key
    with pytest.raises(ValueError, match="patch_tokens must have shape"):
        tiny_model(images, patch_tokens=tokens[:, :2])


def test_global_layers_report_no_reference_frame(tiny_case, tiny_model):
    layouts = []

    def record(q, k, v, layout, scale=None):
        layouts.append(layout)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    modules = tiny_model.global_attention_modules()
    try:
        for m in modules:
            m.global_op = record
        with torch.inference_mode():
            tiny_model(tiny_case.tensors["images"], heads=("camera",))
    finally:
        for m in modules:
            m.global_op = None
    assert [(l.layer, l.num_layers, l.reference_frame) for l in layouts] == [(0, 2, None), (1, 2, None)]
    assert all((l.frames, l.tokens_per_frame, l.special_tokens, l.grid) == (3, 85, 5, (8, 10)) for l in layouts)


def test_heads_subset_and_mapper_request(tiny_model):
    images = torch.rand(2, 3, 28, 42)
    with torch.inference_mode():
        cam = tiny_model(images, heads=("camera",))
        mapper = tiny_model(images, heads=("camera", "depth"))
    assert set(cam) == {"camera_poses"} and cam["camera_poses"].shape == (1, 2, 4, 4)
    assert set(mapper) == {"camera_poses", "local_points", "points", "conf"}
    rot = mapper["camera_poses"][0, :, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    assert torch.all(torch.det(rot) > 0)
    with pytest.raises(ValueError, match="unknown heads"):
        tiny_model(images, heads=("normals",))


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(2, 3, 30, 28), ValueError, "multiples of 14"),
        (torch.rand(2, 4, 28, 28), ValueError, r"\[S, 3, H, W\]"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), TypeError, "float"),
        ("images", TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_give_clear_errors(images, error, match):
    with pytest.raises(error, match=match):
        build_model("pi3-tiny", device="meta")(images)


def test_full_preset_is_the_official_listing_on_meta(shared):
    rows = (shared / "specs" / "pi3_state_dict.tsv").read_text().strip().splitlines()[1:]
    expected = {r.split("\t")[0]: [int(x) for x in r.split("\t")[1].split("x")] for r in rows}
    model = build_model("pi3", device="meta")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 958_696_732
    assert len(model.global_attention_modules()) == 18


def test_strict_loading_reports_missing_buffers(tiny_case):
    weights = golden_weights(tiny_case)
    del weights["image_std"]
    with pytest.raises(CheckpointMismatchError, match="image_std"):
        load_weights(build_model("pi3-tiny", device="meta"), weights)


@pytest.mark.slow
def test_full_pi3_matches_golden(shared):
    case = load_case(shared, "pi3")
    model = load_weights(build_model("pi3", device="meta"), golden_weights(case))
    results = run_with_debug(model, case.tensors["images"],
                             {"dbg.decoder_block0": 0, "dbg.decoder_block34": 34, "dbg.decoder_block35": 35})
    assert_matches_golden(case, results)
