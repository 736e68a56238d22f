"""The README's main job: `python -m spark3r_ros.demo --out DIR` (ground-truth test double)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spark3r.data.io import read_ply, read_tum_trajectory

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]


def test_main_job_writes_map_trajectory_and_report(tmp_path):
    pytest.importorskip("rclpy")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "spark3r_ros.demo", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "demo_report.json").read_text())
    assert report["ok"] and report["save_map"]["success"]
    assert report["tf_edges"].keys() == {"odom->base_link", "map->odom"}
    assert report["frames"] == {"cloud": ["map"], "map": ["map"], "odometry": ["odom"], "path": ["map"]}
    # Best-effort image transport: a loaded machine may lose an image or two of the 48.
    assert int(report["diagnostics"]["images_received"]) >= 44 and report["diagnostics_level"] == 0
    cloud = read_ply(out / "map.ply")
    stamps, poses = read_tum_trajectory(out / "trajectory.tum")
    assert len(cloud.xyz) == report["map_points_published"] > 1000 and np.all(np.isfinite(cloud.xyz))
    assert len(stamps) == report["path_poses"] == report["ate"]["poses"] >= 8
    # Ground-truth double: the stitched trajectory is the true one up to a similarity.
    assert report["ate"]["ate_rmse_m"] < 1e-3 * report["ate"]["scene_extent_m"]
