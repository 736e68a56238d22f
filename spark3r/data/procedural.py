"""Procedural indoor scenes for training and evaluating reconstruction networks.

Every scene is a pure function of one integer seed: a room of random size (optionally L-shaped
by a corner block, with pillars), furnished with randomly placed boxes (any yaw), spheres,
vertical cylinders and thin objects (shelves, panels, poles), each with its own solid texture
(checker / stripes / value noise, random palette) under randomised lighting (a directional
light, an ambient term and a point light). The camera has a random horizontal field of view in
[45, 100] degrees and one of several motions -- orbit, forward walk, random walk with rotation,
near-pure rotation -- at a random speed from slow to fast. Rendering is numpy ray casting, so a
sequence costs a few tens of milliseconds per small frame and can be generated next to training.

Conventions are those of :mod:`spark3r.data.synthetic` (z-up world, OpenCV camera-to-world
poses, z-depth, principal point at the image centre), and :func:`render_procedural` returns the
same :class:`~spark3r.data.synthetic.SyntheticSequence` container.

Seed split: seeds below :data:`HELDOUT_SEED_LIMIT` are held out (evaluation only); training draws
its scene seeds from ``[TRAIN_SEED_START, 2**31)`` (:func:`is_heldout_seed`, :func:`train_seed`).
Shading is view independent (Lambertian, no shadows), so a surface point has the same colour in
every view.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spark3r.geometry import invert_rigid
from spark3r.data.synthetic import (
    SyntheticSequence,
    _check_seed,
    _check_size,
    _hsv_to_rgb,
    _value_noise,
    base_to_camera_transform,
    frame_stamps_ns,
    intrinsics_from_fov,
    pixel_rays,
)

HELDOUT_SEED_LIMIT = 100_000  # seeds [0, 100000) are held out
TRAIN_SEED_START = 1_000_000  # training scene seeds live in [1000000, 2**31)
MOTIONS = ("orbit", "forward", "random_walk", "rotation")
FOV_RANGE_DEG = (45.0, 100.0)
FPS = 10.0
_MOTION_PROBS = (0.25, 0.3, 0.3, 0.15)
_WALL_MARGIN = 0.35  # camera centres stay this far from walls (m)
_OBJECT_MARGIN = 0.3  # ... and this far from every object (m)

_BOX, _SPHERE, _CYLINDER = 0, 1, 2


def is_heldout_seed(seed: int) -> bool:
    """True for the seeds reserved for evaluation (training never draws them)."""
    return 0 <= int(seed) < HELDOUT_SEED_LIMIT


def train_seed(rng: np.random.Generator) -> int:
    """A training scene seed drawn from ``rng`` (never a held-out one)."""
    return int(rng.integers(TRAIN_SEED_START, 2**31 - 1))


@dataclass(frozen=True)
class Primitive:
    """A furniture primitive. Box: ``centre``, ``half`` extents in its own frame, ``yaw`` about z.
    Sphere: ``centre``, radius ``half[0]``. Cylinder: vertical axis through ``centre``, radius
    ``half[0]``, half-height ``half[2]``."""

    kind: int
    centre: np.ndarray
    half: np.ndarray
    yaw: float = 0.0

    def contains(self, points: np.ndarray, margin: float) -> np.ndarray:
        """Which of ``points`` [N,3] lie inside the primitive grown by ``margin``."""
        d = points - self.centre
        if self.kind == _SPHERE:
            return np.linalg.norm(d, axis=-1) < self.half[0] + margin
        if self.kind == _CYLINDER:
            return (np.hypot(d[:, 0], d[:, 1]) < self.half[0] + margin) & (np.abs(d[:, 2]) < self.half[2] + margin)
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        local = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=-1)
        return np.all(np.abs(local) < self.half + margin, axis=-1)


@dataclass(frozen=True)
class Scene:
    """Geometry, materials and lights of one procedural room."""

    room_min: np.ndarray  # [3]
    room_max: np.ndarray  # [3]
    primitives: tuple[Primitive, ...]
    colour_a: np.ndarray  # [S,3] per surface (6 room faces, then primitives), linear RGB
    colour_b: np.ndarray  # [S,3]
    pattern_cell: np.ndarray  # [S] checker / stripe period (m)
    pattern_kind: np.ndarray  # [S] 0 checker, 1 stripes, 2 plain
    stripe_axis: np.ndarray  # [S] world axis of the stripes
    noise_amp: np.ndarray  # [S] amplitude of the value-noise detail
    light_dir: np.ndarray  # [3] unit, towards the light
    ambient: float
    directional: float
    point_light: np.ndarray  # [3]
    point_strength: float
    point_falloff: float  # metres
    exposure: float
    seed: int

    @property
    def num_surfaces(self) -> int:
        return 6 + len(self.primitives)


# ---------------------------------------------------------------------------------------------
# Scene sampling


def _sample_room(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = np.array([rng.uniform(3.0, 10.0), rng.uniform(2.6, 8.0), rng.uniform(2.2, 3.6)])
    lo = np.array([-size[0] / 2, -size[1] / 2, 0.0])
    return lo, lo + size


def _structural(rng, lo, hi) -> list[Primitive]:
    """Room-shape elements: a corner block (L-shaped room) and pillars, floor to ceiling."""
    out = []
    height = hi[2] - lo[2]
    if rng.uniform() < 0.35:
        size = np.array([rng.uniform(0.25, 0.45) * (hi[0] - lo[0]), rng.uniform(0.25, 0.45) * (hi[1] - lo[1])])
        corner = np.array([rng.choice([lo[0], hi[0]]), rng.choice([lo[1], hi[1]])])
        centre_xy = corner - np.sign(corner) * size / 2
        out.append(Primitive(_BOX, np.array([*centre_xy, height / 2]), np.array([*size / 2, height / 2 + 0.01])))
    for _ in range(rng.integers(0, 3)):
        xy = rng.uniform(lo[:2] + 0.8, hi[:2] - 0.8)
        if rng.uniform() < 0.5:
            r = rng.uniform(0.12, 0.3)
            out.append(Primitive(_CYLINDER, np.array([*xy, height / 2]), np.array([r, r, height / 2 + 0.01])))
        else:
            h = rng.uniform(0.12, 0.3, 2)
            out.append(Primitive(_BOX, np.array([*xy, height / 2]), np.array([*h, height / 2 + 0.01]), rng.uniform(0, np.pi)))
    return out


def _furniture(rng, lo, hi) -> Primitive:
    kind = rng.choice(["box", "sphere", "cylinder", "slab", "pole", "panel"], p=[0.3, 0.15, 0.15, 0.15, 0.1, 0.15])
    height = hi[2] - lo[2]
    xy = rng.uniform(lo[:2] + 0.2, hi[:2] - 0.2)
    if kind == "box":
        half = np.array([rng.uniform(0.1, 0.8), rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.9)])
        z = half[2] if rng.uniform() < 0.8 else rng.uniform(half[2] + 0.3, height - half[2] - 0.1)
        return Primitive(_BOX, np.array([*xy, z]), half, rng.uniform(0, np.pi))
    if kind == "sphere":
        r = rng.uniform(0.1, 0.6)
        z = r if rng.uniform() < 0.6 else rng.uniform(r + 0.2, max(r + 0.3, height - r - 0.1))
        return Primitive(_SPHERE, np.array([*xy, z]), np.array([r, r, r]))
    if kind == "cylinder":
        r, hh = rng.uniform(0.1, 0.5), rng.uniform(0.15, 0.9)
        return Primitive(_CYLINDER, np.array([*xy, hh]), np.array([r, r, hh]))
    if kind == "slab":  # table top / shelf board: thin horizontal
        half = np.array([rng.uniform(0.3, 1.0), rng.uniform(0.2, 0.6), rng.uniform(0.01, 0.03)])
        return Primitive(_BOX, np.array([*xy, rng.uniform(0.4, min(2.0, height - 0.3))]), half, rng.uniform(0, np.pi))
    if kind == "pole":  # thin vertical cylinder
        r, hh = rng.uniform(0.015, 0.05), rng.uniform(0.5, height / 2)
        return Primitive(_CYLINDER, np.array([*xy, hh]), np.array([r, r, hh]))
    # panel: thin vertical board, often against a wall (pictures, doors)
    half = np.array([rng.uniform(0.2, 0.9), rng.uniform(0.005, 0.025), rng.uniform(0.2, 0.9)])
    axis = rng.integers(0, 2)
    side = rng.choice([0, 1])
    xy = xy.copy()
    xy[axis] = (lo if side == 0 else hi)[axis] + (half[1] + 0.002) * (1 if side == 0 else -1)
    yaw = np.pi / 2 if axis == 0 else 0.0
    z = rng.uniform(half[2] + 0.05, max(half[2] + 0.1, height - half[2] - 0.05))
    return Primitive(_BOX, np.array([*xy, z]), half, yaw)


def _materials(rng, n_surfaces: int):
    base_hue = rng.uniform()
    spread = rng.uniform(0.05, 0.5)  # narrow (monochrome-ish) to broad palettes
    hues = (base_hue + rng.uniform(-spread, spread, n_surfaces)) % 1.0
    sat = rng.uniform(0.05, 0.85, n_surfaces)
    val = rng.uniform(0.35, 0.95, n_surfaces)
    a = _hsv_to_rgb(hues, sat, val)
    b = _hsv_to_rgb((hues + rng.uniform(0.05, 0.5, n_surfaces)) % 1.0, sat * rng.uniform(0.3, 1.0, n_surfaces),
                    val * rng.uniform(0.3, 0.8, n_surfaces))
    cell = np.exp(rng.uniform(np.log(0.08), np.log(1.2), n_surfaces))
    kind = rng.choice(3, n_surfaces, p=[0.45, 0.3, 0.25])
    axis = rng.integers(0, 3, n_surfaces)
    noise = rng.uniform(0.1, 0.5, n_surfaces)
    return a, b, cell, kind, axis, noise


def sample_scene(seed: int) -> Scene:
    """The room, furniture, materials and lights of scene ``seed`` (no camera)."""
    _check_seed(seed)
    rng = np.random.default_rng([int(seed), 1])
    lo, hi = _sample_room(rng)
    prims = _structural(rng, lo, hi) + [_furniture(rng, lo, hi) for _ in range(rng.integers(3, 16))]
    elevation = np.radians(rng.uniform(25, 90))
    azimuth = rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    point = rng.uniform(lo + 0.3, hi - 0.3)
    mats = _materials(rng, 6 + len(prims))
    return Scene(
        room_min=lo, room_max=hi, primitives=tuple(prims), colour_a=mats[0], colour_b=mats[1],
        pattern_cell=mats[2], pattern_kind=mats[3], stripe_axis=mats[4], noise_amp=mats[5], light_dir=light,
        ambient=float(rng.uniform(0.2, 0.55)), directional=float(rng.uniform(0.2, 0.6)), point_light=point,
        point_strength=float(rng.uniform(0.0, 0.8)), point_falloff=float(rng.uniform(1.0, 4.0)),
        exposure=float(rng.uniform(0.8, 1.3)), seed=int(seed),
    )


def place_furniture(scene: Scene, eyes: np.ndarray) -> Scene:
    """``scene`` without the primitives that come closer than the object margin to any camera
    centre in ``eyes`` [N,3] (the camera path is kept free, as a person walking would)."""
    keep = [i for i, p in enumerate(scene.primitives) if not p.contains(eyes, _OBJECT_MARGIN).any()]
    surf = np.array([0, 1, 2, 3, 4, 5] + [6 + i for i in keep])
    return Scene(
        room_min=scene.room_min, room_max=scene.room_max, primitives=tuple(scene.primitives[i] for i in keep),
        colour_a=scene.colour_a[surf], colour_b=scene.colour_b[surf], pattern_cell=scene.pattern_cell[surf],
        pattern_kind=scene.pattern_kind[surf], stripe_axis=scene.stripe_axis[surf], noise_amp=scene.noise_amp[surf],
        light_dir=scene.light_dir, ambient=scene.ambient, directional=scene.directional,
        point_light=scene.point_light, point_strength=scene.point_strength, point_falloff=scene.point_falloff,
        exposure=scene.exposure, seed=scene.seed,
    )


# ---------------------------------------------------------------------------------------------
# Camera motion


def camera_pose(eye: np.ndarray, yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """OpenCV camera-to-world pose at ``eye`` looking along heading ``yaw`` (about world z, 0 =
    +x), tilted up by ``pitch`` and rolled by ``roll`` about the viewing direction (radians)."""
    cp = np.cos(pitch)
    forward = np.array([cp * np.cos(yaw), cp * np.sin(yaw), np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])  # horizontal, to the right of the heading
    down = np.cross(forward, right)
    cr, sr = np.cos(roll), np.sin(roll)
    right, down = cr * right + sr * down, -sr * right + cr * down
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose


def _smooth_noise(rng, n: int, components: int = 3) -> np.ndarray:
    """A smooth zero-mean signal of ``n`` samples with unit-ish amplitude (sum of sinusoids)."""
    t = np.arange(n, dtype=np.float64)
    freqs = rng.uniform(0.01, 0.15, components)
    phases = rng.uniform(0, 2 * np.pi, components)
    amps = rng.uniform(0.3, 1.0, components)
    return (amps[:, None] * np.sin(freqs[:, None] * t + phases[:, None])).sum(0) / amps.sum()


def _reflect_into(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fold coordinates into [lo, hi] by mirroring at the bounds (a path bouncing off walls)."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def sample_motion(seed: int, num_frames: int, room_min: np.ndarray, room_max: np.ndarray,
                  motion: str | None = None) -> tuple[str, np.ndarray]:
    """Camera-to-world poses [N,4,4] of a random motion inside the room (kind, poses)."""
    rng = np.random.default_rng([int(seed), 2])
    kind = motion if motion is not None else str(rng.choice(MOTIONS, p=_MOTION_PROBS))
    if kind not in MOTIONS:
        raise ValueError(f"unknown motion {kind!r}; expected one of {MOTIONS}")
    lo = room_min + _WALL_MARGIN
    hi = np.array([room_max[0], room_max[1], min(room_max[2], 2.2)]) - _WALL_MARGIN
    lo = np.array([lo[0], lo[1], max(lo[2], 0.4)])
    n = num_frames
    step = float(np.exp(rng.uniform(np.log(0.02), np.log(0.3))))  # metres per frame: slow .. fast
    turn = float(np.radians(np.exp(rng.uniform(np.log(0.3), np.log(8.0)))))  # rad per frame
    i = np.arange(n, dtype=np.float64)
    # Distance / angle travelled: the rate varies smoothly (accelerating, braking), so a camera's
    # next pose is not simply its last motion repeated.
    progress = np.concatenate([[0.0], np.cumsum(1.0 + 0.6 * _smooth_noise(rng, n))[:-1]])
    poses = np.empty((n, 4, 4))
    if kind == "orbit":
        target = rng.uniform(lo, hi)
        target[2] = rng.uniform(0.3, 1.5)
        r_max = max(0.5, min(np.min(target[:2] - lo[:2]), np.min(hi[:2] - target[:2])))
        radius = rng.uniform(0.5, max(0.6, r_max))
        angle = rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * step / radius * progress
        height = rng.uniform(lo[2], hi[2]) + 0.1 * _smooth_noise(rng, n)
        eyes = np.stack([target[0] + radius * np.cos(angle), target[1] + radius * np.sin(angle), height], -1)
        eyes = np.clip(eyes, lo, hi)
        aim = target + 0.3 * np.stack([_smooth_noise(rng, n) for _ in range(3)], -1)
        roll = np.radians(3) * _smooth_noise(rng, n)
        for k in range(n):
            d = aim[k] - eyes[k]
            poses[k] = camera_pose(eyes[k], np.arctan2(d[1], d[0]), np.arctan2(d[2], np.hypot(d[0], d[1])), roll[k])
    elif kind == "forward":
        yaw = rng.uniform(0, 2 * np.pi) + np.cumsum(np.radians(rng.uniform(-1.5, 1.5)) + 0.3 * turn * _smooth_noise(rng, n))
        heading = np.stack([np.cos(yaw), np.sin(yaw), np.zeros(n)], -1)
        start = rng.uniform(lo, hi)
        start[2] = rng.uniform(max(lo[2], 1.0), max(lo[2], min(hi[2], 1.8)) + 1e-6)
        rate = np.diff(progress, append=progress[-1] + 1.0)[:, None]
        eyes = _reflect_into(start + np.cumsum(step * rate * heading, 0) - step * rate[0] * heading[0], lo, hi)
        eyes[:, 2] += 0.02 * np.sin(2.5 * i)  # head bob
        eyes = np.clip(eyes, lo, hi)
        # Look where the path goes (finite differences survive the reflections).
        d = np.gradient(eyes, axis=0) if n > 1 else heading
        look_yaw = np.arctan2(d[:, 1], d[:, 0]) + np.radians(10) * _smooth_noise(rng, n)
        pitch = np.radians(rng.uniform(-15, 5)) + np.radians(4) * _smooth_noise(rng, n)
        roll = np.radians(2) * _smooth_noise(rng, n)
        for k in range(n):
            poses[k] = camera_pose(eyes[k], look_yaw[k], pitch[k], roll[k])
    elif kind == "random_walk":
        dirs = np.stack([_smooth_noise(rng, n) for _ in range(3)], -1) + rng.normal(0, 0.5, 3)
        dirs[:, 2] *= 0.3
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True) + 1e-9
        eyes = _reflect_into(rng.uniform(lo, hi) + np.cumsum(step * dirs, 0), lo, hi)
        yaw = rng.uniform(0, 2 * np.pi) + turn * np.cumsum(_smooth_noise(rng, n) + rng.uniform(-0.5, 0.5))
        pitch = np.clip(np.radians(rng.uniform(-30, 15)) + np.radians(25) * _smooth_noise(rng, n), np.radians(-50), np.radians(35))
        roll = np.radians(rng.uniform(0, 20)) * _smooth_noise(rng, n)
        for k in range(n):
            poses[k] = camera_pose(eyes[k], yaw[k], pitch[k], roll[k])
    else:  # near-pure rotation: a tripod pan with a few millimetres of wobble
        eye = rng.uniform(lo, hi)
        eyes = eye + 0.005 * np.stack([_smooth_noise(rng, n) for _ in range(3)], -1)
        yaw = rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * turn * 1.5 * progress
        pitch = np.radians(rng.uniform(-20, 10)) + np.radians(8) * _smooth_noise(rng, n)
        for k in range(n):
            poses[k] = camera_pose(eyes[k], yaw[k], pitch[k])
    return kind, poses


# ---------------------------------------------------------------------------------------------
# Ray casting (rays from one centre ``eye``; see spark3r.data.synthetic for the slab conventions)


def _hit_room(eye, inv_dirs, lo, hi):
    t_axes = np.maximum((lo - eye) * inv_dirs, (hi - eye) * inv_dirs)
    axis = np.argmin(t_axes, axis=-1)
    return np.take_along_axis(t_axes, axis[:, None], axis=-1)[:, 0], axis


def _hit_box(eye, dirs, prim: Primitive):
    """Entry distance (inf when missed) and world-frame outward normal of a yawed box."""
    c, s = np.cos(prim.yaw), np.sin(prim.yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # box frame -> world
    o = (eye - prim.centre) @ rot
    d = dirs @ rot
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (-prim.half - o) * inv
        t2 = (prim.half - o) * inv
    near_axes = np.minimum(t1, t2)
    axis = np.argmax(near_axes, axis=-1)
    rows = np.arange(len(dirs))
    t_near = near_axes[rows, axis]
    t_far = np.maximum(t1, t2).min(axis=-1)
    hit = (t_near <= t_far) & (t_near > 1e-6)
    normal_local = np.zeros_like(d)
    normal_local[rows, axis] = -np.sign(d[rows, axis])
    return np.where(hit, t_near, np.inf), normal_local @ rot.T


def _hit_sphere(eye, dirs, prim: Primitive):
    oc = eye - prim.centre
    a = np.einsum("ij,ij->i", dirs, dirs)
    b = dirs @ oc
    disc = b * b - a * (oc @ oc - prim.half[0] ** 2)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    with np.errstate(invalid="ignore"):
        normal = (eye + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs - prim.centre) / prim.half[0]
    return t, normal


def _hit_cylinder(eye, dirs, prim: Primitive):
    r, hh = prim.half[0], prim.half[2]
    ox, oy, oz = eye - prim.centre
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    disc = b * b - a * (ox * ox + oy * oy - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        z_side = oz + t_side * dz
        t_side = np.where((disc >= 0) & (a > 1e-12) & (t_side > 1e-6) & (np.abs(z_side) <= hh), t_side, np.inf)
        t_cap = np.full(len(dirs), np.inf)
        for zc in (-hh, hh):
            t = (zc - oz) / dz
            x, y = ox + t * dx, oy + t * dy
            ok = (t > 1e-6) & (x * x + y * y <= r * r)
            t_cap = np.where(ok & (t < t_cap), t, t_cap)
    use_cap = t_cap < t_side
    t = np.minimum(t_cap, t_side)
    tt = np.where(np.isfinite(t), t, 0.0)
    normal = np.stack([(ox + tt * dx) / r, (oy + tt * dy) / r, np.zeros_like(tt)], -1)
    normal[use_cap] = np.stack([np.zeros(use_cap.sum()), np.zeros(use_cap.sum()), -np.sign(dz[use_cap])], -1)
    return t, normal


_HITTERS = {_BOX: _hit_box, _SPHERE: _hit_sphere, _CYLINDER: _hit_cylinder}


def cast_rays(scene: Scene, eye: np.ndarray, dirs: np.ndarray):
    """Nearest hit of every ray ``eye + t * dirs``: t (units of |dir|), surface id, unit normal
    facing the ray, and the normal's axis for room faces (-1 otherwise)."""
    with np.errstate(divide="ignore"):
        inv = 1.0 / dirs
    t, axis = _hit_room(eye, inv, scene.room_min, scene.room_max)
    rows = np.arange(len(dirs))
    surface = 2 * axis + (dirs[rows, axis] > 0)
    normal = np.zeros_like(dirs)
    normal[rows, axis] = -np.sign(dirs[rows, axis])
    for k, prim in enumerate(scene.primitives):
        t_k, n_k = _HITTERS[prim.kind](eye, dirs, prim)
        closer = np.flatnonzero(t_k < t)
        if closer.size:
            t[closer] = t_k[closer]
            surface[closer] = 6 + k
            normal[closer] = n_k[closer]
            axis[closer] = -1
    return t, surface, normal, axis


def _shade(scene: Scene, points, surface, normal, axis, footprint) -> np.ndarray:
    """Linear RGB in [0, 1] of every hit point: textured albedo times Lambertian lighting."""
    cell = scene.pattern_cell[surface]
    kind = scene.pattern_kind[surface]
    cells = np.floor(points / cell[:, None] + 0.5)
    room_face = axis >= 0  # room faces sit on checker boundaries along their normal
    cells[np.flatnonzero(room_face), axis[room_face]] = 0.0
    checker = (cells.astype(np.int64).sum(-1) & 1).astype(np.float64)
    stripe = (cells[np.arange(len(points)), scene.stripe_axis[surface]].astype(np.int64) & 1).astype(np.float64)
    pattern = np.where(kind == 0, checker, np.where(kind == 1, stripe, 0.5))
    # Fade the pattern edges to grey once a cell spans only a few pixels (no aliasing).
    weight = np.clip(cell / (2.0 * footprint) - 1.0, 0.0, 1.0)
    mix = 0.5 + (pattern - 0.5) * weight
    colour = scene.colour_a[surface] * mix[:, None] + scene.colour_b[surface] * (1.0 - mix[:, None])
    detail = np.zeros(len(points))
    for octave, size in enumerate((0.6, 0.2, 0.07)):
        w = np.clip(size / (2.0 * footprint) - 1.0, 0.0, 1.0)
        active = np.flatnonzero(w > 0)
        if active.size:
            noise = _value_noise(points[active], size, (scene.seed * 7 + octave,))[:, 0]
            detail[active] += w[active] * (noise - 0.5)
    colour = colour * (1.0 + 1.6 * scene.noise_amp[surface] * detail)[:, None]
    lambert = np.clip(normal @ scene.light_dir, 0.0, 1.0)
    to_light = scene.point_light - points
    dist = np.linalg.norm(to_light, axis=-1) + 1e-9
    point = scene.point_strength * np.clip(np.einsum("ij,ij->i", normal, to_light) / dist, 0.0, 1.0) / (
        1.0 + (dist / scene.point_falloff) ** 2)
    light = scene.exposure * (scene.ambient + scene.directional * lambert + point)
    return np.clip(colour * light[:, None], 0.0, 1.0)


def render_scene_view(scene: Scene, c2w: np.ndarray, K: np.ndarray, height: int, width: int):
    """One view: (uint8 [H,W,3] RGB, float32 [H,W] z-depth)."""
    eye = c2w[:3, 3]
    rays = pixel_rays(K, height, width).reshape(-1, 3)  # z = 1, so t is z-depth
    dirs = rays @ c2w[:3, :3].T
    t, surface, normal, axis = cast_rays(scene, eye, dirs)
    points = eye + t[:, None] * dirs
    ray_len = np.linalg.norm(dirs, axis=-1)
    cos_incidence = np.abs(np.einsum("ij,ij->i", normal, dirs)) / ray_len
    footprint = t * ray_len / K[0, 0] / np.maximum(cos_incidence, 0.2)
    linear = _shade(scene, points, surface, normal, axis, footprint)
    rgb = np.round(np.power(linear, 1.0 / 2.2) * 255.0).astype(np.uint8).reshape(height, width, 3)
    return rgb, t.astype(np.float32).reshape(height, width)


def render_procedural(seed: int, num_frames: int, height: int, width: int, *, motion: str | None = None,
                      fov_deg: float | None = None, fps: float = FPS) -> SyntheticSequence:
    """Render ``num_frames`` views of procedural scene ``seed`` (see the module docstring).

    The scene, the motion kind and speed and the field of view are drawn from ``seed``;
    ``motion`` (one of :data:`MOTIONS`) and ``fov_deg`` override the draw. Motion is defined per
    frame; ``fps`` only sets the stamps. The same arguments always give identical bytes.
    """
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    _check_seed(seed)
    _check_size(height, width)
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    rng = np.random.default_rng([int(seed), 3])
    fov = float(rng.uniform(*FOV_RANGE_DEG)) if fov_deg is None else float(fov_deg)
    scene = sample_scene(seed)
    kind, c2w = sample_motion(seed, int(num_frames), scene.room_min, scene.room_max, motion)
    scene = place_furniture(scene, c2w[:, :3, 3])
    K = intrinsics_from_fov(height, width, fov)
    images = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    depth = np.empty((num_frames, height, width), dtype=np.float32)
    for i in range(num_frames):
        images[i], depth[i] = render_scene_view(scene, c2w[i], K, height, width)
    base_to_camera = base_to_camera_transform()
    return SyntheticSequence(
        images=images, depth=depth, K=K, c2w=c2w, stamps_ns=frame_stamps_ns(num_frames, fps),
        scene_extent=float(np.linalg.norm(scene.room_max - scene.room_min)),
        scene_bounds=np.stack([scene.room_min, scene.room_max]).astype(np.float64),
        base_to_camera=base_to_camera, base_c2w=c2w @ invert_rigid(base_to_camera), fps=float(fps), trajectory=kind,
        seed=int(seed),
    )
