"""``spark3r map --save-session / --load-session / --localization-only`` with the ground-truth
test double: the session written by one run is loaded by the next, which in localization-only
mode leaves the loaded map as it was."""
import json

import pytest

from spark3r.data.io import read_ply
from spark3r.offline import cli as map_cli
from spark3r.offline.benchmark import write_benchmark

PARAMS = ["window_size=6", "window_stride=3", "min_parallax_px=0.0", "voxel_size=0.02"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("bench") / "orbit", num_frames=24, height=60, width=80, seed=1)


def map_argv(bench, out, *extra):
    argv = [str(bench["bag"]), "--out", str(out), "--ground-truth", str(bench["tum"]), "--no-progress", *extra]
    for p in PARAMS:
        argv += ["--param", p]
    return argv


def test_save_then_load_session_in_localization_only_mode(bench, tmp_path, capsys):
    session = tmp_path / "session"
    assert map_cli.main(map_argv(bench, tmp_path / "first", "--save-session", str(session))) == 0
    first = json.loads((tmp_path / "first" / "report.json").read_text())
    manifest = json.loads((session / "session.json").read_text())
    assert manifest["format"] == "spark3r-session" and manifest["keyframes"] == first["keyframes_mapped"] >= 8

    out = tmp_path / "second"
    assert map_cli.main(map_argv(bench, out, "--load-session", str(session), "--localization-only")) == 0
    second = json.loads((out / "report.json").read_text())
    stats = second["mapper_stats"]
    # Nothing was added to the loaded map: its keyframes and points are what the first run saved.
    assert stats["store_keyframes"] == manifest["keyframes"] and stats["graph_nodes"] == manifest["keyframes"]
    first_map, _ = read_ply(tmp_path / "first" / "map.ply")
    second_map, _ = read_ply(out / "map.ply")
    assert abs(len(second_map) - len(first_map)) <= 0.01 * len(first_map)
    # The ground-truth double has no place descriptors, so it cannot relocalize: tracking stays LOST.
    assert stats["tracking_state"] == "LOST" and stats["relocalizations"] == 0


def test_localization_only_needs_a_session(bench, tmp_path, capsys):
    assert map_cli.main(map_argv(bench, tmp_path / "x", "--localization-only")) == 2
    assert "--load-session" in capsys.readouterr().err
    assert map_cli.main(map_argv(bench, tmp_path / "y", "--load-session", str(tmp_path / "missing"))) == 2
    assert "session" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_offline_bag_gets_the_corrected_path_and_map_after_a_loop(tmp_path):
    """As the node republishes them: after a loop closure mapping.bag holds a Path with the
    corrected poses of keyframes an earlier Path had elsewhere, and a rebuilt map; map -> odom
    jumps while odom -> base_link stays continuous. (DriftingBackbone is a test double.)"""
    import numpy as np

    from spark3r.data.bag_io import write_sequence_bag
    from spark3r.mapping import BackendConfig, KeyframeConfig, MapConfig, MapperConfig, WindowConfig
    from spark3r.mapping.testing import DriftingBackbone, loop_sequence
    from spark3r.offline.inputs import open_input
    from spark3r.offline.runner import run_map

    from test_offline_map import _read_bag

    seq = loop_sequence(num_frames=80)
    write_sequence_bag(seq, tmp_path / "loop.bag")
    config = MapperConfig(keyframe=KeyframeConfig(min_parallax_px=0.0, min_time_gap_s=0.0),
                          window=WindowConfig(window_size=6, window_stride=3), map=MapConfig(voxel_size=0.02),
                          backend=BackendConfig())
    report = run_map(open_input(tmp_path / "loop.bag"), tmp_path / "out", config, DriftingBackbone(seq, seed=1))
    assert report["complete"] and report["mapper_stats"]["loops_accepted"] >= 1
    _, msgs = _read_bag(tmp_path / "out" / "mapping.bag")

    def positions(path):
        return {p.header.stamp.sec * 10**9 + p.header.stamp.nanosec: np.array([p.pose.position.x, p.pose.position.y,
                                                                              p.pose.position.z]) for p in path.poses}
    paths = [positions(m) for _, _, m in msgs["/spark3r_mapping/path"]]
    moved = max(max(np.linalg.norm(b[s] - a[s]) for s in a.keys() & b.keys()) for a, b in zip(paths, paths[1:]))
    assert moved > 0.1
    assert len(msgs["/spark3r_mapping/map"]) >= 2   # rebuilt after the loop, and the final map
    tf = [t for _, _, m in msgs["/tf"] for t in m.transforms]
    map_odom = [np.array([t.transform.translation.x, t.transform.translation.y, t.transform.translation.z])
                for t in tf if t.child_frame_id == "odom"]
    odom_base = [np.array([t.transform.translation.x, t.transform.translation.y, t.transform.translation.z])
                 for t in tf if t.child_frame_id == "base_link"]
    jumps = [np.linalg.norm(b - a) for a, b in zip(map_odom, map_odom[1:])]
    steps = [np.linalg.norm(b - a) for a, b in zip(odom_base, odom_base[1:])]
    assert max(jumps) > 2 * np.median(steps) and max(steps) < 3 * np.median(steps)
