"""Keyframe gate: each rule fires on purpose-made frames, and every decision is counted."""
import cv2
import numpy as np
import pytest

from spark3r.mapping import Frame, KeyframeConfig, KeyframeGate
from spark3r.mapping import keyframes as kfm

MS = 1_000_000
H, W = 240, 320


@pytest.fixture(scope="module")
def texture():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, size=(H + 80, W + 80, 3), dtype=np.uint8)
    return cv2.GaussianBlur(big, (0, 0), 1.5)


def view(texture, dx=0, dy=0):
    """The texture seen through a window shifted by (dx, dy) pixels: content moves by (-dx, -dy)."""
    return np.ascontiguousarray(texture[40 + dy:40 + dy + H, 40 + dx:40 + dx + W])


def gate(**overrides):
    cfg = dict(min_parallax_px=10.0, max_time_gap_s=1.0, min_time_gap_s=0.05, blur_threshold=5.0)
    cfg.update(overrides)
    return KeyframeGate(KeyframeConfig(**cfg))


def test_first_frame_then_parallax_threshold(texture):
    g = gate()
    d = g.decide(Frame(view(texture), 0))
    assert d.accepted and d.reason == kfm.ACCEPT_FIRST
    d = g.decide(Frame(view(texture, dx=4), 100 * MS))
    assert not d.accepted and d.reason == kfm.REJECT_LOW_PARALLAX
    assert d.parallax_px == pytest.approx(4.0, abs=0.3)
    d = g.decide(Frame(view(texture, dx=12, dy=5), 200 * MS))
    assert d.accepted and d.reason == kfm.ACCEPT_PARALLAX
    assert d.parallax_px == pytest.approx(13.0, abs=0.5)
    # The accepted frame is the new reference: the same view again has no parallax.
    d = g.decide(Frame(view(texture, dx=12, dy=5), 300 * MS))
    assert d.reason == kfm.REJECT_LOW_PARALLAX and d.parallax_px < 0.3


def test_parallax_is_reported_in_input_pixels_when_downscaled(texture):
    g = gate(flow_image_width=160)  # half resolution internally
    g.decide(Frame(view(texture), 0))
    d = g.decide(Frame(view(texture, dx=8), 100 * MS))
    assert d.parallax_px == pytest.approx(8.0, abs=0.6)


def test_time_gaps(texture):
    g = gate()
    g.decide(Frame(view(texture), 0))
    d = g.decide(Frame(view(texture, dx=30), 20 * MS))          # big motion but too soon
    assert not d.accepted and d.reason == kfm.REJECT_TOO_SOON
    d = g.decide(Frame(view(texture), 1000 * MS))                # no motion, but max gap reached
    assert d.accepted and d.reason == kfm.ACCEPT_MAX_TIME_GAP
    g0 = gate(max_time_gap_s=0.0)                                 # 0 disables the max gap
    g0.decide(Frame(view(texture), 0))
    assert g0.decide(Frame(view(texture), 10_000 * MS)).reason == kfm.REJECT_LOW_PARALLAX


def test_blur_rejected_and_threshold_zero_disables(texture):
    blurred = cv2.GaussianBlur(view(texture, dx=20), (0, 0), 6.0)
    g = gate()
    g.decide(Frame(view(texture), 0))
    d = g.decide(Frame(blurred, 100 * MS))
    assert not d.accepted and d.reason == kfm.REJECT_BLURRY and d.sharpness < 5.0
    g_off = gate(blur_threshold=0.0)
    g_off.decide(Frame(view(texture), 0))
    assert g_off.decide(Frame(blurred, 100 * MS)).accepted


def test_scene_change_is_accepted_as_weak_tracking(texture):
    g = gate()
    g.decide(Frame(view(texture), 0))
    other = np.ascontiguousarray(np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8))
    d = g.decide(Frame(cv2.GaussianBlur(other, (0, 0), 1.5), 100 * MS))
    assert d.accepted and d.reason == kfm.ACCEPT_TRACKING_WEAK


def test_bad_frames_are_rejected_with_reasons(texture):
    g = gate()
    for image, needle in [
        (np.zeros((0, 0, 3), np.uint8), "smaller"),
        (np.zeros((H, W), np.uint8), "[H, W, 3]"),
        (np.zeros((H, W, 3), np.float32), "uint8"),
        ([[1, 2, 3]], "numpy"),
    ]:
        d = g.decide(Frame(image, 0))
        assert not d.accepted and d.reason == kfm.REJECT_BAD_IMAGE and needle in d.detail
    assert g.decide(Frame(view(texture), 10 * MS)).accepted
    d = g.decide(Frame(np.zeros((H // 2, W // 2, 3), np.uint8), 500 * MS))
    assert d.reason == kfm.REJECT_IMAGE_SIZE and f"{W}x{H}" in d.detail
    assert g.decide(Frame(view(texture), 500 * MS)).reason == kfm.REJECT_STAMP_REPEATED
    assert g.decide(Frame(view(texture), 5 * MS)).reason == kfm.REJECT_TIME_BACKWARDS


@pytest.mark.parametrize("bad", [
    dict(min_parallax_px=-1.0), dict(max_time_gap_s=float("nan")), dict(min_time_gap_s=3.0, max_time_gap_s=1.0),
    dict(blur_threshold=-1), dict(flow_image_width=8), dict(min_tracked_fraction=2.0),
])
def test_config_validation(bad):
    name = next(iter(bad)) if "min_time_gap_s" not in bad else "min_time_gap_s"
    with pytest.raises(ValueError, match=name):
        KeyframeConfig(**bad)
