"""Voxel map: per-voxel means of position and colour, accumulation across inserts, capacity."""
import numpy as np
import pytest

from spark3r.mapping import VoxelMap


def test_mean_position_and_colour_per_voxel_across_inserts():
    vm = VoxelMap(voxel_size=1.0, max_points=100)
    vm.insert(np.array([[0.1, 0.1, 0.1], [0.3, 0.5, 0.9]]), np.array([[0, 0, 0], [100, 200, 50]], np.uint8))
    vm.insert(np.array([[0.2, 0.3, 0.2], [-0.5, 2.5, 0.5]]), np.array([[50, 10, 250], [1, 2, 3]], np.uint8))
    xyz, rgb = vm.points()
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8 and len(vm) == 2
    order = np.argsort(xyz[:, 1])
    np.testing.assert_allclose(xyz[order[0]], [0.2, 0.3, 0.4], atol=1e-6)
    np.testing.assert_array_equal(rgb[order[0]], [50, 70, 100])
    np.testing.assert_allclose(xyz[order[1]], [-0.5, 2.5, 0.5], atol=1e-6)


def test_matches_a_brute_force_grouping():
    rng = np.random.default_rng(0)
    vm = VoxelMap(voxel_size=0.25, max_points=10**6)
    pts = rng.normal(size=(5000, 3))
    cols = rng.integers(0, 256, size=(5000, 3)).astype(np.uint8)
    for chunk in np.array_split(np.arange(5000), 7):
        vm.insert(pts[chunk], cols[chunk])
    keys = [tuple(k) for k in np.floor(pts / 0.25).astype(int)]
    groups = {}
    for k, p in zip(keys, pts):
        groups.setdefault(k, []).append(p)
    xyz, _ = vm.points()
    assert len(xyz) == len(groups)
    expected = np.array(sorted(np.mean(v, axis=0).tolist() for v in groups.values()))
    got = np.array(sorted(xyz.astype(np.float64).tolist()))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_capacity_evicts_least_recently_updated_voxels():
    vm = VoxelMap(voxel_size=1.0, max_points=10)
    old = np.c_[np.arange(8) + 0.5, np.zeros(8), np.zeros(8)]
    vm.insert(old, np.zeros((8, 3), np.uint8))
    new = np.c_[np.arange(8) + 0.5, np.full(8, 5.5), np.zeros(8)]
    vm.insert(new, np.zeros((8, 3), np.uint8))
    xyz, _ = vm.points()
    assert len(xyz) == 10 and vm.evicted == 6
    assert np.sum(xyz[:, 1] > 5) == 8  # all of the newest insert survives
    vm.insert(old[:1], np.zeros((1, 3), np.uint8))  # refreshing an old voxel keeps it
    assert len(vm) == 10


def test_non_finite_and_out_of_range_points_are_skipped():
    vm = VoxelMap(voxel_size=1e-3, max_points=100)
    n = vm.insert(np.array([[np.nan, 0, 0], [np.inf, 1, 1], [1e9, 0, 0], [0.0, 0.0, 0.0]]), np.zeros((4, 3), np.uint8))
    assert n == 1 and vm.points_out_of_range == 1
    vm.clear()
    assert len(vm) == 0 and vm.points()[0].shape == (0, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="voxel_size"):
        VoxelMap(0.0, 10)
    with pytest.raises(ValueError, match="max_points"):
        VoxelMap(0.1, 0)
    with pytest.raises(ValueError, match="colours"):
        VoxelMap(0.1, 10).insert(np.zeros((3, 3)), np.zeros((2, 3), np.uint8))
