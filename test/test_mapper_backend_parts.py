"""Building blocks of the SLAM back end: voxel-map removal, place descriptors and search, the
keyframe store (spilling), the Sim(3) pose graph, loop verification, and the configuration."""
import numpy as np
import pytest

from spark3r.mapping import BackendConfig, MapperConfig, Sim3, VoxelMap, parameter_docs
from spark3r.mapping.keyframe_store import KeyframePayload, KeyframeStore, StoredKeyframe
from spark3r.mapping.loop_closure import KeyframeGeometry, verify_pair
from spark3r.mapping.place_recognition import image_tokens, place_descriptor, search_places
from spark3r.mapping.pose_graph import FACTOR_LOOP, FACTOR_WINDOW, FactorRecord, PoseGraph, from_gtsam, to_gtsam
from spark3r.mapping.testing import random_similarity


def test_voxel_map_remove_undoes_insert_exactly():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 3)), rng.normal(size=(300, 3)) + 0.5
    ca, cb = rng.integers(0, 256, (500, 3)).astype(np.uint8), rng.integers(0, 256, (300, 3)).astype(np.uint8)
    only_a = VoxelMap(0.1, 10**6)
    only_a.insert(a, ca)
    both = VoxelMap(0.1, 10**6)
    both.insert(a, ca)
    both.insert(b, cb)
    both.remove(b, cb)
    xa, ra = only_a.points()
    xb, rb = both.points()
    order_a, order_b = np.lexsort(xa.T), np.lexsort(xb.T)
    assert len(both) == len(only_a)
    np.testing.assert_allclose(xb[order_b], xa[order_a], atol=1e-6)
    np.testing.assert_array_equal(rb[order_b], ra[order_a])
    both.remove(a, ca)
    assert len(both) == 0
    with pytest.raises(ValueError, match="colours"):
        both.remove(a, cb)


def test_place_descriptor_is_unit_length_and_ignores_what_every_patch_shares():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(12, 16, 32))
    d = place_descriptor(tokens)
    assert d.dtype == np.float32 and d.shape == (16 * 32,) and abs(np.linalg.norm(d) - 1) < 1e-5
    np.testing.assert_allclose(place_descriptor(tokens + 3.0), d, atol=1e-6)   # a common offset is no place
    other = place_descriptor(rng.normal(size=(12, 16, 32)))
    assert float(d @ other) < 0.5 < float(d @ place_descriptor(tokens + 0.1 * rng.normal(size=tokens.shape)))
    assert not np.any(place_descriptor(np.ones((8, 8, 4))))   # a uniform frame matches nothing
    assert place_descriptor(rng.normal(size=(3, 2, 5))).shape == (3 * 2 * 5,)   # fewer patches than cells
    with pytest.raises(ValueError, match="tokens"):
        place_descriptor(np.zeros((0, 2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        place_descriptor(np.full((8, 8, 3), np.nan))
    assert image_tokens(rng.integers(0, 255, (48, 64, 3)).astype(np.uint8)).shape == (12, 16, 48)


def test_search_places_respects_mask_score_and_suppression():
    rng = np.random.default_rng(2)
    D = rng.normal(size=(20, 8)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    ids = np.arange(100, 120)
    q = D[5] + 0.01 * D[6]
    hits = search_places(q / np.linalg.norm(q), ids, D, min_score=0.5, top_k=3, suppress_radius=2)
    assert hits[0].keyframe_id == 105 and hits[0].score > 0.99 and all(h.score >= 0.5 for h in hits)
    assert all(abs(h.keyframe_id - 105) > 2 for h in hits[1:])
    allowed = np.ones(20, bool)
    allowed[5] = False
    assert all(h.keyframe_id != 105 for h in search_places(D[5], ids, D, allowed, min_score=-1.0))
    assert search_places(D[5], ids[:0], D[:0]) == []


def _stored(kid, pose, descriptor=None):
    return StoredKeyframe(id=kid, stamp_ns=kid, segment=0, window_index=1, K=np.eye(3), camera_info_K=None, pose=pose,
                          odom_pose=pose, descriptor=descriptor, median_depth=1.0, radius=1.0)


def test_keyframe_store_spills_old_payloads_and_reads_them_back():
    rng = np.random.default_rng(3)
    store = KeyframeStore(keep_in_memory=2)
    payloads = {}
    for k in range(5):
        payloads[k] = KeyframePayload(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8),
                                      rng.normal(size=(10, 3)).astype(np.float32), rng.integers(0, 255, (10, 3)).astype(np.uint8))
        store.add(_stored(k, Sim3(), np.eye(4, dtype=np.float32)[k % 4]), payloads[k])
    assert len(store) == 5 and store.spilled == 3 and store.id_at(4) == 4 and store.id_at(5) is None
    for k in range(5):
        p = store.payload(k)
        np.testing.assert_array_equal(p.image, payloads[k].image)
        np.testing.assert_array_equal(p.xyz, payloads[k].xyz)
        assert store.keyframe(k).image.shape == (16, 16, 3)
    ids, D = store.descriptors()
    assert list(ids) == list(range(5)) and D.shape == (5, 4)
    with pytest.raises(ValueError, match="already"):
        store.add(_stored(0, Sim3()), payloads[0])
    with pytest.raises(ValueError, match="dimensions"):
        store.add(_stored(9, Sim3(), np.ones(3, np.float32)), payloads[0])
    spill_dir = store._spill_dir
    store.clear()
    assert len(store) == 0 and not spill_dir.exists()


def test_gtsam_conversion_round_trips_our_sim3_convention():
    rng = np.random.default_rng(4)
    T = random_similarity(rng)
    back = from_gtsam(to_gtsam(T))
    np.testing.assert_allclose(back.matrix(), T.matrix(), atol=1e-12)
    p = rng.normal(size=3)
    np.testing.assert_allclose(to_gtsam(T).transformFrom(p), T.apply(p), atol=1e-12)


def test_pose_graph_keeps_consistent_chains_and_closes_a_drifted_loop():
    rng = np.random.default_rng(5)
    truth = [random_similarity(rng) for _ in range(12)]
    sig = np.full(7, 0.01)
    g = PoseGraph()
    g.add_node(0, truth[0], 0, anchor=True)
    bias = Sim3(1.02, np.eye(3), np.array([0.05, 0.0, 0.0]))
    current = truth[0]
    for k in range(1, 12):
        Z = (truth[k - 1].inverse() @ truth[k]) @ bias
        current = current @ Z
        g.add_node(k, current, 0)
        g.add_between(FactorRecord(k - 1, k, Z, sig, FACTOR_WINDOW))
        g.update()
    drifted = np.linalg.norm(g.estimate(11).t - truth[11].t)
    g.add_between(FactorRecord(0, 11, truth[0].inverse() @ truth[11], sig, FACTOR_LOOP))
    g.update_after_loop(range(12))
    assert np.linalg.norm(g.estimate(11).t - truth[11].t) < 0.1 * drifted
    np.testing.assert_allclose(g.estimate(0).matrix(), truth[0].matrix(), atol=1e-5)   # the anchor holds
    cov = g.marginal_covariance(11)
    assert cov.shape == (7, 7) and np.all(np.linalg.eigvalsh(cov) > 0)
    assert g.num_factors == 12 and len(g) == 12


def test_merging_segments_drops_the_younger_anchor():
    g = PoseGraph()
    a, b = Sim3(), Sim3(1.0, np.eye(3), np.array([5.0, 0.0, 0.0]))
    g.add_node(0, a, 0, anchor=True)
    g.add_node(1, b, 1, anchor=True)   # a second segment, placed by a wrong guess
    g.update()
    assert g.segment(0) != g.segment(1) and sorted(g.anchors) == [0, 1]
    g.add_between(FactorRecord(0, 1, Sim3(1.0, np.eye(3), np.array([1.0, 0.0, 0.0])), np.full(7, 0.01), FACTOR_LOOP))
    assert g.merge_segments(0, 1) and not g.merge_segments(0, 1)
    g.optimise_all()
    assert g.segment(1) == g.segment(0) == 0 and g.anchors == [0]
    np.testing.assert_allclose(g.estimate(1).t, [1.0, 0.0, 0.0], atol=1e-6)


def test_verify_pair_accepts_the_same_place_and_rejects_a_different_one():
    # A fronto-parallel wall 2 units in front of both cameras of the window; q is 0.2 to the right.
    K = np.array([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]])
    h, w = 48, 64
    depth = np.full((2, h, w), 2.0)
    c2w = np.repeat(np.eye(4)[None], 2, axis=0)
    c2w[1, 0, 3] = 0.2
    u, v = np.meshgrid(np.arange(w) + 0.0, np.arange(h) + 0.0)
    pts = np.stack([(u - K[0, 2]) / K[0, 0] * 2, (v - K[1, 2]) / K[1, 1] * 2, np.full_like(u, 2.0)], -1).reshape(-1, 3)
    local = KeyframeGeometry(pts * 0.5, K)   # stored in a unit half the window's
    check = verify_pair(c2w, depth, (0, 0, w, h), 0, 1, local, local, 0.4)
    assert check.accepted and check.overlap > 0.6
    np.testing.assert_allclose(check.relative.t, [0.1, 0, 0], atol=1e-9)   # 0.2 window units = 0.1 local
    assert abs(check.relative.scale - 1.0) < 1e-9
    far = c2w.copy()
    far[1, 0, 3] = 5.0   # the window says q is far away: its points fall outside c's view
    assert verify_pair(far, depth, (0, 0, w, h), 0, 1, local, local, 0.4).reason == "no_overlap"
    bumpy = depth.copy()
    bumpy[1] *= 1 + np.random.default_rng(0).random((h, w))   # q's depth is not what it stored
    assert verify_pair(c2w, bumpy, (0, 0, w, h), 0, 1, local, local, 0.4).reason == "depth_scale_inconsistent"


def test_backend_parameters_have_docs_ranges_and_exact_names():
    docs = parameter_docs(BackendConfig)
    for name in ("loop_closure", "loop_min_score", "loop_min_keyframe_gap", "loop_min_inlier_fraction", "pose_graph"):
        assert docs[name][1]
    assert docs["loop_closure"][0] is True
    cfg = MapperConfig.from_flat({"loop_closure": False, "loop_min_score": 0.9, "loop_min_keyframe_gap": 30,
                                  "loop_min_inlier_fraction": 0.5})
    assert (cfg.backend.loop_closure, cfg.backend.loop_min_score, cfg.backend.loop_min_keyframe_gap,
            cfg.backend.loop_min_inlier_fraction) == (False, 0.9, 30, 0.5)
    for bad in ({"loop_min_score": 1.5}, {"loop_min_keyframe_gap": 0}, {"loop_min_inlier_fraction": 0.0},
                {"loop_closure": "yes"}, {"keyframe_points": 3}, {"store_keyframes_in_memory": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MapperConfig.from_flat(bad)


def test_unusable_descriptors_are_dropped_and_counted_not_fatal():
    from spark3r.mapping import Frame, KeyframeConfig, MapConfig, Mapper, WindowConfig
    from spark3r.mapping.testing import DriftingBackbone, loop_sequence

    seq = loop_sequence(num_frames=12)

    class WidthChange(DriftingBackbone):
        """Descriptors change dimension after the first window (as after a new network width)."""

        def predict(self, window):
            pred = super().predict(window)
            if len(self.window_frames) > 1:
                pred.descriptors = np.ones((len(window), 5), np.float32)
            return pred

    cfg = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                       window=WindowConfig(window_size=6, window_stride=3), map=MapConfig(voxel_size=0.05))
    m = Mapper(cfg, WidthChange(seq, seed=0))
    for i in range(12):
        m.offer(Frame(seq.images[i], int(seq.stamps_ns[i]), seq.K))
        while m.process_pending() is not None:
            pass
    st = m.stats
    assert st.windows_mapped == st.windows == 3 and st.descriptors_dropped == 6
    ids, D = m.store.descriptors()
    assert len(ids) == 6 and np.allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-5)
