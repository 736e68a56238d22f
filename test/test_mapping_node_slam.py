"""The mapping node's SLAM back end over real DDS (loopback only), with the drifting TEST DOUBLE.

``spark3r_ros.ground_truth_node --drifting`` is the real MappingNode whose backbone is
:class:`spark3r.mapping.testing.DriftingBackbone` (per-window scale and heading creep, depth
noise, place descriptors: stitching drifts as with a real model); the synthetic camera streams a
loop trajectory that comes back to its start (``--trajectory loop``).

* Mapping run: the loop is closed; ``~/path`` is republished with corrected poses, ``map -> odom``
  jumps while ``odom -> base_link`` stays continuous (REP-105); ``~/save_map`` writes a session.
* A new node process loads that session (``load_directory``, ``localization_only``), the camera
  starts elsewhere on the loop: the node relocalizes in the loaded map, publishes ``map -> odom``
  and never extends the map; ``~/load_map`` loads it again on request.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")

from ros_helpers import ros_process, spin_until  # noqa: E402

from test_mapping_node import call, diag, ros_params, settled, stamp_ns, transform_matrix  # noqa: E402

NODE = "spark3r_mapping"
FRAMES = 80                       # 60.37 frames per lap: the last 20 frames revisit the first ones
SCENE_ARGS = ["--trajectory", "loop", "--frames", str(FRAMES), "--height", "48", "--width", "64", "--seed", "0",
              "--fps", "10"]
DOUBLE_ARGS = ["--drifting", "--backbone-seed", "1"]
PARAMS = {"window_size": 6, "window_stride": 3, "min_parallax_px": 0.0, "min_time_gap_s": 0.0, "voxel_size": 0.02,
          "map_publish_period": 0.0, "queue_depth": 32, "transform_tolerance": 0.1}
RELOCALIZE_FROM = 20              # the second camera starts a third of a lap into the saved map


def stream_camera(node, rec, proc, *extra, expected: int):
    with ros_process("spark3r_ros.synthetic_camera", *SCENE_ARGS, "--rate", "15", "--image-topic", "/image",
                     "--camera-info-topic", "/camera_info", "--linger", "0.5", *extra) as cam:
        assert spin_until(node, lambda: not cam.running(), 60.0, proc), "camera did not finish"
        assert cam.popen.returncode == 0, cam.log_text()
    assert spin_until(node, settled(rec, expected), 60.0, proc), f"node did not settle: {rec.diagnostics}"
    n = len(rec.diagnostics_history)
    spin_until(node, lambda: len(rec.diagnostics_history) >= n + 2, 5.0, proc)


def edges(rec, parent, child):
    """``[(stamp_ns, T)]`` of every ``parent -> child`` transform received, in arrival order."""
    return [(stamp_ns(t.header), transform_matrix(t)) for m in rec.messages["tf"] for t in m.transforms
            if (t.header.frame_id, t.child_frame_id) == (parent, child)]


def path_positions(msg) -> dict:
    return {stamp_ns(p.header): np.array([p.pose.position.x, p.pose.position.y, p.pose.position.z]) for p in msg.poses}


@pytest.fixture(scope="module")
def mapping(ros_context, tmp_path_factory):
    from spark3r_ros.demo import Recorder

    save_dir = tmp_path_factory.mktemp("slam_maps")
    node = rclpy.create_node("test_slam_mapping_recorder", context=ros_context)
    rec = Recorder(node, NODE)
    out = SimpleNamespace(save_dir=save_dir)
    with ros_process("spark3r_ros.ground_truth_node", *SCENE_ARGS, *DOUBLE_ARGS, "--ros-args",
                     *ros_params(dict(PARAMS, save_directory=str(save_dir)))) as proc:
        assert spin_until(node, lambda: all(s.get_publisher_count() > 0 for s in rec.subs.values()), 60.0, proc), \
            proc.log_text()
        stream_camera(node, rec, proc, expected=FRAMES)
        out.rec, out.diagnostics = rec, dict(rec.diagnostics)
        out.save = call(node, rec.save_client, process=proc)
        out.log = proc.log_text(tail_chars=10**7)
    node.destroy_node()
    return out


def test_loop_closure_republishes_the_path_and_moves_map_to_odom_only(mapping):
    rec, d = mapping.rec, mapping.diagnostics
    assert int(d["loops_accepted"]) >= 1 and d["backend"] == "1", d
    assert int(d["graph_nodes"]) >= 0.8 * FRAMES - 8 and float(d["last_optimisation_s"]) >= 0.0
    assert d["tracking_state"] in ("OK", "RELOCALIZED") and "loops_rejected" in d
    # ~/path republished with corrected poses: some keyframe moved between two path messages.
    paths = [path_positions(m) for m in rec.messages["path"]]
    moved = [max(np.linalg.norm(b[s] - a[s]) for s in a.keys() & b.keys()) for a, b in zip(paths, paths[1:])
             if a.keys() & b.keys()]
    assert max(moved) > 0.1, moved
    # map -> odom: the identity until the loop, then a jump (the back end's correction) ...
    map_odom = [T for _, T in edges(rec, "map", "odom")]
    steps = [np.linalg.norm(b[:3, 3] - a[:3, 3]) for a, b in zip(map_odom, map_odom[1:])]
    assert np.linalg.norm(map_odom[0][:3, 3]) < 1e-3 and max(steps) > 0.2, steps
    jump = int(np.argmax(steps)) + 1
    # ... while odom -> base_link (the front end's chain) stays continuous through it: its speed
    # between keyframes (per stamp difference: best-effort images may skip a frame) never jumps,
    # and the correction is bigger than two ordinary keyframe steps.
    odom_base = sorted(edges(rec, "odom", "base_link"), key=lambda e: e[0])
    base_steps = np.array([np.linalg.norm(b[1][:3, 3] - a[1][:3, 3]) for a, b in zip(odom_base, odom_base[1:])])
    speeds = base_steps / np.array([(b[0] - a[0]) * 1e-9 for a, b in zip(odom_base, odom_base[1:])])
    assert speeds.max() < 3.0 * np.median(speeds), (speeds.max(), np.median(speeds))
    assert steps[jump - 1] > 2.0 * np.median(base_steps), (steps[jump - 1], np.median(base_steps))
    # The Odometry is in odom (continuous), with the graph's covariance (not zero, not lost once OK).
    odometry = rec.messages["odometry"]
    assert all(m.header.frame_id == "odom" for m in odometry)
    assert 0 < np.reshape(odometry[-1].pose.covariance, (6, 6))[0, 0] < 1.0


def test_save_map_writes_a_loadable_session(mapping):
    assert mapping.save.success, mapping.save.message
    manifest = json.loads((mapping.save_dir / "session" / "session.json").read_text())
    assert manifest["format"] == "spark3r-session" and manifest["keyframes"] >= 0.8 * FRAMES - 8
    assert (mapping.save_dir / "map.ply").is_file() and (mapping.save_dir / "trajectory.tum").is_file()
    assert "session in" in mapping.save.message


def test_restart_load_and_localization_only(mapping, ros_context):
    from std_srvs.srv import Trigger

    from spark3r_ros.demo import Recorder

    assert mapping.save.success
    saved_path = path_positions(mapping.rec.messages["path"][-1])
    node = rclpy.create_node("test_slam_localization_recorder", context=ros_context)
    rec = Recorder(node, NODE)
    load_client = node.create_client(Trigger, f"/{NODE}/load_map")
    params = dict(PARAMS, load_directory=str(mapping.save_dir), localization_only=True)
    with ros_process("spark3r_ros.ground_truth_node", *SCENE_ARGS, *DOUBLE_ARGS, "--ros-args", *ros_params(params)) as proc:
        # Loaded at start-up: the saved map is on ~/map before any image.
        assert spin_until(node, lambda: rec.messages["map"] and rec.messages["map"][-1].width > 0
                          and diag(rec, "sessions_loaded") == 1, 60.0, proc), rec.diagnostics
        loaded_points, loaded_keyframes = diag(rec, "map_points"), diag(rec, "store_keyframes")
        assert loaded_keyframes >= 0.8 * FRAMES - 8 and rec.diagnostics["localization_only"] == "1"
        # ~/load_map loads it again on request (load_directory).
        response = call(node, load_client, process=proc)
        assert response.success and "localization only" in response.message, response.message
        assert spin_until(node, lambda: diag(rec, "sessions_loaded") == 2, 10.0, proc), rec.diagnostics
        stream_camera(node, rec, proc, "--first-frame", str(RELOCALIZE_FROM), expected=FRAMES - RELOCALIZE_FROM)
        d = dict(rec.diagnostics)
    node.destroy_node()
    assert int(d["relocalizations"]) >= 1 and d["tracking_state"] in ("OK", "RELOCALIZED"), d
    # Localization only: nothing was added to the loaded map.
    assert diag(rec, "map_points") == loaded_points and diag(rec, "store_keyframes") == loaded_keyframes
    # map -> odom is published and puts the live keyframes where the saved map has them: the
    # odom origin is the first live keyframe, a third of a lap from the map's origin.
    map_odom = edges(rec, "map", "odom")
    assert map_odom and np.linalg.norm(map_odom[-1][1][:3, 3]) > 0.5
    live = path_positions(rec.messages["path"][-1])
    common = sorted(live.keys() & saved_path.keys())
    assert len(common) >= 10
    err = [np.linalg.norm(live[s] - saved_path[s]) for s in common[len(common) // 2:]]
    assert max(err) < 0.3, err
