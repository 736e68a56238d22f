"""The node's intake / inference split (spark3r_ros.node_support.MappingPipeline), without ROS.

The backbone is a deliberately SLOW TEST DOUBLE: the ground-truth double held inside every window
until the test releases it, so "slower than the camera" needs no timing. While it is held, every
frame must still reach the keyframe gate (Mapper.offer never waits for a running window), the
accepted keyframes must wait in the bounded pending store, and once the backbone is free every
window those keyframes make must be mapped.
"""
import threading
import time

import pytest

from spark3r.data.synthetic import render_sequence
from spark3r.mapping import Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig
from spark3r.mapping.testing import GroundTruthBackbone
from spark3r_ros.node_support import FrameQueue, MappingPipeline

FRAMES = 30


class HeldGroundTruthBackbone:
    """TEST DOUBLE: the ground-truth backbone, held in each window until ``release`` is set."""

    name = "held ground truth (TEST DOUBLE)"

    def __init__(self, seq):
        self.inner = GroundTruthBackbone(seq, seed=2)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def predict(self, window):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(30), "the test never released the backbone"
        return self.inner.predict(window)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=FRAMES, height=48, width=64, seed=6, fps=10.0)


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    """Deadlock guard, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def start(seq, max_pending=64):
    config = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),  # every frame a keyframe
                          window=WindowConfig(window_size=6, window_stride=3, max_pending_keyframes=max_pending),
                          map=MapConfig(voxel_size=0.01))
    backbone = HeldGroundTruthBackbone(seq)
    mapper = Mapper(config, backbone)
    published, errors = [], []

    def intake(msg):
        if msg == "poison":
            raise RuntimeError("a message the intake cannot handle")
        return mapper.offer(msg).accepted

    pipeline = MappingPipeline(FrameQueue(2), intake, mapper, lambda *args: published.append(args),
                               lambda stage, exc: errors.append((stage, exc)), poll_s=0.01)
    pipeline.start()
    return pipeline, mapper, backbone, published, errors


def stream(pipeline, mapper, seq, frames, offered_before=0):
    """Camera at the intake's pace: the next frame once the previous one went through the gate."""
    for n, i in enumerate(frames, 1):
        pipeline.queue.put(Frame(seq.images[i], int(seq.stamps_ns[i]), seq.K))
        wait_for(lambda: mapper.stats.frames_offered == offered_before + n, f"frame {i} at the gate")


def test_keyframes_are_taken_at_camera_rate_while_the_backbone_runs(seq):
    pipeline, mapper, backbone, published, errors = start(seq)
    try:
        stream(pipeline, mapper, seq, range(FRAMES))
        # All frames went through the gate while the first window is still inside the backbone.
        assert backbone.entered.is_set() and backbone.calls == 1 and pipeline.inference_running
        st = mapper.stats
        assert st.frames_offered == st.keyframes == FRAMES and mapper.backlog == FRAMES - 6
        assert st.keyframes_dropped_backlog == 0 and pipeline.queue.dropped == 0 and not pipeline.idle()
        backbone.release.set()
        wait_for(pipeline.idle, "the backlog to be mapped")
    finally:
        backbone.release.set()
        pipeline.stop(10)
    results = [result for _, _, _, result in published if result is not None]
    expected_windows = 1 + (FRAMES - 6) // 3
    assert len(results) == mapper.stats.windows_mapped == backbone.calls == expected_windows
    assert [len(r.keyframes) for r in results] == [6] + [3] * (expected_windows - 1)
    assert len(mapper.trajectory) == FRAMES and not errors
    # Every call reports the stats around it and the map epoch it started in.
    assert all(epoch == 0 and after.windows >= before.windows for epoch, before, after, _ in published)


def test_pending_keyframes_are_bounded_and_their_drops_counted(seq):
    pipeline, mapper, backbone, published, errors = start(seq, max_pending=8)
    try:
        stream(pipeline, mapper, seq, range(FRAMES))
        assert backbone.calls == 1 and mapper.backlog == 8  # the first 6 are in the held window
        assert mapper.stats.keyframes_dropped_backlog == FRAMES - 6 - 8
        backbone.release.set()
        wait_for(pipeline.idle, "the backlog to be mapped")
    finally:
        backbone.release.set()
        pipeline.stop(10)
    # The newest 8 survive: two more windows of 3, two keyframes wait for the next one.
    assert mapper.stats.windows_mapped == 3 and len(mapper.trajectory) == 12 and not errors


def test_a_new_map_during_a_window_marks_its_result_stale_and_errors_do_not_stop_the_stages(seq):
    pipeline, mapper, backbone, published, errors = start(seq)
    try:
        stream(pipeline, mapper, seq, range(6))
        wait_for(backbone.entered.is_set, "the first window")
        pipeline.new_map()  # what the node does under its publishing lock on ~/reset or a time jump
        pipeline.queue.put("poison")
        wait_for(lambda: errors, "the intake error")
        stream(pipeline, mapper, seq, range(6, 9), offered_before=6)  # the intake goes on after the error
        backbone.release.set()
        wait_for(pipeline.idle, "the backlog to be mapped")
    finally:
        backbone.release.set()
        pipeline.stop(10)
    assert [stage for stage, _ in errors] == ["intake"] and "cannot handle" in str(errors[0][1])
    epochs = [epoch for epoch, _, _, result in published if result is not None]
    assert epochs == [0, 1] and pipeline.map_epoch == 1  # the first window started before the new map


def test_session_services_save_load_and_explain_failures(tmp_path):
    """The ROS-free bodies of ~/save_map and ~/load_map (spark3r_ros.node_support) with a real
    Mapper and the drifting TEST DOUBLE: save writes map, trajectory and session/; load accepts
    the save folder or its session/, and a bad folder or an empty parameter is a clear error."""
    import pytest as _pytest

    from spark3r.mapping import Frame, KeyframeConfig, MapConfig, Mapper, MapperConfig, WindowConfig
    from spark3r.mapping.testing import DriftingBackbone, loop_sequence
    from spark3r_ros.node_support import load_map, mapper_diagnostics, save_map, session_directory

    seq = loop_sequence(num_frames=16)
    config = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                          window=WindowConfig(window_size=6, window_stride=3), map=MapConfig(voxel_size=0.02))
    mapper = Mapper(config, DriftingBackbone(seq, seed=0), base_to_camera=seq.base_to_camera)
    for i in range(len(seq)):
        mapper.offer(Frame(seq.images[i], int(seq.stamps_ns[i]), seq.K))
    mapper.flush()
    message = save_map(mapper, tmp_path / "saved")
    assert "session in" in message and (tmp_path / "saved" / "session" / "session.json").is_file()
    assert session_directory(tmp_path / "saved") == tmp_path / "saved" / "session"
    assert session_directory(tmp_path / "saved" / "session") == tmp_path / "saved" / "session"
    other = Mapper(config, DriftingBackbone(seq, seed=0), base_to_camera=seq.base_to_camera)
    assert "localization only" in load_map(other, tmp_path / "saved", localization_only=True)
    assert other.localization_only and len(other.store) == len(mapper.store)
    assert "mapping" in load_map(other, tmp_path / "saved" / "session", localization_only=False)
    assert not other.localization_only
    with _pytest.raises(ValueError, match="load_directory is empty"):
        load_map(other, "", localization_only=False)
    kept = len(other.store)
    with _pytest.raises(ValueError, match=str(tmp_path / "nothing")):
        load_map(other, tmp_path / "nothing", localization_only=False)
    assert len(other.store) == kept and len(other.voxel_map) > 0   # a failed load leaves the map as it was
    values = mapper_diagnostics(mapper)
    assert "tracking_state" not in values and values["backend"] == 1 and values["graph_nodes"] == len(mapper.store)
    assert all(not isinstance(v, dict) for v in values.values())


def test_diagnostic_summary_names_loops_and_relocalization():
    from spark3r_ros.node_support import diagnostic_summary

    values = {"images_received": 10, "windows_mapped": 3, "keyframes": 9, "map_points": 100, "backend": 1,
              "loops_accepted": 2, "loops_rejected": 1, "localization_only": 1, "tracking_state": "RELOCALIZED"}
    level, message = diagnostic_summary(values, "")
    assert level == "ok" and message.startswith("RELOCALIZED") and "2 loops (1 rejected)" in message
    assert "localization only" in message
    level, message = diagnostic_summary(dict(values, tracking_state="LOST", tracking_lost_windows=2), "")
    assert level == "warn" and "LOST for 2" in message and "relocalizing" in message
    level, message = diagnostic_summary(dict(values, backend=0, tracking_state="OK"), "")
    assert level == "ok" and "loops" not in message
