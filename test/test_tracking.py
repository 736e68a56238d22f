"""spark3r.mapping.tracking and the composer: Odometry covariance from the window alignment and the
tracking state (INITIALIZING / OK / LOST), on hand-made results and on the real mapper."""
import math

import numpy as np
import pytest

from spark3r.data.synthetic import render_sequence
from spark3r.geometry import make_transform
from spark3r.mapping import Frame, KeyframeConfig, MapConfig, MappedKeyframe, Mapper, MapperConfig, WindowConfig, WindowResult
from spark3r.mapping.config import OutputConfig
from spark3r.mapping.outputs import OutputComposer
from spark3r.mapping.testing import GroundTruthBackbone
from spark3r.mapping.tracking import (ERROR_FLOOR, LOST_VARIANCE, TRACKING_INITIALIZING, TRACKING_LOST, TRACKING_OK,
                                      alignment_error, typical_depth, window_failed)

S = 1_000_000_000


def result(index, times_s, residual=0.0, inliers=1.0, starts_map=False, depth=2.0):
    """Keyframes moving along x; their points ``depth`` in front of each camera (along z)."""
    keyframes = tuple(MappedKeyframe(id=int(t * 10), stamp_ns=int(t * S), camera_to_map=make_transform(np.eye(3), [t, 0, 0]),
                                     base_to_map=make_transform(np.eye(3), [t, 0, 0]), K=np.eye(3), window_index=index)
                      for t in times_s)
    points = np.array([[t + dx, dy, depth] for t in times_s for dx in (-0.1, 0.1) for dy in (-0.1, 0.1)], np.float32)
    return WindowResult(index, keyframes, points, np.zeros_like(points, dtype=np.uint8), 1.0, residual, inliers,
                        0 if starts_map else 2, 0.1, starts_map)


def test_alignment_error_grows_with_residual_and_with_fewer_inliers():
    assert alignment_error(0.0, 1.0) == pytest.approx(ERROR_FLOOR)
    assert alignment_error(0.03, 1.0) == pytest.approx(math.hypot(0.03, ERROR_FLOOR))
    assert alignment_error(0.03, 0.25) == pytest.approx(2 * math.hypot(0.03, ERROR_FLOOR))
    assert alignment_error(0.0, 0.0) == alignment_error(0.0, 0.01) > alignment_error(0.0, 0.5)  # bounded
    assert alignment_error(float("nan"), 1.0) >= 1.0  # an unknown residual is not a good one


def test_typical_depth_is_the_median_distance_to_the_nearest_camera():
    centres = np.array([[0.0, 0, 0], [10.0, 0, 0]])
    points = np.array([[0, 0, 2.0], [10, 0, 3.0], [0, 0, 4.0]])
    assert typical_depth(points, centres) == pytest.approx(3.0)
    assert typical_depth(np.zeros((0, 3)), centres) == 1.0


def test_odometry_covariance_follows_the_alignment_of_its_window():
    composer = OutputComposer(OutputConfig())
    first = composer.compose_window(result(0, [1.0, 1.5], starts_map=True))
    second = composer.compose_window(result(1, [2.0, 2.5], residual=0.04, inliers=0.5))
    depth = math.sqrt(4 + 0.02)
    for out, (residual, inliers) in ((first, (0.0, 1.0)), (second, (0.04, 0.5))):
        e = math.hypot(residual, ERROR_FLOOR) / math.sqrt(inliers)
        for kf in out.keyframes:
            np.testing.assert_allclose(kf.odometry.pose_covariance, np.diag([(e * depth) ** 2] * 3 + [e ** 2] * 3), rtol=1e-5)
    # The twist of a keyframe dt after the previous one: 2/dt^2 times its pose covariance; the
    # first keyframe of a map has no velocity estimate.
    np.testing.assert_array_equal(first.keyframes[0].odometry.twist_covariance, np.diag(np.full(6, LOST_VARIANCE)))
    later = second.keyframes[0].odometry
    np.testing.assert_allclose(later.twist_covariance, later.pose_covariance * 2 / 0.5 ** 2)
    worse = second.keyframes[0].odometry.pose_covariance[0, 0]
    assert worse > first.keyframes[0].odometry.pose_covariance[0, 0] > 0
    assert composer.tracking_values()["position_stddev"] == pytest.approx(math.sqrt(worse))


def test_tracking_state_initializing_ok_lost_ok_and_reset():
    composer = OutputComposer(OutputConfig())
    assert composer.tracking.state == TRACKING_INITIALIZING
    assert composer.compose_lost(1 * S) is None and composer.tracking.state == TRACKING_INITIALIZING  # nothing to lose yet
    composer.compose_window(result(0, [1.0, 1.5], starts_map=True))
    assert composer.tracking.state == TRACKING_OK
    lost = [composer.compose_lost(t * S) for t in (2, 3)]
    assert composer.tracking_values() == {"tracking_state": TRACKING_LOST, "tracking_lost_windows": 2, "tracking_losses": 1,
                                          "position_stddev": math.sqrt(LOST_VARIANCE)}
    for record, t in zip(lost, (2, 3)):
        # The last known pose, no motion, an unknown (rtabmap-style) covariance, the failed window's stamp.
        assert record.stamp_ns == t * S and (record.frame_id, record.child_frame_id) == ("odom", "base_link")
        np.testing.assert_array_equal(record.pose, make_transform(np.eye(3), [1.5, 0, 0]))
        np.testing.assert_array_equal(record.linear, np.zeros(3))
        np.testing.assert_array_equal(record.pose_covariance, np.diag(np.full(6, LOST_VARIANCE)))
        np.testing.assert_array_equal(record.twist_covariance, np.diag(np.full(6, LOST_VARIANCE)))
    composer.compose_window(result(1, [3.5]))
    assert composer.tracking_values()["tracking_state"] == TRACKING_OK and composer.tracking.lost_windows == 0
    composer.reset()
    assert composer.tracking.state == TRACKING_INITIALIZING and composer.tracking.losses == 1


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=18, height=48, width=64, seed=8, fps=10.0)


class SpoilsDepthAfter:
    """TEST DOUBLE: the ground-truth backbone whose depth is shuffled from call ``n`` on, so those
    windows cannot be aligned to the map."""

    def __init__(self, seq, n):
        self.inner, self.n, self.calls = GroundTruthBackbone(seq, seed=4), n, 0
        self.rng = np.random.default_rng(0)

    def predict(self, window):
        pred = self.inner.predict(window)
        self.calls += 1
        if self.calls > self.n:
            pred.depth = pred.depth * self.rng.uniform(0.2, 5.0, size=pred.depth.shape).astype(np.float32)
        return pred


def test_mapper_windows_that_cannot_be_aligned_make_tracking_lost(seq):
    config = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                          window=WindowConfig(window_size=6, window_stride=3), map=MapConfig(voxel_size=0.01))
    mapper, composer = Mapper(config, SpoilsDepthAfter(seq, 2)), OutputComposer(OutputConfig())
    outcomes = []
    for i in range(len(seq.stamps_ns)):
        mapper.offer(Frame(seq.images[i], int(seq.stamps_ns[i]), seq.K))
        while True:
            before = mapper.stats
            r = mapper.process_pending()
            after = mapper.stats
            if r is not None:
                out = composer.compose_window(r)
                outcomes.append(("mapped", out.keyframes[-1].odometry.pose_covariance[0, 0]))
            elif window_failed(before, after, r):
                record = composer.compose_lost(after.last_window_stamp_ns)
                assert record.stamp_ns == after.last_window_stamp_ns == int(seq.stamps_ns[i])
                outcomes.append(("lost", record.pose_covariance[0, 0]))
            if r is None and not mapper.backlog:
                break
    # Two good windows, then lost until the window holds no map keyframe any more: the mapper
    # restarts the map there (tracking OK in a new map), and its next window is lost again.
    kinds = [kind for kind, _ in outcomes]
    assert kinds == ["mapped", "mapped", "lost", "lost", "lost", "mapped", "lost"], kinds
    assert mapper.stats.windows_rejected_alignment == 4 and mapper.stats.resets_tracking_lost == 1
    assert all(0 < cov < 1.0 for kind, cov in outcomes if kind == "mapped")
    assert all(cov == LOST_VARIANCE for kind, cov in outcomes if kind == "lost")
    assert composer.tracking.state == TRACKING_LOST and composer.tracking.losses == 2


def test_window_failed_ignores_windows_discarded_by_a_reset():
    from spark3r.mapping import MapperStats

    before = MapperStats(windows=3)
    assert window_failed(before, MapperStats(windows=4), None)
    assert not window_failed(before, MapperStats(windows=4), object())  # mapped
    assert not window_failed(before, MapperStats(windows=3), None)      # no window was due
    assert not window_failed(before, MapperStats(windows=4, windows_discarded_after_reset=1), None)
