"""PLY, TUM trajectory and TUM RGB-D folder I/O: exact round trips, formats, atomicity, errors."""
from __future__ import annotations

import os
import stat

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from spark3r.data import io
from spark3r.data.io import (
    atomic_write,
    format_stamp_ns,
    parse_stamp_s,
    read_ply,
    read_tum_trajectory,
    write_ply,
    write_tum_rgbd_folder,
    write_tum_trajectory,
)
from spark3r.data.synthetic import render_sequence


def _random_poses(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, :3] = Rotation.random(n, random_state=seed).as_matrix()
    poses[:, :3, 3] = rng.normal(scale=3.0, size=(n, 3))
    return poses


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".")]


# ---------------------------------------------------------------------------------------------- PLY


def test_ply_round_trip_is_exact_with_colours(tmp_path):
    rng = np.random.default_rng(0)
    xyz = (rng.normal(size=(1000, 3)) * 100).astype(np.float32)
    rgb = rng.integers(0, 256, size=(1000, 3), dtype=np.uint8)
    write_ply(tmp_path / "c.ply", xyz, rgb)
    cloud = read_ply(tmp_path / "c.ply")
    assert cloud.xyz.dtype == np.float32 and cloud.rgb.dtype == np.uint8
    assert np.array_equal(cloud.xyz, xyz) and np.array_equal(cloud.rgb, rgb)


def test_ply_without_colours_and_empty_cloud(tmp_path):
    xyz = np.arange(12, dtype=np.float64).reshape(4, 3) / 7.0
    write_ply(tmp_path / "a.ply", xyz)
    cloud = read_ply(tmp_path / "a.ply")
    assert cloud.rgb is None and np.array_equal(cloud.xyz, xyz.astype(np.float32))
    write_ply(tmp_path / "e.ply", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
    empty = read_ply(tmp_path / "e.ply")
    assert empty.xyz.shape == (0, 3) and empty.rgb.shape == (0, 3)


def test_ply_file_has_the_standard_binary_layout(tmp_path):
    """Parse the file by hand as Open3D/PCL would: fixed header, then packed 15-byte records."""
    xyz = np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.0]], dtype=np.float32)
    rgb = np.array([[255, 0, 10], [1, 2, 3]], dtype=np.uint8)
    write_ply(tmp_path / "s.ply", xyz, rgb)
    raw = (tmp_path / "s.ply").read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    lines = header.decode("ascii").splitlines()
    assert lines[0] == "ply" and lines[1] == "format binary_little_endian 1.0"
    props = [l for l in lines if l.startswith(("element", "property"))]
    assert props == ["element vertex 2", "property float x", "property float y", "property float z",
                     "property uchar red", "property uchar green", "property uchar blue"]
    records = np.frombuffer(body, dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    assert len(body) == 2 * 15 and np.array_equal(records["p"], xyz) and np.array_equal(records["c"], rgb)


def test_read_ply_reads_ascii_with_faces_and_big_endian_doubles(tmp_path):
    ascii_ply = (
        "ply\nformat ascii 1.0\ncomment hand written\nelement vertex 3\nproperty float x\nproperty float y\n"
        "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
        "0 0 0 255 0 0\n1 0 0 0 255 0\n0 1 0.5 0 0 255\n3 0 1 2\n"
    )
    (tmp_path / "a.ply").write_text(ascii_ply)
    cloud = read_ply(tmp_path / "a.ply")
    np.testing.assert_array_equal(cloud.xyz, [[0, 0, 0], [1, 0, 0], [0, 1, 0.5]])
    np.testing.assert_array_equal(cloud.rgb, [[255, 0, 0], [0, 255, 0], [0, 0, 255]])

    xyz = np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, 6.0]])
    header = ("ply\nformat binary_big_endian 1.0\nelement vertex 2\nproperty double x\nproperty double y\n"
              "property double z\nend_header\n").encode()
    (tmp_path / "b.ply").write_bytes(header + xyz.astype(">f8").tobytes())
    np.testing.assert_array_equal(read_ply(tmp_path / "b.ply").xyz, xyz.astype(np.float32))


def test_ply_errors(tmp_path):
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        write_ply(tmp_path / "x.ply", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        write_ply(tmp_path / "x.ply", np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(TypeError, match="uint8"):
        write_ply(tmp_path / "x.ply", np.zeros((2, 3)), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="rgb must have shape"):
        write_ply(tmp_path / "x.ply", np.zeros((2, 3)), np.zeros((3, 3), dtype=np.uint8))
    assert not (tmp_path / "x.ply").exists() and not _leftovers(tmp_path)
    (tmp_path / "not.ply").write_text("hello\n")
    with pytest.raises(ValueError, match="not a PLY"):
        read_ply(tmp_path / "not.ply")
    write_ply(tmp_path / "t.ply", np.ones((10, 3), np.float32))
    (tmp_path / "t.ply").write_bytes((tmp_path / "t.ply").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_ply(tmp_path / "t.ply")
    with pytest.raises(FileNotFoundError):
        read_ply(tmp_path / "missing.ply")


# ---------------------------------------------------------------------------------------------- TUM


def test_stamp_text_is_exact_from_integer_nanoseconds():
    assert format_stamp_ns(1_700_000_000_100_000_000) == "1700000000.100000000"
    assert format_stamp_ns(1) == "0.000000001"
    awkward = 1_700_000_000_123_456_789  # not representable as float64 seconds
    assert float(format_stamp_ns(awkward)) * 1e9 != awkward
    assert parse_stamp_s(format_stamp_ns(awkward)) == awkward
    assert parse_stamp_s("1305031102.175304") == 1_305_031_102_175_304_000
    assert parse_stamp_s("1.0000000005") == 1_000_000_000  # half-even below 1 ns
    with pytest.raises(ValueError):
        format_stamp_ns(-1)
    with pytest.raises(ValueError, match="not a timestamp"):
        parse_stamp_s("abc")


def test_tum_trajectory_round_trip(tmp_path):
    stamps = np.array([1, 999_999_999, 1_700_000_000_123_456_789, 10**18 + 7], dtype=np.int64)
    poses = _random_poses(4)
    poses[0, :3, :3] = np.diag([1.0, -1.0, -1.0])  # a 180-degree rotation (quaternion w = 0)
    write_tum_trajectory(tmp_path / "t.txt", stamps, poses)
    lines = [l for l in (tmp_path / "t.txt").read_text().splitlines() if not l.startswith("#")]
    assert [l.split()[0] for l in lines] == ["0.000000001", "0.999999999", "1700000000.123456789",
                                             "1000000000.000000007"]
    assert all(len(l.split()) == 8 for l in lines)
    back_stamps, back_poses = read_tum_trajectory(tmp_path / "t.txt")
    assert back_stamps.dtype == np.int64 and np.array_equal(back_stamps, stamps)
    assert np.array_equal(back_poses[:, :3, 3], poses[:, :3, 3])  # shortest-repr floats: exact
    np.testing.assert_allclose(back_poses, poses, atol=1e-14)


def test_tum_quaternion_order_is_xyzw(tmp_path):
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    write_tum_trajectory(tmp_path / "q.txt", np.array([5], dtype=np.int64), pose[None])
    values = [float(v) for v in (tmp_path / "q.txt").read_text().splitlines()[1].split()[4:]]
    np.testing.assert_allclose(values, [0.0, 0.0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-15)


def test_read_tum_accepts_other_writers_files(tmp_path):
    text = "# ground truth\n\n1305031102.1753 1.0 2.0 3.0 0 0 0 2\n1305031102.2 1 2 3 0 0 1 0  # comment\n"
    (tmp_path / "g.txt").write_text(text)
    stamps, poses = read_tum_trajectory(tmp_path / "g.txt")
    assert list(stamps) == [1_305_031_102_175_300_000, 1_305_031_102_200_000_000]
    np.testing.assert_allclose(poses[0], np.array([[1, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]]))
    np.testing.assert_allclose(poses[1, :3, :3], np.diag([-1.0, -1.0, 1.0]), atol=1e-15)


def test_tum_errors(tmp_path):
    poses = _random_poses(2)
    with pytest.raises(TypeError, match="integer nanoseconds"):
        write_tum_trajectory(tmp_path / "t.txt", np.array([0.1, 0.2]), poses)
    with pytest.raises(ValueError, match="2 poses but there are 3"):
        write_tum_trajectory(tmp_path / "t.txt", np.arange(3), poses)
    scaled = poses.copy()
    scaled[1, :3, :3] *= 1.01
    with pytest.raises(ValueError, match=r"c2w\[1\] is not a rigid"):
        write_tum_trajectory(tmp_path / "t.txt", np.arange(2), scaled)
    assert not (tmp_path / "t.txt").exists()
    (tmp_path / "bad.txt").write_text("1.0 1 2 3 0 0 0\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 8 values"):
        read_tum_trajectory(tmp_path / "bad.txt")
    (tmp_path / "zero.txt").write_text("# c\n1.0 1 2 3 0 0 0 0\n")
    with pytest.raises(ValueError, match=r"zero.txt:2: .*zero length"):
        read_tum_trajectory(tmp_path / "zero.txt")


# ---------------------------------------------------------------------------------------------- atomic


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "map.ply"
    write_ply(target, np.ones((3, 3), np.float32))
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"half written")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == before and not _leftovers(tmp_path)
    write_ply(target, np.zeros((5, 3), np.float32))
    assert len(read_ply(target).xyz) == 5 and not _leftovers(tmp_path)


def test_atomic_write_gives_normal_permissions(tmp_path):
    (tmp_path / "plain").write_text("x")
    write_tum_trajectory(tmp_path / "t.txt", np.arange(1), np.eye(4)[None])
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "t.txt") == mode(tmp_path / "plain")


def test_writers_refuse_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_ply(tmp_path / "no" / "x.ply", np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------- TUM RGB-D


@pytest.fixture(scope="module")
def small_seq():
    return render_sequence(num_frames=4, height=25, width=33, seed=4, trajectory="forward")


def test_tum_rgbd_folder_contents(tmp_path, small_seq):
    out = write_tum_rgbd_folder(small_seq, tmp_path / "scene")
    assert sorted(os.listdir(out)) == ["depth", "depth.txt", "groundtruth.txt", "intrinsics.txt", "rgb", "rgb.txt"]
    names = [format_stamp_ns(s) for s in small_seq.stamps_ns]
    for kind in ("rgb", "depth"):
        entries = [l.split() for l in (out / f"{kind}.txt").read_text().splitlines() if not l.startswith("#")]
        assert entries == [[n, f"{kind}/{n}.png"] for n in names]
    for i, name in enumerate(names):
        rgb = cv2.cvtColor(cv2.imread(str(out / "rgb" / f"{name}.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
        assert np.array_equal(rgb, small_seq.images[i])
        depth = cv2.imread(str(out / "depth" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and depth.shape == small_seq.depth[i].shape
        np.testing.assert_allclose(depth / 5000.0, small_seq.depth[i], atol=0.5 / 5000 + 1e-6)
    stamps, poses = read_tum_trajectory(out / "groundtruth.txt")
    assert np.array_equal(stamps, small_seq.stamps_ns)
    np.testing.assert_allclose(poses, small_seq.c2w, atol=1e-12)
    fx, fy, cx, cy, w, h = (out / "intrinsics.txt").read_text().splitlines()[1].split()
    assert float(fx) == small_seq.K[0, 0] and float(cy) == small_seq.K[1, 2] and (int(w), int(h)) == (33, 25)
    assert not _leftovers(tmp_path)


def test_tum_rgbd_depth_encoding_marks_invalid_as_zero():
    encoded = io.depth_to_tum_png(np.array([[0.0, -1.0, np.nan, 1.0, 13.107, 14.0]]))
    assert encoded.tolist() == [[0, 0, 0, 5000, 65535, 0]]


def test_tum_rgbd_folder_refuses_to_overwrite_unless_asked(tmp_path, small_seq):
    write_tum_rgbd_folder(small_seq, tmp_path / "scene")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_tum_rgbd_folder(small_seq, tmp_path / "scene")
    other = render_sequence(num_frames=2, height=9, width=11, seed=5)
    write_tum_rgbd_folder(other, tmp_path / "scene", overwrite=True)
    assert len(os.listdir(tmp_path / "scene" / "rgb")) == 2 and not _leftovers(tmp_path)


def test_tum_rgbd_folder_rejects_bad_sequences(tmp_path, small_seq):
    class Broken:
        images = small_seq.images.astype(np.float32)
        depth, stamps_ns, c2w, K = small_seq.depth, small_seq.stamps_ns, small_seq.c2w, small_seq.K

    with pytest.raises(ValueError, match="seq.images must be uint8"):
        write_tum_rgbd_folder(Broken(), tmp_path / "x")
    Broken.images = small_seq.images
    Broken.stamps_ns = np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="duplicate"):
        write_tum_rgbd_folder(Broken(), tmp_path / "x")
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


def test_tum_rgbd_folder_reads_back(tmp_path, small_seq):
    write_tum_rgbd_folder(small_seq, tmp_path / "scene")
    frames = list(io.iter_tum_rgbd_folder(tmp_path / "scene"))
    assert [f.stamp_ns for f in frames] == list(small_seq.stamps_ns)
    for frame, rgb, depth in zip(frames, small_seq.images, small_seq.depth):
        assert np.array_equal(frame.rgb, rgb)
        assert frame.depth.dtype == np.float32
        np.testing.assert_allclose(frame.depth, depth, atol=1e-4)
    K, width, height = io.read_tum_intrinsics(tmp_path / "scene")
    assert np.array_equal(K, small_seq.K) and (width, height) == (33, 25)
    assert all(f.depth is None for f in io.iter_tum_rgbd_folder(tmp_path / "scene", with_depth=False))


def test_tum_rgbd_depth_association_by_nearest_stamp(tmp_path):
    root = tmp_path / "tum"
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    rgb = np.zeros((4, 5, 3), np.uint8)
    for name in ("1.000000", "2.000000"):
        cv2.imwrite(str(root / "rgb" / f"{name}.png"), rgb)
    cv2.imwrite(str(root / "depth" / "1.010.png"), np.full((4, 5), 5000, np.uint16))
    cv2.imwrite(str(root / "depth" / "2.050.png"), np.full((4, 5), 10000, np.uint16))
    (root / "rgb.txt").write_text("# rgb\n1.000000 rgb/1.000000.png\n2.000000 rgb/2.000000.png\n")
    (root / "depth.txt").write_text("1.010 depth/1.010.png\n2.050 depth/2.050.png\n")
    first, second = io.iter_tum_rgbd_folder(root)
    assert first.stamp_ns == 1_000_000_000 and np.all(first.depth == 1.0)
    assert second.depth is None  # 50 ms away: not the same moment
    assert io.read_tum_intrinsics(root) is None
    (root / "rgb.txt").write_text("1.0 rgb/1.png extra\n")
    with pytest.raises(ValueError, match=r"rgb.txt:1: expected 'timestamp filename'"):
        io.iter_tum_rgbd_folder(root)
    with pytest.raises(FileNotFoundError, match="not a TUM RGB-D folder"):
        io.iter_tum_rgbd_folder(tmp_path / "nothing")
