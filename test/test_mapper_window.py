"""Sliding-window scheduling and configuration: which keyframes each backbone run sees."""
from dataclasses import fields

import pytest

from spark3r.data.synthetic import render_sequence
from spark3r.mapping import (BackboneConfig, Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig,
                             parameter_docs)
from spark3r.mapping.testing import GroundTruthBackbone


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=30, height=60, width=80, seed=3, trajectory="orbit")


def every_frame_config(size=8, stride=3, **window):
    # min_parallax_px=0 makes every frame after min_time_gap_s a keyframe.
    return MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                        window=WindowConfig(window_size=size, window_stride=stride, **window), map=MapConfig(voxel_size=0.01))


def feed(mapper, seq, frames, process=True):
    results = []
    for i in frames:
        mapper.offer(Frame(seq.images[i], int(seq.stamps_ns[i]), seq.K))
        if process:
            while (r := mapper.process_pending()) is not None:
                results.append(r)
    return results


def test_windows_have_size_and_stride_and_share_keyframes(seq):
    bb = GroundTruthBackbone(seq, seed=0)
    m = Mapper(every_frame_config(8, 3), bb)
    results = feed(m, seq, range(23))
    # First window after 8 keyframes, then one per 3 new keyframes: 8, 11, 14, 17, 20, 23.
    assert [w for w in bb.window_frames] == [list(range(e - 8, e)) for e in (8, 11, 14, 17, 20, 23)]
    assert [len(r.keyframes) for r in results] == [8, 3, 3, 3, 3, 3]
    assert all(r.shared_keyframes == 5 for r in results[1:]) and results[0].starts_map
    assert m.stats.windows == 6 and m.stats.windows_mapped == 6
    # Keyframes that left the window were reported to the backbone (cache eviction).
    assert sorted(bb.forgotten) == list(range(15))
    traj = m.trajectory
    assert [k.id for k in traj] == list(range(23)) and [k.window_index for k in traj][:9] == [1] * 8 + [2]


def test_nothing_runs_until_due_and_flush_maps_the_tail(seq):
    bb = GroundTruthBackbone(seq, seed=1)
    m = Mapper(every_frame_config(8, 4), bb)
    assert feed(m, seq, range(7)) == [] and bb.window_frames == []
    assert m.process_pending() is None
    feed(m, seq, range(7, 14))  # windows at 8 and 12 keyframes, 2 left over
    assert len(bb.window_frames) == 2 and m.stats.pending_keyframes == 0
    tail = m.flush()
    assert len(tail) == 1 and [k.id for k in tail[0].keyframes] == [12, 13]
    assert bb.window_frames[-1] == list(range(6, 14))
    assert m.flush() == []


def test_first_window_can_be_forced_short(seq):
    bb = GroundTruthBackbone(seq, seed=2)
    m = Mapper(every_frame_config(8, 4), bb)
    feed(m, seq, range(3), process=False)
    results = m.flush()
    assert len(results) == 1 and len(results[0].keyframes) == 3 and results[0].starts_map


def test_backlog_beyond_limit_drops_oldest_and_counts(seq):
    bb = GroundTruthBackbone(seq, seed=3)
    m = Mapper(every_frame_config(8, 4, max_pending_keyframes=10), bb)
    feed(m, seq, range(25), process=False)  # worker stalled
    st = m.stats
    assert st.keyframes == 25 and st.keyframes_dropped_backlog == 15 and st.pending_keyframes == 10
    results = []
    while (r := m.process_pending()) is not None:
        results.append(r)
    assert bb.window_frames[0] == list(range(15, 23))
    assert sum(len(r.keyframes) for r in results) == 8  # 2 left: fewer than a stride


def test_config_validation_and_flat_parameters():
    with pytest.raises(ValueError, match="window_stride"):
        WindowConfig(window_size=4, window_stride=4)
    with pytest.raises(ValueError, match="window_size"):
        WindowConfig(window_size=1, window_stride=1)
    with pytest.raises(ValueError, match="conf_percentile"):
        MapConfig(conf_percentile=100)
    with pytest.raises(ValueError, match="reduction"):
        BackboneConfig(reduction="")
    with pytest.raises(ValueError, match="image_width"):
        BackboneConfig(image_width=500)
    with pytest.raises(TypeError, match="MapperConfig.window"):
        MapperConfig(window={"window_size": 4})
    cfg = MapperConfig.from_flat({"window_size": 12, "window_stride": 4, "voxel_size": 0.05, "min_parallax_px": 7.0})
    assert (cfg.window.window_size, cfg.window.window_stride, cfg.map.voxel_size, cfg.keyframe.min_parallax_px) == (12, 4, 0.05, 7.0)
    with pytest.raises(ValueError, match="unknown mapper parameters"):
        MapperConfig.from_flat({"window_sise": 3})
    # Every parameter has a description, and names are unique across sections (they become ROS names).
    names = []
    for cls in (KeyframeConfig, WindowConfig, MapConfig, BackboneConfig):
        docs = parameter_docs(cls)
        assert all(doc for _, doc in docs.values()), cls.__name__
        names += [f.name for f in fields(cls)]
    assert len(names) == len(set(names))


def test_worker_loop_drains_backlog_past_a_failed_window(seq):
    class FailSecond:
        def __init__(self):
            self.inner, self.calls = GroundTruthBackbone(seq, seed=4), 0

        def predict(self, window):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("transient failure")
            return self.inner.predict(window)

    bb = FailSecond()
    m = Mapper(every_frame_config(6, 3), bb)
    feed(m, seq, range(14), process=False)
    assert m.backlog == 14
    results = []
    while (r := m.process_pending()) is not None or m.backlog:
        if r is not None:
            results.append(r)
    assert m.backlog == 0 and m.stats.backbone_errors == 1
    # 6 at the first window; the failed one (9 keyframes) is retried with 10 and maps 4; then 13.
    assert [len(r.keyframes) for r in results] == [6, 4, 3]
    assert len(m.flush()) == 1 and len(m.trajectory) == 14
