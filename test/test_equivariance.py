"""π3 is permutation-equivariant (no reference frame): permuting the input frames permutes every
output. Token reduction must keep that property — its choices may not depend on frame positions."""
from __future__ import annotations

import pytest
import torch

from spark3r import accel
from spark3r.models import build_model
from spark3r.seeded import load_seeded_v1

PERMUTATION = torch.tensor([3, 0, 4, 2, 1])
OUTPUT_KEYS = ("points", "local_points", "conf", "camera_poses")


@pytest.fixture(scope="module")
def model():
    return load_seeded_v1(build_model("pi3-tiny"))


@pytest.fixture(scope="module")
def images():
    # Smooth images (neighbouring patches similar, like real ones) so merging has real choices.
    g = torch.Generator().manual_seed(7)
    coarse = torch.rand(5, 3, 4, 5, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(56, 70), mode="bilinear", align_corners=False).clamp(0, 1)


def run(model, images, method, **params):
    accel.remove(model)
    if method != "dense":
        accel.apply(model, method, **params)
    try:
        with torch.inference_mode():
            return model(images)
    finally:
        accel.remove(model)


def assert_permuted(out, out_perm, perm):
    scale = out["local_points"].norm(dim=-1, keepdim=True)[:, perm]
    for key in OUTPUT_KEYS:
        expected = out[key][:, perm]
        tol = 1e-4 * (scale + scale.median()) if key in ("points", "local_points") else 1e-4 * (expected.abs() + 1)
        err = (out_perm[key] - expected).abs()
        assert bool((err <= tol).all()), f"{key}: worst {float((err / tol).max()):.3g} x tolerance"


@pytest.mark.parametrize("method, params", [
    ("dense", {}),
    ("uniform", {"ratio": 0.9}),
    ("spark3r", {"query_keep": 2}),
    ("spark3r", {"query_keep": 1, "query_group": (2, 3), "kv_score": "key_norm"}),
])
def test_permuting_frames_permutes_outputs(model, images, method, params):
    out = run(model, images, method, **params)
    out_perm = run(model, images[PERMUTATION], method, **params)
    assert_permuted(out, out_perm, PERMUTATION)
    if method != "dense":  # the reduction really changed the computation
        dense = run(model, images, "dense")
        assert not torch.allclose(out["local_points"], dense["local_points"], rtol=1e-3, atol=1e-3)


def test_a_position_dependent_reduction_breaks_equivariance(model, images):
    """The check above can fail: an op that treats frame 0 differently is caught."""
    def first_frame_only_sees_itself(q, k, v, layout, scale=None):
        p = layout.tokens_per_frame
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        out[:, :, :p] = torch.nn.functional.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], scale=scale)
        return out

    modules = model.global_attention_modules()
    outs = []
    try:
        for m in modules:
            m.global_op = first_frame_only_sees_itself
        with torch.inference_mode():
            outs = [model(images), model(images[PERMUTATION])]
    finally:
        accel.remove(model)
    with pytest.raises(AssertionError):
        assert_permuted(outs[0], outs[1], PERMUTATION)
