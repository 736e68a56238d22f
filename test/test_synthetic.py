"""The synthetic renderer: contract, geometric consistency, texture, determinism, sizes, errors."""
from __future__ import annotations

import numpy as np
import pytest

from spark3r.data import synthetic
from spark3r.data.synthetic import SyntheticSequence, render_sequence, render_view
from spark3r.geometry import invert_rigid, rigid_error


@pytest.fixture(scope="module")
def orbit() -> SyntheticSequence:
    return render_sequence(num_frames=8, height=60, width=80, seed=3, trajectory="orbit")


@pytest.fixture(scope="module")
def forward() -> SyntheticSequence:
    return render_sequence(num_frames=8, height=60, width=80, seed=3, trajectory="forward")


def _bilinear(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    img = img.astype(np.float64)
    if img.ndim == 2:
        img = img[..., None]
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    du, dv = (u - u0)[:, None], (v - v0)[:, None]
    return ((1 - du) * (1 - dv) * img[v0, u0] + du * (1 - dv) * img[v0, u0 + 1]
            + (1 - du) * dv * img[v0 + 1, u0] + du * dv * img[v0 + 1, u0 + 1])


def _reproject(seq: SyntheticSequence, i: int, j: int):
    """Frame i's world points seen by camera j: (inverse-depth ratio - 1, colour i, colour j)."""
    points = seq.world_points(i).reshape(-1, 3).astype(np.float64)
    w2c = invert_rigid(seq.c2w[j])
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    uv = (cam @ seq.K.T)[:, :2] / z[:, None]
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < seq.width - 1) & (uv[:, 1] >= 0) & (uv[:, 1] < seq.height - 1)
    assert inside.mean() > 0.5, "test frames should overlap"
    u, v = uv[inside, 0], uv[inside, 1]
    # Inverse depth is affine in pixel coordinates on a plane, so bilinear sampling is exact there.
    inv_depth_j = _bilinear(1.0 / seq.depth[j].astype(np.float64), u, v)[:, 0]
    in_front = (1.0 / z[inside]) / inv_depth_j - 1.0
    colour_i = seq.images[i].reshape(-1, 3)[inside].astype(np.float64)
    colour_j = _bilinear(seq.images[j], u, v)
    return in_front, colour_i, colour_j


def test_contract_shapes_dtypes_and_conventions(orbit):
    n, h, w = 8, 60, 80
    assert len(orbit) == n and (orbit.height, orbit.width) == (h, w)
    assert orbit.images.dtype == np.uint8 and orbit.images.shape == (n, h, w, 3)
    assert orbit.depth.dtype == np.float32 and orbit.depth.shape == (n, h, w)
    assert np.all(orbit.depth > 0) and np.all(np.isfinite(orbit.depth))
    assert orbit.depth.max() < orbit.scene_extent
    assert orbit.K.dtype == np.float64 and orbit.K.shape == (3, 3)
    np.testing.assert_allclose(orbit.K[:2, 2], [(w - 1) / 2, (h - 1) / 2])
    assert orbit.K[0, 0] == pytest.approx((w / 2) / np.tan(np.radians(70.0) / 2))
    assert orbit.c2w.dtype == np.float64 and orbit.c2w.shape == (n, 4, 4)
    assert max(rigid_error(p) for p in orbit.c2w) < 1e-9
    assert orbit.stamps_ns.dtype == np.int64 and orbit.stamps_ns[0] > 0
    assert np.all(np.diff(orbit.stamps_ns) == 100_000_000)  # 10 fps
    lo, hi = orbit.scene_bounds
    assert orbit.scene_extent == pytest.approx(np.linalg.norm(hi - lo))
    assert np.all((orbit.c2w[:, :3, 3] > lo) & (orbit.c2w[:, :3, 3] < hi))


def test_world_up_is_z_and_image_down_points_down(orbit):
    # z-up world: the floor (z = 0) is the lowest surface, the ceiling the highest.
    points = orbit.world_points(0).reshape(-1, 3)
    assert points[:, 2].min() == pytest.approx(0.0, abs=1e-4)
    # OpenCV optical frame: image y (down) has a negative world z component for a level camera,
    # and the bottom image row sees lower points than the top row.
    assert orbit.c2w[0, 2, 1] < 0
    pts = orbit.world_points(0)
    assert pts[-1, :, 2].mean() < pts[0, :, 2].mean()


def test_orbit_looks_at_the_room_centre(orbit):
    eyes = orbit.c2w[:, :3, 3]
    to_centre = np.array([0.0, 0.0, 0.8]) - eyes
    to_centre /= np.linalg.norm(to_centre, axis=1, keepdims=True)
    optical_axes = orbit.c2w[:, :3, 2]
    assert np.all(np.einsum("ij,ij->i", optical_axes, to_centre) > 0.9)
    steps = np.linalg.norm(np.diff(eyes, axis=0), axis=1)
    assert np.allclose(steps, synthetic.DEFAULT_SPEED / 10.0, rtol=0.1)  # speed / fps


def test_forward_walks_along_its_optical_axis(forward):
    eyes = forward.c2w[:, :3, 3]
    motion = eyes[-1] - eyes[0]
    assert np.linalg.norm(motion) == pytest.approx(synthetic.DEFAULT_SPEED * 0.7, rel=0.05)
    assert np.dot(motion / np.linalg.norm(motion), forward.c2w[0, :3, 2]) > 0.9
    yaw = np.degrees(np.arctan2(forward.c2w[:, 1, 2], forward.c2w[:, 0, 2]))
    assert 0.5 < np.ptp(yaw) < 25.0  # slight, nonzero yaw


def test_static_trajectory_does_not_move():
    seq = render_sequence(num_frames=3, height=12, width=16, trajectory="static")
    assert np.array_equal(seq.c2w[0], seq.c2w[2]) and np.array_equal(seq.images[0], seq.images[2])


@pytest.mark.parametrize("name", ["orbit", "forward"])
def test_depth_reprojects_consistently_between_frames(orbit, forward, name):
    seq = {"orbit": orbit, "forward": forward}[name]
    for j in (1, 4, 7):
        in_front, colour_i, colour_j = _reproject(seq, 0, j)
        visible = np.abs(in_front) < 1e-3
        # Most points land exactly on frame j's surface; the rest are occluded (behind it).
        assert visible.mean() > 0.85, (name, j, visible.mean())
        # A point of frame 0 in front of what camera j sees would be a geometric error; only
        # bilinear sampling across depth edges may do it.
        assert (in_front > 0.02).mean() < 0.03, (name, j)
        # Texture sticks to the surfaces: the same point has the same colour in both views.
        assert np.median(np.abs(colour_i - colour_j)[visible]) < 3.0, (name, j)


def _distance_to_scene_surface(points: np.ndarray) -> np.ndarray:
    """Unsigned distance of points to the nearest surface of the scene, from its definition."""
    lo, hi = synthetic.ROOM_MIN, synthetic.ROOM_MAX
    dist = np.minimum(np.abs(points - lo), np.abs(points - hi)).min(axis=1)
    for box_lo, box_hi in synthetic.BOXES:
        box_lo, box_hi = np.asarray(box_lo), np.asarray(box_hi)
        outside = np.linalg.norm(np.maximum(np.maximum(box_lo - points, points - box_hi), 0.0), axis=1)
        inside = np.minimum(points - box_lo, box_hi - points).min(axis=1)
        dist = np.minimum(dist, np.where(inside > 0, inside, outside))
    for centre, radius in synthetic.SPHERES:
        dist = np.minimum(dist, np.abs(np.linalg.norm(points - np.asarray(centre), axis=1) - radius))
    return dist


def test_world_points_of_all_frames_lie_on_scene_surfaces(orbit, forward):
    for seq in (orbit, forward):
        for i in (0, len(seq) - 1):
            points = seq.world_points(i).reshape(-1, 3).astype(np.float64)
            assert seq.world_points(i).dtype == np.float32
            assert np.percentile(_distance_to_scene_surface(points), 99.9) < 2e-3


def test_world_points_match_depth_along_the_optical_axis(orbit):
    points = orbit.world_points(2).astype(np.float64)
    along_axis = (points - orbit.c2w[2, :3, 3]) @ orbit.c2w[2, :3, 2]
    np.testing.assert_allclose(along_axis, orbit.depth[2], rtol=1e-5)


def test_texture_is_detailed_enough_for_flow():
    seq = render_sequence(num_frames=2, height=120, width=160, seed=0)
    grey = seq.images[0].astype(np.float64).mean(axis=2)
    assert seq.images[0].std() > 20
    assert len(np.unique(seq.images[0].reshape(-1, 3), axis=0)) > 2000
    # Local structure everywhere, not just a few edges: most 8x8 patches have contrast.
    patches = grey[: 120 // 8 * 8, : 160 // 8 * 8].reshape(15, 8, 20, 8).transpose(0, 2, 1, 3).reshape(-1, 64)
    assert (patches.std(axis=1) > 2.0).mean() > 0.9
    # And the colour channels are not all the same (hue variation helps matching).
    assert np.abs(seq.images[0][..., 0].astype(int) - seq.images[0][..., 2]).mean() > 5


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    a = render_sequence(num_frames=3, height=20, width=30, seed=7, trajectory="forward")
    b = render_sequence(num_frames=3, height=20, width=30, seed=7, trajectory="forward")
    c = render_sequence(num_frames=3, height=20, width=30, seed=8, trajectory="forward")
    for field in ("images", "depth", "c2w", "stamps_ns", "K", "base_c2w"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), field
    assert a.images.tobytes() != c.images.tobytes()


@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (33, 17), (61, 90)])
def test_arbitrary_and_odd_sizes(height, width):
    seq = render_sequence(num_frames=2, height=height, width=width, seed=1)
    assert seq.images.shape == (2, height, width, 3) and seq.depth.shape == (2, height, width)
    assert np.all(seq.depth > 0)
    np.testing.assert_allclose(seq.K[:2, 2], [(width - 1) / 2, (height - 1) / 2])


def test_a_larger_render_agrees_with_a_smaller_one_at_the_centre():
    small = render_sequence(num_frames=1, height=31, width=41, seed=2)
    large = render_sequence(num_frames=1, height=93, width=123, seed=2)
    # Same field of view: the central pixels see the same ray, so the same depth.
    assert large.depth[0, 46, 61] == pytest.approx(small.depth[0, 15, 20], rel=1e-6)


def test_base_link_extrinsic_is_a_forward_looking_camera(orbit):
    T = orbit.base_to_camera
    assert rigid_error(T) < 1e-12
    np.testing.assert_allclose(T[:3, :3] @ [0, 0, 1], [1, 0, 0])  # optical z = base forward
    np.testing.assert_allclose(T[:3, :3] @ [1, 0, 0], [0, -1, 0])  # image right = base right (-y)
    np.testing.assert_allclose(T[:3, :3] @ [0, 1, 0], [0, 0, -1])  # image down = base down
    np.testing.assert_allclose(T[:3, 3], synthetic.CAMERA_MOUNT_XYZ)
    np.testing.assert_allclose(orbit.base_c2w @ T, orbit.c2w, atol=1e-12)


def test_render_view_matches_the_sequence_frame(orbit):
    rgb, depth = render_view(orbit.c2w[5], orbit.K, orbit.height, orbit.width, seed=orbit.seed)
    assert np.array_equal(rgb, orbit.images[5]) and np.array_equal(depth, orbit.depth[5])


def test_fps_and_speed_set_the_sampling():
    slow = render_sequence(num_frames=3, height=8, width=8, fps=30.0, speed=0.3)
    assert np.all(np.diff(slow.stamps_ns) - 33_333_333 <= 1)
    steps = np.linalg.norm(np.diff(slow.c2w[:, :3, 3], axis=0), axis=1)
    np.testing.assert_allclose(steps, 0.3 / 30.0, rtol=0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"trajectory": "spiral"}, "unknown trajectory"),
        ({"height": 0}, "height"),
        ({"width": 2.5}, "width"),
        ({"num_frames": 0}, "num_frames"),
        ({"fps": 0.0}, "fps"),
        ({"fov_deg": 180.0}, "fov_deg"),
        ({"speed": -1.0}, "speed"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(num_frames=2, height=8, width=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        render_sequence(**args)


def test_render_view_rejects_poses_outside_the_room_and_bad_shapes(orbit):
    outside = orbit.c2w[0].copy()
    outside[:3, 3] = [10.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="outside the room"):
        render_view(outside, orbit.K, 8, 8)
    in_table = orbit.c2w[0].copy()
    in_table[:3, 3] = [0.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="inside an object"):
        render_view(in_table, orbit.K, 8, 8)
    with pytest.raises(ValueError, match="c2w"):
        render_view(np.eye(3), orbit.K, 8, 8)
    with pytest.raises(IndexError):
        orbit.world_points(99)


def test_checker_parity_is_stable_on_faces_that_lie_on_a_checker_boundary():
    """The y = +3 m wall sits exactly on a checker boundary; hit points jitter by float rounding
    across it, which must not flip the checker colour pixel by pixel (salt-and-pepper)."""
    rng = np.random.default_rng(0)
    n = 2000
    on_wall = np.column_stack([rng.uniform(-3, 3, n), np.full(n, 3.0), rng.uniform(0.1, 2.7, n)])
    jittered = on_wall.copy()
    jittered[:, 1] = np.nextafter(3.0, 0.0)  # one ulp inside the room
    args = dict(surface=np.full(n, 3), normal=np.tile([0.0, -1.0, 0.0], (n, 1)), face_axis=np.full(n, 1),
                footprint=np.full(n, 1e-3), seed=0)
    np.testing.assert_allclose(synthetic._shade(on_wall, **args), synthetic._shade(jittered, **args), atol=1e-6)
