"""The README's main job: `python -m spark3r_ros.demo --out DIR` (built-in vggt-nano network on a
held-out procedural scene), and the same pipeline with the ground-truth test double."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spark3r.data.io import read_ply, read_tum_trajectory

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]


def test_ground_truth_double_writes_map_trajectory_and_report(tmp_path):
    pytest.importorskip("rclpy")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "spark3r_ros.demo", "--out", str(out), "--backbone", "ground-truth"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
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
    assert abs(report["ate"]["scale_drift"] - 1.0) < 1e-3
    # Map points lie on the true surfaces (up to the voxel grid).
    assert report["map_depth"]["points_checked"] > 1000 and report["map_depth"]["rel_err_median"] < 0.01


def test_main_job_maps_with_the_built_in_network(tmp_path):
    """The default command: vggt-nano (checkpoint builtin) through the real node on held-out
    procedural scene 7; the report measures it against the ground truth."""
    pytest.importorskip("rclpy")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "spark3r_ros.demo", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "demo_report.json").read_text())
    assert report["backbone"] == "vggt-nano" and report["checkpoint"] == "builtin"
    assert report["scene"] == {"kind": "procedural", "seed": 7, "motion": "forward"}
    assert report["ok"] and report["map_points_published"] > 1000
    ate = report["ate"]
    assert ate["poses"] == report["path_poses"] >= 8 and np.isfinite(ate["ate_rmse_m"])
    assert 0 < ate["ate_over_length"] and np.isfinite(ate["scale_drift"])
    assert report["map_depth"]["points_checked"] > 1000
