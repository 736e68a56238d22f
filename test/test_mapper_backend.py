"""SLAM back end with the drifting test double on loop trajectories of the synthetic scene:
loop closure must cut the keyframe ATE, never accept a false loop, leave no duplicated surfaces
in the map; tracking loss must start a segment that relocalization re-links; sessions must
round-trip and localize. (DriftingBackbone is a test double, not a model.)"""
import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from spark3r.mapping import (BackendConfig, Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig,
                             umeyama)
from spark3r.mapping.session import SessionError
from spark3r.mapping.testing import DriftingBackbone, loop_sequence

VOXEL = 0.02


@pytest.fixture(scope="module")
def loop_seq():
    # 80 frames, 60.37 per lap: the last 20 frames revisit the first 20.
    return loop_sequence(num_frames=80)


@pytest.fixture(scope="module")
def ground_truth_tree(loop_seq):
    return cKDTree(np.concatenate([loop_seq.world_points(i).reshape(-1, 3) for i in range(len(loop_seq))]))


def config(pose_graph=True, loop_closure=True, **backend):
    return MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                        window=WindowConfig(window_size=6, window_stride=3), map=MapConfig(voxel_size=VOXEL),
                        backend=BackendConfig(pose_graph=pose_graph, loop_closure=loop_closure, **backend))


def run(seq, mapper, frames=None):
    for i in (range(len(seq)) if frames is None else frames):
        mapper.offer(Frame(seq.images[i], int(seq.stamps_ns[i]), seq.K))
        while mapper.process_pending() is not None:
            pass
    mapper.flush()
    return mapper


def keyframe_ate(seq, bb, traj):
    est = np.stack([k.camera_to_map[:3, 3] for k in traj])
    gt = seq.c2w[[bb.frame_of_stamp[k.stamp_ns] for k in traj], :3, 3]
    S = umeyama(est, gt)
    return float(np.sqrt(np.mean(np.sum((S.apply(est) - gt) ** 2, axis=1)))), S


def test_loop_closure_cuts_keyframe_ate_to_a_third(loop_seq):
    plain_bb = DriftingBackbone(loop_seq, seed=1)
    plain = run(loop_seq, Mapper(config(pose_graph=False), plain_bb, base_to_camera=loop_seq.base_to_camera))
    ate_plain, _ = keyframe_ate(loop_seq, plain_bb, plain.trajectory)
    bb = DriftingBackbone(loop_seq, seed=1)
    m = run(loop_seq, Mapper(config(), bb, base_to_camera=loop_seq.base_to_camera))
    ate, _ = keyframe_ate(loop_seq, bb, m.trajectory)
    st = m.stats
    assert ate_plain > 0.1  # the double really drifts (metres; the room is 8 m x 6 m)
    assert st.loops_accepted >= 1 and ate <= ate_plain / 3
    assert st.tracking_state == "OK" and st.segments == 1 and st.graph_nodes == len(m.trajectory) == 80
    assert st.graph_factors > st.graph_nodes and st.last_optimisation_s > 0
    # Trajectory, store and graph agree on the optimised poses; the first keyframe stays the origin.
    for k in m.trajectory:
        np.testing.assert_allclose(k.camera_to_map, m.store[k.id].camera_to_map, atol=1e-12)
    np.testing.assert_allclose(m.trajectory[0].base_to_map, np.eye(4), atol=1e-6)
    # map -> odom absorbs the loop correction; the odometry chain itself was never optimised.
    correction = m.map_to_odom()
    assert np.linalg.norm(correction[:3, 3]) > 0.05 and np.allclose(correction[:3, :3] @ correction[:3, :3].T, np.eye(3))
    newest = m.store[m.trajectory[-1].id]
    np.testing.assert_allclose(correction @ newest.camera_to_odom, newest.camera_to_map, atol=1e-9)
    cov = m.pose_covariance()
    assert cov.shape == (6, 6) and np.all(np.isfinite(cov)) and 0 < cov[0, 0] < 1e3


def test_loop_moves_map_poses_not_odometry_and_save_writes_them(loop_seq, tmp_path):
    from spark3r.data.io import read_tum_trajectory

    m = Mapper(config(), DriftingBackbone(loop_seq, seed=1), base_to_camera=loop_seq.base_to_camera)
    for i in range(48):   # before the revisit: no loop yet
        m.offer(Frame(loop_seq.images[i], int(loop_seq.stamps_ns[i]), loop_seq.K))
        while m.process_pending() is not None:
            pass
    assert m.stats.loops_accepted == 0
    before = {k: (m.store[k].camera_to_map, m.store[k].camera_to_odom) for k in m.store.ids()}
    run(loop_seq, m, frames=range(48, 70))
    assert m.stats.loops_accepted >= 1
    # The loop moved the map poses; the odometry chain (what odom -> base_link publishes) is untouched.
    assert max(np.abs(m.store[k].camera_to_map - cam).max() for k, (cam, _) in before.items()) > 0.01
    for k, (_, odom) in before.items():
        np.testing.assert_array_equal(m.store[k].camera_to_odom, odom)
    stamps, poses = read_tum_trajectory(m.save(tmp_path)["trajectory"])
    traj = m.trajectory
    assert list(stamps) == [k.stamp_ns for k in traj]
    np.testing.assert_allclose(poses, np.stack([k.camera_to_map for k in traj]), atol=1e-5)


def test_no_revisit_gives_no_loop():
    seq = loop_sequence(num_frames=42)  # 0.7 of a lap
    m = run(seq, Mapper(config(), DriftingBackbone(seq, seed=2), base_to_camera=seq.base_to_camera))
    assert m.stats.windows_mapped == m.stats.windows >= 10
    assert m.stats.loops_accepted == 0


def test_repeated_structure_gives_no_false_loop(loop_seq):
    """Frames of the second half *look like* frames half a lap earlier (perfect perceptual
    aliasing): place recognition proposes them, geometric verification must reject them all."""
    alias = {k: k - 30 for k in range(30, 60)}
    bb = DriftingBackbone(loop_seq, seed=3, descriptor_source=alias)
    m = run(loop_seq, Mapper(config(), bb, base_to_camera=loop_seq.base_to_camera), frames=range(60))
    st = m.stats
    assert st.loop_candidates >= 5 and st.loops_rejected == st.loop_candidates
    assert st.loops_accepted == 0 and sum(st.loop_rejections.values()) == st.loops_rejected


def test_map_after_loop_has_no_duplicated_surfaces(loop_seq, ground_truth_tree):
    """Chamfer distance of the voxel map to the ground-truth surfaces: the drifted map holds
    the revisited surfaces twice, the loop-closed map (a cache rebuilt from the store) once."""
    chamfer = {}
    for pose_graph in (False, True):
        bb = DriftingBackbone(loop_seq, seed=4, scale_bias=0.0)
        m = run(loop_seq, Mapper(config(pose_graph=pose_graph), bb, base_to_camera=loop_seq.base_to_camera))
        _, S = keyframe_ate(loop_seq, bb, m.trajectory)
        xyz, _ = m.voxel_map.points()
        to_gt, _ = ground_truth_tree.query(S.apply(xyz.astype(np.float64)))
        gt = np.concatenate([loop_seq.world_points(i).reshape(-1, 3) for i in range(0, len(loop_seq), 4)])[::7]
        to_map, _ = cKDTree(S.apply(xyz.astype(np.float64))).query(gt)
        voxel = VOXEL * S.scale
        chamfer[pose_graph] = (float(np.median(to_gt)) / voxel, 0.5 * (to_gt.mean() + to_map.mean()) / voxel)
        if pose_graph:
            assert m.stats.loops_accepted >= 1 and m.stats.map_cache_moves > 0
    median_loop, chamfer_loop = chamfer[True]
    median_plain, chamfer_plain = chamfer[False]
    assert median_loop <= 2 and median_plain > 2 * median_loop     # in voxels
    assert chamfer_loop <= chamfer_plain / 3


def test_tracking_loss_starts_a_segment_that_relocalization_relinks(loop_seq):
    """Three unusable windows lose tracking; the next window starts segment 1 (LOST); place
    recognition + verification link it back to segment 0 (RELOCALIZED, then OK)."""

    class Scrambling:
        def __init__(self, inner, bad_calls):
            self.inner, self.bad_calls, self.calls = inner, bad_calls, 0

        def predict(self, window):
            pred = self.inner.predict(window)
            if self.calls in self.bad_calls:
                pred.depth = pred.depth * (1.0 + np.random.default_rng(self.calls).random(pred.depth.shape)).astype(np.float32)
            self.calls += 1
            return pred

    def lose_tracking(loop_closure, bad_calls=(4, 5, 6)):
        bb = DriftingBackbone(loop_seq, seed=5)
        m = Mapper(config(loop_closure=loop_closure), Scrambling(bb, set(bad_calls)), base_to_camera=loop_seq.base_to_camera)
        states = []
        for i in range(45):
            m.offer(Frame(loop_seq.images[i], int(loop_seq.stamps_ns[i]), loop_seq.K))
            while m.process_pending() is not None:
                states.append(m.tracking_state)
        return m, bb, states

    unlinked, unlinked_bb, unlinked_states = lose_tracking(loop_closure=False)
    assert unlinked.stats.segments == 2 and unlinked_states[-1] == "LOST"
    m, bb, states = lose_tracking(loop_closure=True)
    st = m.stats
    assert st.resets_tracking_lost == 1 and st.segments == 2 and st.relocalizations == 1
    assert "RELOCALIZED" in states and states[-1] == "OK"
    segments = {m.graph.segment(k.id) for k in m.trajectory}
    assert segments == {0}  # merged
    # Once re-linked, the trajectory is as good as one that never lost tracking.
    ate, _ = keyframe_ate(loop_seq, bb, m.trajectory)
    never_lost, never_lost_bb, _ = lose_tracking(loop_closure=True, bad_calls=())
    assert never_lost.stats.segments == 1
    assert ate <= 1.5 * keyframe_ate(loop_seq, never_lost_bb, never_lost.trajectory)[0]


def test_session_round_trip_and_localization_only(loop_seq, tmp_path):
    bb = DriftingBackbone(loop_seq, seed=6)
    m = run(loop_seq, Mapper(config(), bb, base_to_camera=loop_seq.base_to_camera))
    session = m.save_session(tmp_path / "session")
    manifest = json.loads((session / "session.json").read_text())
    assert manifest["format"] == "spark3r-session" and manifest["version"] == 1 and manifest["keyframes"] == 80
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    m.save_session(session)  # replacing an existing session is atomic too

    loaded = Mapper(config(), DriftingBackbone(loop_seq, seed=6), base_to_camera=loop_seq.base_to_camera)
    assert loaded.load_session(session) == 80
    for a, b in zip(m.trajectory, loaded.trajectory):
        assert a.id == b.id and a.stamp_ns == b.stamp_ns
        np.testing.assert_allclose(a.camera_to_map, b.camera_to_map, atol=1e-9)
    assert abs(len(loaded.voxel_map) - len(m.voxel_map)) <= 0.01 * len(m.voxel_map)
    assert loaded.graph.num_factors == m.graph.num_factors and loaded.tracking_state == "LOST"

    # Localization only: a second pass (new stamps, a quarter lap later) relocalizes against the
    # frozen map; poses come out in the loaded map's frame; nothing is added to the map.
    second = loop_sequence(num_frames=24, laps_offset=0.25)
    # The double answers for the live frames and the loaded keyframes (verification windows mix them).
    both = type(second)(**{**second.__dict__, **{name: np.concatenate([getattr(loop_seq, name), getattr(second, name)])
                                                 for name in ("images", "depth", "c2w", "base_c2w")},
                           "stamps_ns": np.concatenate([loop_seq.stamps_ns, second.stamps_ns + 10**12])})
    live = type(second)(**{**second.__dict__, "stamps_ns": second.stamps_ns + 10**12})
    live_bb = DriftingBackbone(both, seed=7)
    loc = Mapper(config(), live_bb, base_to_camera=second.base_to_camera)
    loc.load_session(session, localization_only=True)
    map_points, nodes = len(loc.voxel_map), len(loc.graph)
    run(live, loc)
    st = loc.stats
    assert st.relocalizations >= 1 and st.tracking_state in ("OK", "RELOCALIZED")
    assert len(loc.voxel_map) == map_points and len(loc.graph) == nodes and len(loc.store) == 80
    # The map's frame: the same similarity that takes the saved map to the world takes the live
    # poses there (up to the odometry drift within 24 frames).
    _, S_map = keyframe_ate(loop_seq, bb, m.trajectory)
    est = np.stack([k.camera_to_map[:3, 3] for k in loc.trajectory])
    gt = both.c2w[[live_bb.frame_of_stamp[k.stamp_ns] for k in loc.trajectory], :3, 3]
    localized = [i for i, k in enumerate(loc.trajectory) if i >= len(loc.trajectory) // 2]
    err = np.linalg.norm(S_map.apply(est[localized]) - gt[localized], axis=1)
    assert np.max(err) < 0.15

    # Mapping mode after a load: the new keyframes start a segment that loop closure links to the
    # loaded map, then they extend it.
    cont = Mapper(config(), DriftingBackbone(both, seed=8), base_to_camera=second.base_to_camera)
    cont.load_session(session)
    run(live, cont)
    st = cont.stats
    assert st.relocalizations >= 1 and st.segments >= 1 and len(cont.store) == 80 + 24
    assert {cont.graph.segment(k) for k in cont.store.ids()} == {0} and cont.tracking_state in ("OK", "RELOCALIZED")


def test_bad_session_directories_are_refused(tmp_path):
    m = Mapper(config(), DriftingBackbone(loop_sequence(num_frames=8), seed=0))
    with pytest.raises(SessionError, match="no session.json"):
        m.load_session(tmp_path)
    (tmp_path / "session.json").write_text(json.dumps({"format": "spark3r-session", "version": 99}))
    with pytest.raises(SessionError, match="version 99"):
        m.load_session(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        m.save_session(tmp_path / "x")
    with pytest.raises(ValueError, match="pose_graph"):
        Mapper(config(pose_graph=False), DriftingBackbone(loop_sequence(num_frames=8), seed=0)).save_session(tmp_path / "y")
