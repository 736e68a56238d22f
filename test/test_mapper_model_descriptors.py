"""Place descriptors of the real model path: ModelBackbone derives them from the encoder's own
patch tokens (no extra network), per frame, independent of the window and of the cache."""
import numpy as np
import pytest
import torch

from spark3r.data.synthetic import render_sequence
from spark3r.mapping.frames import Keyframe
from spark3r.mapping.model_backbone import ModelBackbone, network_geometry, preprocess
from spark3r.mapping.place_recognition import frame_descriptors, place_descriptor
from spark3r.models import build_model
from spark3r.seeded import load_seeded_v1

WIDTH = 126


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=10, height=96, width=128, seed=9, trajectory="orbit")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_seeded_v1(build_model("vggt-tiny", enable_point=False, enable_track=False)).eval()


def kfs(seq, idx, offset=0):
    return [Keyframe(i + offset, int(seq.stamps_ns[i]), seq.images[i]) for i in idx]


def test_model_backbone_returns_per_frame_descriptors_from_its_tokens(seq, model):
    cached = ModelBackbone(model, image_width=WIDTH, cache_max_frames=8)
    plain = ModelBackbone(model, image_width=WIDTH, cache_max_frames=0)
    a = cached.predict(kfs(seq, range(0, 5)))
    b = cached.predict(kfs(seq, range(3, 8)))
    c = plain.predict(kfs(seq, range(3, 8)))
    assert a.shape_problem(5) is None and a.descriptors.shape[0] == 5 and a.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a.descriptors, axis=1), 1.0, atol=1e-5)
    # Frame-local: the same frame gets the same descriptor in another window, cached or not.
    np.testing.assert_allclose(a.descriptors[3:], b.descriptors[:2], atol=1e-6)
    np.testing.assert_allclose(b.descriptors, c.descriptors, atol=1e-6)
    # It is the descriptor of the encoder's patch tokens.
    geometry = network_geometry(seq.images.shape[1:3], WIDTH)
    net = torch.stack([preprocess(seq.images[i], geometry) for i in range(3, 8)])
    with torch.inference_mode():
        tokens = model.encode_patches(net[None])[0].float().numpy()
    grid = (geometry.network_hw[0] // 14, geometry.network_hw[1] // 14)
    np.testing.assert_allclose(c.descriptors, frame_descriptors(tokens, grid), atol=1e-5)
    # The same image under another keyframe id matches itself exactly, other views less.
    again = plain.predict(kfs(seq, [3, 9], offset=100))
    assert float(again.descriptors[0] @ c.descriptors[0]) > 0.9999
    assert float(again.descriptors[1] @ c.descriptors[0]) < 0.9999
    cached.forget([0, 1])
    assert all(k[0] not in (0, 1) for k in cached._descriptor_cache)
    cached.reset()
    assert not cached._descriptor_cache


def test_wide_tokens_are_projected_to_a_small_descriptor():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(8, 8, 1024))
    d = place_descriptor(tokens)
    assert d.shape == (16 * 256,)
    near = place_descriptor(tokens + 0.2 * rng.normal(size=tokens.shape))
    far = place_descriptor(rng.normal(size=tokens.shape))
    assert float(d @ near) > 0.9 and abs(float(d @ far)) < 0.2
    with pytest.raises(ValueError, match="tokens"):
        frame_descriptors(np.zeros((2, 3, 4)), (4, 4))
