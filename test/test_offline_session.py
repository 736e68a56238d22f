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
