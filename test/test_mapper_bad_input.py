"""Bad input never crashes the mapper: it is rejected or dropped, and counted."""
import threading

import numpy as np
import pytest

from spark3r.data.synthetic import render_sequence
from spark3r.mapping import Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, Prediction, WindowConfig
from spark3r.mapping.testing import GroundTruthBackbone


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=24, height=60, width=80, seed=5, trajectory="orbit")


def cfg(size=6, stride=3):
    return MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                        window=WindowConfig(window_size=size, window_stride=stride), map=MapConfig(voxel_size=0.01))


def frame(seq, i, **kw):
    return Frame(kw.pop("image", seq.images[i]), kw.pop("stamp", int(seq.stamps_ns[i])), kw.pop("K", seq.K))


def drain(m):
    out = []
    while (r := m.process_pending()) is not None:
        out.append(r)
    return out


class Corrupting:
    """Wraps a backbone and spoils chosen calls (0-based)."""

    def __init__(self, inner, spoil):
        self.inner, self.spoil, self.calls = inner, spoil, 0

    def predict(self, window):
        pred = self.inner.predict(window)
        spoil = self.spoil.get(self.calls)
        self.calls += 1
        return spoil(pred) if spoil else pred


def test_wrong_and_zero_size_images_are_rejected_and_counted(seq):
    m = Mapper(cfg(), GroundTruthBackbone(seq))
    bad = [np.zeros((0, 0, 3), np.uint8), np.zeros((60, 80), np.uint8), np.zeros((60, 80, 4), np.uint8),
           np.zeros((60, 80, 3), np.float64), np.zeros((3, 80, 3), np.uint8)]
    for j, image in enumerate(bad):
        d = m.offer(frame(seq, 0, image=image, stamp=j))
        assert not d.accepted and d.reason == "bad_image" and d.detail
    assert m.offer(frame(seq, 0)).accepted
    d = m.offer(frame(seq, 1, image=np.zeros((120, 160, 3), np.uint8)))
    assert d.reason == "image_size_changed"
    with pytest.raises(TypeError, match="Frame"):
        m.offer(seq.images[2])
    st = m.stats
    assert st.decisions["bad_image"] == 5 and st.decisions["image_size_changed"] == 1 and st.keyframes == 1


def test_nonfinite_backbone_output_drops_the_window_and_is_counted(seq):
    def nan_pose(p):
        p.c2w[2, 0, 3] = np.nan
        return p

    def inf_K(p):
        p.K[0, 0, 0] = np.inf
        return p

    def nan_depth(p):
        p.depth[:, :10, :10] = np.nan
        p.conf[:, -5:, -5:] = np.inf
        return p

    def wrong_shape(p):
        return Prediction(p.c2w[:-1], p.K, p.depth, p.conf, p.depth_box)

    bb = Corrupting(GroundTruthBackbone(seq, seed=1), {1: nan_pose, 2: inf_K, 3: nan_depth, 4: wrong_shape})
    m = Mapper(cfg(), bb)
    results = []
    for i in range(len(seq)):
        m.offer(frame(seq, i, K=None))  # no camera_info: the predicted intrinsics are needed
        results += drain(m)
    st = m.stats
    assert st.windows_dropped_nonfinite == 2 and st.windows_dropped_invalid == 1
    assert "c2w" in st.last_backbone_error
    assert st.nonfinite_depth_pixels == 6 * (100 + 25)
    assert all(np.all(np.isfinite(r.points_xyz)) for r in results)
    assert all(np.all(np.isfinite(k.camera_to_map)) for k in m.trajectory)
    # Dropped windows' keyframes are mapped by a later window: nothing is lost for good.
    m.flush()
    assert len(m.trajectory) == 24 and m.stats.keyframes_dropped_unmapped == 0


def test_backbone_exception_is_caught_and_counted(seq):
    class Exploding:
        def predict(self, window):
            raise RuntimeError("CUDA out of memory")

    m = Mapper(cfg(), Exploding())
    for i in range(8):
        m.offer(frame(seq, i))
        assert m.process_pending() is None
    st = m.stats
    assert st.backbone_errors >= 1 and "out of memory" in st.last_backbone_error and m.trajectory == []


def test_time_going_backwards_resets_cleanly(seq):
    bb = GroundTruthBackbone(seq, seed=2)
    m = Mapper(cfg(), bb)
    for i in range(12):
        m.offer(frame(seq, i))
        drain(m)
    assert len(m.trajectory) == 12 and len(m.voxel_map) > 0
    # Bag loop: the sequence starts again.
    d = m.offer(frame(seq, 0))
    assert d.accepted and d.reason == "first"
    st = m.stats
    assert st.resets_time_backwards == 1 and st.resets == 1 and st.decisions["time_backwards"] == 1
    drain(m)
    assert m.trajectory == [] and len(m.voxel_map) == 0
    for i in range(1, 12):
        m.offer(frame(seq, i))
        drain(m)
    traj = m.trajectory
    assert len(traj) == 12 and traj[0].stamp_ns == seq.stamps_ns[0]
    np.testing.assert_allclose(traj[0].base_to_map, np.eye(4), atol=1e-9)


def test_window_in_flight_during_reset_is_discarded(seq):
    """A reset requested (time jump) while the backbone runs must not let that window into the new map."""
    holder = {}

    class Slow:
        def __init__(self):
            self.inner = GroundTruthBackbone(seq, seed=3)
            self.entered, self.release = threading.Event(), threading.Event()

        def predict(self, window):
            self.entered.set()
            assert self.release.wait(10)
            return self.inner.predict(window)

    bb = Slow()
    m = Mapper(cfg(), bb)
    for i in range(6):
        m.offer(frame(seq, i))
    worker = threading.Thread(target=lambda: holder.setdefault("r", m.process_pending()))
    worker.start()
    assert bb.entered.wait(10)
    d = m.offer(frame(seq, 0))  # the image thread is not blocked by the running window
    assert d.accepted and m.stats.resets_time_backwards == 1
    bb.release.set()
    worker.join(10)
    assert holder["r"] is None and m.stats.windows_discarded_after_reset == 1
    assert m.trajectory == []


def test_invalid_intrinsics_are_treated_as_missing(seq):
    m = Mapper(cfg(), GroundTruthBackbone(seq, seed=4))
    for i in range(6):
        m.offer(frame(seq, i, K=np.zeros((3, 3))))  # uncalibrated camera_info
    drain(m)
    assert m.stats.frames_missing_intrinsics == 6
    assert all(np.allclose(k.K, seq.K) for k in m.trajectory)


def test_bad_extrinsic_and_config_are_refused(seq):
    with pytest.raises(ValueError, match="base_to_camera"):
        Mapper(cfg(), GroundTruthBackbone(seq), base_to_camera=np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(TypeError, match="MapperConfig"):
        Mapper({"window_size": 4}, GroundTruthBackbone(seq))
    with pytest.raises(TypeError, match="predict"):
        Mapper(cfg(), object())


def _shift_frames(pred, frames, rng, amount):
    for f in frames:
        pred.c2w[f, :3, 3] += rng.normal(size=3) * amount
    return pred


def test_one_corrupted_shared_keyframe_is_outvoted(seq):
    """A window whose first (shared) keyframe got a wildly wrong pose still aligns on the others."""
    rng = np.random.default_rng(0)
    inner = GroundTruthBackbone(seq, seed=6)
    spoil = {c: (lambda p: _shift_frames(p, [0], rng, 2.0 * np.median(p.depth))) for c in range(1, 20)}
    m = Mapper(cfg(), Corrupting(inner, spoil))
    for i in range(len(seq)):
        m.offer(frame(seq, i))
        drain(m)
    st = m.stats
    assert st.windows_rejected_alignment == 0 and st.windows_mapped == st.windows
    assert st.last_inlier_fraction < 0.8  # the spoiled frame's share was recognised as outliers
    est = np.stack([k.camera_to_map[:3, 3] for k in m.trajectory])
    gt = seq.c2w[[inner.frame_of_stamp[k.stamp_ns] for k in m.trajectory], :3, 3]
    from spark3r.mapping import umeyama
    S = umeyama(est, gt)
    assert np.sqrt(np.mean(np.sum((S.apply(est) - gt) ** 2, axis=1))) < 1e-3 * seq.scene_extent


@pytest.mark.parametrize("pose_graph", [False, True])
def test_inconsistent_windows_are_rejected_then_tracking_is_lost(seq, pose_graph):
    rng = np.random.default_rng(1)

    def scramble_depth(p):
        p.depth *= (1.0 + rng.random(p.depth.shape)).astype(np.float32)
        return p

    bb = Corrupting(GroundTruthBackbone(seq, seed=7), {c: scramble_depth for c in range(1, 4)})
    config = cfg(6, 3)
    config.backend.pose_graph = pose_graph
    m = Mapper(config, bb)
    for i in range(12):
        m.offer(frame(seq, i))
        drain(m)
    st = m.stats
    # Window 1 maps 6; windows at 9, 10, 11 keyframes are rejected; at 12 keyframes no mapped
    # keyframe is left in the window (counted, no crash).
    assert st.windows_rejected_alignment == 3 and st.max_residual > m.config.window.max_alignment_residual
    assert st.resets_tracking_lost == 1 and st.keyframes_dropped_unmapped == 0
    traj = m.trajectory
    if pose_graph:
        # The back end keeps the map and starts a second graph segment, unlinked until a loop
        # or relocalization finds one: tracking is LOST, and the covariance says so.
        assert [k.id for k in traj] == list(range(12))
        assert [k.segment for k in traj] == [0] * 6 + [1] * 6
        assert st.segments == 2 and st.tracking_state == "LOST" and st.graph_nodes == 12
        assert np.all(np.diag(m.pose_covariance()) >= 1e3)
    else:
        # Plain odometry restarts the map from the window.
        assert [k.id for k in traj] == list(range(6, 12))
    assert len(m.voxel_map) > 0


def test_concurrent_offer_and_worker_threads(seq):
    """The image thread offers while a worker drains: nothing is lost or double-counted."""
    m = Mapper(cfg(), GroundTruthBackbone(seq, seed=8))
    done = threading.Event()
    errors = []

    def worker():
        try:
            while not done.is_set() or m.stats.pending_keyframes:
                if m.process_pending() is None:
                    done.wait(0.001)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    for i in range(len(seq)):
        m.offer(frame(seq, i))
        _ = m.trajectory, m.stats, m.voxel_map.points()
    done.set()
    t.join(20)
    assert not errors and not t.is_alive()
    m.flush()
    st = m.stats
    assert st.keyframes == len(seq) and len(m.trajectory) == len(seq) and st.windows_mapped == st.windows


def test_unusable_predicted_intrinsics_are_not_needed_when_camera_info_gives_K(seq):
    """A backbone whose focal length comes out infinite (e.g. a ReLU'd FoV of 0) still maps
    frames that carry calibrated intrinsics; without them the same window is dropped."""
    def inf_K(p):
        p.K[:, 0, 0] = np.inf
        return p

    for use_K, expect_dropped in ((True, 0), (False, 1)):
        m = Mapper(cfg(), Corrupting(GroundTruthBackbone(seq, seed=1), {0: inf_K}))
        results = []
        for i in range(8):
            m.offer(frame(seq, i, K=seq.K if use_K else None))
            results += drain(m)
        assert m.stats.windows_dropped_nonfinite == expect_dropped
        if use_K:
            assert results and results[0].starts_map
            np.testing.assert_allclose(results[0].keyframes[0].K, seq.K)
