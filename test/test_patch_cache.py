"""Patch-token caching: forward(images, patch_tokens=encode_patches(...)) equals recomputing."""
from __future__ import annotations

import pytest
import torch

from golden_utils import seeded_state_dict
from spark3r.models import build_model, load_weights

KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


@pytest.fixture(scope="module")
def model():
    m = build_model("vggt-tiny", device="meta")
    return load_weights(m, seeded_state_dict(m))


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 42, 56, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def fresh(model, images):
    with torch.inference_mode():
        return model(images)


def assert_identical(a: dict, b: dict) -> None:
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key


def test_cached_tokens_give_bitwise_identical_outputs(model, images, fresh):
    with torch.inference_mode():
        tokens = model.encode_patches(images)
        cached = model(images, patch_tokens=tokens)
    assert tokens.shape == (1, 3, 3 * 4, 384)
    assert_identical(fresh, cached)


def test_tokens_cached_in_earlier_calls_can_be_combined(model, images, fresh):
    # A streaming user encodes frames as they arrive and reuses them in later windows.
    with torch.inference_mode():
        early = model.encode_patches(images[:2])
        late = model.encode_patches(images[2:])
        combined = model(images, patch_tokens=torch.cat([early, late], dim=1))
    assert_identical(fresh, combined)


def test_batched_input_and_cache(model, images, fresh):
    batch = torch.stack([images, images.flip(0)])
    with torch.inference_mode():
        tokens = model.encode_patches(batch)
        out = model(batch, patch_tokens=tokens)
    assert tokens.shape[:2] == (2, 3)
    # Sequences in a batch are independent (equal up to float reordering in batched kernels).
    torch.testing.assert_close(out["depth"][:1], fresh["depth"], rtol=1e-5, atol=1e-6)


def test_cached_tokens_are_actually_used(model, images, fresh):
    with torch.inference_mode():
        tokens = model.encode_patches(images)
        # Not a constant offset: the LayerNorms would remove it.
        noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
        perturbed = model(images, patch_tokens=tokens + noise)
    assert not torch.allclose(perturbed["depth"], fresh["depth"])


@pytest.mark.parametrize("shape", [(1, 3, 11, 384), (1, 2, 12, 384), (1, 3, 12, 383), (3, 12, 384)])
def test_wrong_token_shape_is_rejected(model, images, shape):
    with pytest.raises(ValueError, match="patch_tokens must have shape"):
        model(images, patch_tokens=torch.zeros(shape))
