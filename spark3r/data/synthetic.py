"""Deterministic synthetic indoor scenes rendered by numpy ray casting.

The scene is a closed box room (8 m x 6 m x 2.8 m) furnished with a few axis-aligned boxes and
spheres. Every surface carries a solid (3D) procedural texture: a coloured checker plus several
octaves of value noise, band-limited per pixel so that small renders do not alias. Lighting is
Lambertian under a fixed directional light, so a surface point has the same colour from every
viewpoint (brightness constancy holds for optical flow and photometric checks).

Conventions
-----------
* World frame: z up (REP-103 style), x along the long side of the room, floor at z = 0,
  room centred on x = y = 0.
* Camera poses ``c2w`` are camera-to-world in the OpenCV optical convention
  (x right, y down, z forward): ``X_world = c2w[:3, :3] @ X_cam + c2w[:3, 3]``.
* Pixel ``(u, v)`` = (column, row) with integer coordinates at pixel centres; the principal
  point is the image centre ``((W - 1) / 2, (H - 1) / 2)``; ``fov_deg`` is the horizontal field
  of view and pixels are square.
* ``depth`` is z-depth (distance along the optical axis), never a ray length.
* The robot carrying the camera has ``base_link`` (x forward, y left, z up); the camera optical
  frame sits at ``CAMERA_MOUNT_XYZ`` in it, looking along base x. ``base_to_camera`` is that
  static transform (pose of the optical frame in ``base_link``, what ``/tf_static`` carries with
  parent ``base_link``), and ``base_c2w[i] = c2w[i] @ inv(base_to_camera)`` is the base pose in the
  world, so the base tilts with the camera when the camera looks down.

Everything is a pure function of the arguments: the same call returns identical bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from spark3r.geometry import invert_rigid

# Room and furniture (metres). Trajectories below are laid out to stay clear of all of them.
ROOM_MIN = np.array([-4.0, -3.0, 0.0])
ROOM_MAX = np.array([4.0, 3.0, 2.8])
BOXES = (  # (min corner, max corner)
    ((-0.5, -0.4, 0.0), (0.5, 0.4, 0.75)),  # table in the middle of the room
    ((2.5, 1.8, 0.0), (3.5, 2.8, 1.2)),  # cabinet in a corner
    ((-3.2, -2.6, 0.0), (-2.4, -1.6, 1.8)),  # tall shelf
    ((-0.9, 2.3, 0.0), (0.9, 3.0, 0.5)),  # low bench along a wall
)
SPHERES = (  # (centre, radius)
    ((0.1, 0.0, 1.05), 0.3),  # ball on the table
    ((-2.5, 2.0, 0.5), 0.5),  # big ball on the floor
    ((2.8, -2.2, 1.4), 0.35),  # floating lamp
)
EPOCH_NS = 1_700_000_000 * 10**9  # nonzero start time for stamps
CAMERA_MOUNT_XYZ = (0.10, 0.0, 0.25)  # optical centre in base_link (m)
TRAJECTORIES = ("orbit", "forward", "static")
DEFAULT_SPEED = 0.5  # m/s of the camera centre for the moving trajectories

_LIGHT_DIR = np.array([0.35, -0.45, 0.82]) / np.linalg.norm([0.35, -0.45, 0.82])
# (cell size in metres, amplitude) of the value-noise octaves; the coarse checker is separate.
_NOISE_OCTAVES = ((0.8, 0.22), (0.3, 0.22), (0.12, 0.2), (0.05, 0.16), (0.02, 0.12))
_CHECKER_CELL = 0.4
_NUM_SURFACES = 6 + len(BOXES) + len(SPHERES)  # room faces, boxes, spheres


@dataclass(frozen=True)
class SyntheticSequence:
    """A rendered camera sequence with ground truth (see the module docstring for conventions)."""

    images: np.ndarray  # uint8 [N,H,W,3] RGB
    depth: np.ndarray  # float32 [N,H,W] metric z-depth, > 0
    K: np.ndarray  # float64 [3,3]
    c2w: np.ndarray  # float64 [N,4,4] camera-to-world, OpenCV optical
    stamps_ns: np.ndarray  # int64 [N]
    scene_extent: float  # room diagonal (m)
    scene_bounds: np.ndarray  # float64 [2,3] room min / max corner (m)
    base_to_camera: np.ndarray  # float64 [4,4] optical frame pose in base_link
    base_c2w: np.ndarray  # float64 [N,4,4] base_link pose in the world
    fps: float
    trajectory: str
    seed: int

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def world_points(self, i: int) -> np.ndarray:
        """Depth of frame ``i`` unprojected to world coordinates, float32 [H,W,3]."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame index {i} out of range for a sequence of {len(self)} frames")
        dirs_cam = pixel_rays(self.K, self.height, self.width)  # z = 1
        pts_cam = dirs_cam * self.depth[i].astype(np.float64)[..., None]
        pose = self.c2w[i]
        return (pts_cam @ pose[:3, :3].T + pose[:3, 3]).astype(np.float32)


def intrinsics_from_fov(height: int, width: int, fov_deg: float) -> np.ndarray:
    """Pinhole K for a horizontal field of view, square pixels, centred principal point."""
    _check_size(height, width)
    if not 1.0 <= fov_deg <= 170.0:
        raise ValueError(f"fov_deg must be a horizontal field of view in [1, 170] degrees, got {fov_deg}")
    f = (width / 2.0) / np.tan(np.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def pixel_rays(K: np.ndarray, height: int, width: int) -> np.ndarray:
    """Camera-frame ray directions K^-1 [u, v, 1] for every pixel centre, float64 [H,W,3], z = 1."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    x = (u - K[0, 2] - K[0, 1] * (v - K[1, 2]) / K[1, 1]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    return np.stack([x, y, np.ones_like(x)], axis=-1)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """OpenCV camera-to-world pose at ``eye`` looking at ``target`` with image-up towards ``up``."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    norm = np.linalg.norm(forward)
    if norm < 1e-9:
        raise ValueError("look_at: target coincides with eye")
    forward /= norm
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to the up vector")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose


def base_to_camera_transform(mount_xyz=CAMERA_MOUNT_XYZ) -> np.ndarray:
    """Static base_link -> camera optical frame transform for a forward-looking camera."""
    pose = np.eye(4)
    # Optical axes expressed in base_link: x_opt = -y_base, y_opt = -z_base, z_opt = +x_base.
    pose[:3, :3] = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    pose[:3, 3] = mount_xyz
    return pose


# ---------------------------------------------------------------------------------------------
# Trajectories: each maps times (s) and a seed-dependent phase to camera poses [N,4,4].

def _orbit_poses(times: np.ndarray, phase: float, speed: float) -> np.ndarray:
    radius = 1.8
    omega = speed / radius
    poses = []
    for t in times:
        angle = phase + omega * t
        eye = np.array([radius * np.cos(angle), radius * np.sin(angle), 1.5 + 0.1 * np.sin(0.7 * t)])
        # Aim slightly off the centre so the view is not perfectly symmetric.
        target = np.array([0.3 * np.cos(0.4 * t), 0.3 * np.sin(0.3 * t), 0.8])
        poses.append(look_at(eye, target))
    return np.stack(poses)


def _stadium_point(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position and unit tangent on a stadium loop (straights along x at y = -+1.4) at arc length s."""
    half, radius = 1.5, 1.4
    straight, arc = 2 * half, np.pi * radius
    s = np.mod(s, 2 * (straight + arc))
    if s < straight:  # bottom straight, heading +x
        return np.array([-half + s, -radius]), np.array([1.0, 0.0])
    s -= straight
    if s < arc:  # right end, counter-clockwise
        a = -np.pi / 2 + s / radius
        return np.array([half + radius * np.cos(a), radius * np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    s -= arc
    if s < straight:  # top straight, heading -x
        return np.array([half - s, radius]), np.array([-1.0, 0.0])
    s -= straight
    a = np.pi / 2 + s / radius
    return np.array([-half + radius * np.cos(a), radius * np.sin(a)]), np.array([-np.sin(a), np.cos(a)])


def _forward_poses(times: np.ndarray, phase: float, speed: float) -> np.ndarray:
    poses = []
    for t in times:
        # The phase moves the start within the first half of the bottom straight, so short walks
        # are straight whatever the seed.
        xy, tangent = _stadium_point(phase / (2 * np.pi) * 1.5 + speed * t)
        yaw = np.radians(8.0) * np.sin(1.3 * t + phase)  # the "slight yaw" of a walking head
        c, s = np.cos(yaw), np.sin(yaw)
        heading = np.array([c * tangent[0] - s * tangent[1], s * tangent[0] + c * tangent[1]])
        eye = np.array([xy[0], xy[1], 1.45 + 0.02 * np.sin(2 * np.pi * 1.8 * t)])
        target = eye + np.array([heading[0], heading[1], -0.12])
        poses.append(look_at(eye, target))
    return np.stack(poses)


def _static_poses(times: np.ndarray, phase: float, speed: float) -> np.ndarray:
    return np.repeat(_orbit_poses(np.zeros(1), phase, speed), len(times), axis=0)


_TRAJECTORY_FUNCS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "orbit": _orbit_poses,
    "forward": _forward_poses,
    "static": _static_poses,
}


def trajectory_poses(trajectory: str, num_frames: int, fps: float, seed: int = 0,
                     speed: float = DEFAULT_SPEED) -> np.ndarray:
    """Camera-to-world poses [N,4,4] of a named trajectory sampled at ``fps``."""
    if trajectory not in _TRAJECTORY_FUNCS:
        raise ValueError(f"unknown trajectory {trajectory!r}; expected one of {TRAJECTORIES}")
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not np.isfinite(speed) or speed < 0 or speed > 5.0:
        raise ValueError(f"speed must be in [0, 5] m/s, got {speed!r}")
    _check_seed(seed)
    phase = float(np.random.default_rng(seed).uniform(0.0, 2.0 * np.pi))
    times = np.arange(num_frames, dtype=np.float64) / fps
    return _TRAJECTORY_FUNCS[trajectory](times, phase, speed)


def frame_stamps_ns(num_frames: int, fps: float) -> np.ndarray:
    """int64 stamps from ``EPOCH_NS``, each rounded from its own exact time (no accumulated drift)."""
    return EPOCH_NS + np.round(np.arange(num_frames) * (1e9 / fps)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Ray casting


# All rays of a view start at the camera centre ``eye`` [3]; ``inv_dirs`` = 1 / dirs with +-inf for
# zero components, which makes the slab tests below come out right without special cases
# (an axis the ray is parallel to gives -inf/+inf bounds inside the slab, a miss outside it).


def _intersect_room(eye: np.ndarray, inv_dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance through the room walls from inside, and the axis of the wall hit."""
    t_axes = np.maximum((ROOM_MIN - eye) * inv_dirs, (ROOM_MAX - eye) * inv_dirs)
    axis = np.argmin(t_axes, axis=-1)
    return np.take_along_axis(t_axes, axis[:, None], axis=-1)[:, 0], axis


def _intersect_box(eye: np.ndarray, inv_dirs: np.ndarray, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Entry distance into an axis-aligned box from outside (inf when missed) and the hit axis."""
    t1 = (np.asarray(lo) - eye) * inv_dirs
    t2 = (np.asarray(hi) - eye) * inv_dirs
    t_near_axes = np.minimum(t1, t2)
    axis = np.argmax(t_near_axes, axis=-1)
    t_near = np.take_along_axis(t_near_axes, axis[:, None], axis=-1)[:, 0]
    t_far = np.maximum(t1, t2).min(axis=-1)
    hit = (t_near <= t_far) & (t_near > 1e-6)
    return np.where(hit, t_near, np.inf), axis


def _intersect_sphere(eye: np.ndarray, dirs: np.ndarray, centre, radius: float) -> np.ndarray:
    oc = eye - np.asarray(centre)
    a = np.einsum("ij,ij->i", dirs, dirs)
    b = dirs @ oc
    c = oc @ oc - radius**2
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a  # near root; cameras are never inside a sphere
    return np.where((disc >= 0) & (t > 1e-6), t, np.inf)


def _cast(eye: np.ndarray, dirs: np.ndarray):
    """Nearest hit of every ray from ``eye``: distance t (in units of |dir|), surface id, unit
    normal and the normal's axis for planar faces (-1 on spheres)."""
    with np.errstate(divide="ignore"):
        inv_dirs = 1.0 / dirs
    t, axis = _intersect_room(eye, inv_dirs)
    rows = np.arange(len(dirs))
    surface = 2 * axis + (dirs[rows, axis] > 0)  # 0..5: -x, +x, -y, +y, floor, ceiling
    with np.errstate(invalid="ignore"):  # 0 * inf only for a ray parallel to a face it sits on
        for k, (lo, hi) in enumerate(BOXES):
            t_box, box_axis = _intersect_box(eye, inv_dirs, lo, hi)
            closer = t_box < t
            t = np.where(closer, t_box, t)
            surface = np.where(closer, 6 + k, surface)
            axis = np.where(closer, box_axis, axis)
    # Walls and box faces alike face against the ray along their axis.
    normal = np.zeros_like(dirs)
    normal[rows, axis] = -np.sign(dirs[rows, axis])
    for k, (centre, radius) in enumerate(SPHERES):
        t_sph = _intersect_sphere(eye, dirs, centre, radius)
        closer = np.flatnonzero(t_sph < t)
        if closer.size:
            t[closer] = t_sph[closer]
            surface[closer] = 6 + len(BOXES) + k
            normal[closer] = (eye + t[closer, None] * dirs[closer] - np.asarray(centre)) / radius
            axis[closer] = -1
    return t, surface, normal, axis


# ---------------------------------------------------------------------------------------------
# Texture


_HASH_PRIMES = (np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F))


def _hash_unit(hx: np.ndarray, hy: np.ndarray, hz: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random float32 in [0, 1) per lattice point, from the per-axis
    products ``coordinate * prime`` (uint32 arithmetic wraps, which is the point)."""
    h = hx ^ hy ^ hz ^ np.uint32((seed * 0x9E3779B9) & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _value_noise(points: np.ndarray, cell: float, seeds: tuple[int, ...]) -> np.ndarray:
    """Smooth 3D value noise in [0, 1] with lattice spacing ``cell`` metres: float32 [N, len(seeds)],
    one independent noise per seed sharing the lattice arithmetic."""
    p = points / cell
    base = np.floor(p)
    frac = (p - base).astype(np.float32)
    w = frac * frac * (np.float32(3.0) - np.float32(2.0) * frac)  # smoothstep: C1 across cells
    lattice = base.astype(np.int64).astype(np.uint32)  # wraps negatives, consistently
    # products[axis][d] = (coordinate + d) * prime, for the two lattice planes around each point
    products = [(lattice[:, k] * _HASH_PRIMES[k], (lattice[:, k] + np.uint32(1)) * _HASH_PRIMES[k]) for k in range(3)]
    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    out = np.empty((len(points), len(seeds)), dtype=np.float32)
    for j, seed in enumerate(seeds):
        corner = {(dx, dy, dz): _hash_unit(products[0][dx], products[1][dy], products[2][dz], seed)
                  for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)}
        # Trilinear blend as nested lerps: along x, then y, then z.
        along_x = {(dy, dz): corner[0, dy, dz] + wx * (corner[1, dy, dz] - corner[0, dy, dz])
                   for dy in (0, 1) for dz in (0, 1)}
        along_y = [along_x[0, dz] + wy * (along_x[1, dz] - along_x[0, dz]) for dz in (0, 1)]
        out[:, j] = along_y[0] + wz * (along_y[1] - along_y[0])
    return out


def _surface_palette(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct colours per surface (checker light / dark tint), float [S,3] in [0,1]."""
    rng = np.random.default_rng([seed, 7919])
    hues = (np.arange(_NUM_SURFACES) * 0.618034 + rng.uniform()) % 1.0
    sat = rng.uniform(0.35, 0.75, _NUM_SURFACES)
    val = rng.uniform(0.65, 0.95, _NUM_SURFACES)
    first = _hsv_to_rgb(hues, sat, val)
    second = _hsv_to_rgb((hues + rng.uniform(0.15, 0.4, _NUM_SURFACES)) % 1.0, sat * 0.8, val * 0.55)
    return first, second


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _shade(points, surface, normal, face_axis, footprint, seed: int) -> np.ndarray:
    """Linear RGB in [0, 1] of every hit point (view independent)."""
    first, second = _surface_palette(seed)
    cells = np.floor(points / _CHECKER_CELL + 0.5)
    # A planar face can lie exactly on a checker boundary along its normal, where rounding noise
    # in the hit point would flip the parity pixel by pixel; only in-plane axes may count there.
    planar = face_axis >= 0
    cells[np.flatnonzero(planar), face_axis[planar]] = 0.0
    checker_idx = cells.astype(np.int64).sum(axis=-1) & 1
    # Fade the checker edge into a ramp once a checker cell spans only a few pixels.
    checker_weight = np.clip(_CHECKER_CELL / (2.0 * footprint) - 1.0, 0.0, 1.0)
    mix = 0.5 + (checker_idx - 0.5) * checker_weight
    colour = first[surface] * mix[:, None] + second[surface] * (1.0 - mix[:, None])

    detail = np.zeros(len(points))
    for octave, (cell, amplitude) in enumerate(_NOISE_OCTAVES):
        # Octaves finer than ~2 pixels would alias: fade them out instead of sampling them, and
        # evaluate them only where they contribute.
        weight = np.clip(cell / (2.0 * footprint) - 1.0, 0.0, 1.0)
        active = np.flatnonzero(weight > 0)
        if active.size:
            noise = _value_noise(points[active], cell, (seed * 31 + octave,))[:, 0]
            detail[active] += weight[active] * amplitude * (noise - 0.5)
    tint = _value_noise(points, 0.5, (seed * 31 + 100, seed * 31 + 101, seed * 31 + 102))
    colour = colour * (1.0 + 2.5 * detail)[:, None] * (0.7 + 0.6 * tint)

    lambert = np.clip(normal @ _LIGHT_DIR, 0.0, 1.0)
    return np.clip(colour * (0.45 + 0.55 * lambert)[:, None], 0.0, 1.0)


def render_view(c2w: np.ndarray, K: np.ndarray, height: int, width: int, seed: int = 0):
    """Render one view of the scene: (uint8 [H,W,3] RGB, float32 [H,W] z-depth)."""
    _check_size(height, width)
    _check_seed(seed)
    c2w = np.asarray(c2w, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    if c2w.shape != (4, 4) or K.shape != (3, 3):
        raise ValueError(f"render_view expects c2w [4,4] and K [3,3], got {c2w.shape} and {K.shape}")
    eye = c2w[:3, 3]
    if np.any(eye <= ROOM_MIN) or np.any(eye >= ROOM_MAX):
        raise ValueError(f"camera centre {eye} is outside the room {ROOM_MIN}..{ROOM_MAX}")
    inside_box = any(np.all((eye > lo) & (eye < hi)) for lo, hi in BOXES)
    if inside_box or any(np.linalg.norm(eye - np.asarray(c)) < r for c, r in SPHERES):
        raise ValueError(f"camera centre {eye} is inside an object of the scene")
    rays_cam = pixel_rays(K, height, width).reshape(-1, 3)  # z = 1, so t below is z-depth
    dirs = rays_cam @ c2w[:3, :3].T
    t, surface, normal, face_axis = _cast(eye, dirs)
    points = eye + t[:, None] * dirs
    # Metres covered by one pixel on the surface: range / focal, stretched at grazing angles.
    ray_len = np.linalg.norm(dirs, axis=-1)
    cos_incidence = np.abs(np.einsum("ij,ij->i", normal, dirs)) / ray_len
    footprint = t * ray_len / K[0, 0] / np.maximum(cos_incidence, 0.2)
    linear = _shade(points, surface, normal, face_axis, footprint, seed)
    srgb = np.power(linear, 1.0 / 2.2)  # display gamma: keeps dark texture visible
    rgb = np.round(srgb * 255.0).astype(np.uint8).reshape(height, width, 3)
    return rgb, t.astype(np.float32).reshape(height, width)


def render_sequence(num_frames: int = 30, height: int = 120, width: int = 160, seed: int = 0,
                    trajectory: str = "orbit", fps: float = 10.0, fov_deg: float = 70.0,
                    speed: float = DEFAULT_SPEED) -> SyntheticSequence:
    """Render ``num_frames`` views along a trajectory ("orbit", "forward" or "static").

    ``speed`` is the camera centre's speed in m/s (trajectories are functions of time, so a
    higher ``fps`` gives denser sampling of the same path). ``seed`` changes the texture, the
    colours and where on the path the camera starts; the room geometry is fixed.
    """
    _check_size(height, width)
    K = intrinsics_from_fov(height, width, fov_deg)
    c2w = trajectory_poses(trajectory, num_frames, fps, seed=seed, speed=speed)
    images = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    depth = np.empty((num_frames, height, width), dtype=np.float32)
    for i in range(num_frames):
        images[i], depth[i] = render_view(c2w[i], K, height, width, seed=seed)
    base_to_camera = base_to_camera_transform()
    base_c2w = c2w @ invert_rigid(base_to_camera)
    bounds = np.stack([ROOM_MIN, ROOM_MAX]).astype(np.float64)
    return SyntheticSequence(
        images=images, depth=depth, K=K, c2w=c2w, stamps_ns=frame_stamps_ns(num_frames, fps),
        scene_extent=float(np.linalg.norm(ROOM_MAX - ROOM_MIN)), scene_bounds=bounds,
        base_to_camera=base_to_camera, base_c2w=base_c2w, fps=float(fps), trajectory=trajectory,
        seed=int(seed),
    )


def _check_seed(seed) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_size(height, width) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
