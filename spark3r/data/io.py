"""Files for maps and trajectories: PLY point clouds, TUM trajectories, TUM RGB-D folders.

All writers are atomic: they write a temporary file (or folder) next to the target and
``os.replace`` it into place, so a reader never sees half a file and a crash leaves the previous
version intact.

Timestamps are integer nanoseconds everywhere; text files carry them as seconds with exactly
nine decimals produced from the integer (``1700000000.100000000``), so nothing drifts through a
float. Poses are 4x4 camera-to-world (or body-to-world) float64 matrices.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from decimal import Decimal, InvalidOperation, ROUND_HALF_EVEN
from pathlib import Path
from typing import IO, Iterator, NamedTuple

import numpy as np

from spark3r.geometry import RIGID_TOLERANCE, matrix_to_quat_xyzw, quat_xyzw_to_matrix, rigid_error

TUM_DEPTH_FACTOR = 5000.0  # TUM RGB-D depth PNGs: uint16 value = metres * 5000, 0 = no depth
_NS_PER_S = 10**9


# ---------------------------------------------------------------------------------------------
# Atomic writes


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it onto ``path``.

    ``mode`` is "wb" or "w" (text, UTF-8, "\\n" line endings). On an exception the temporary file
    is removed and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = temp_sibling(path)
    # os.open with 0o666 lets the umask decide permissions, like a plain open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with (os.fdopen(fd, "wb") if mode == "wb" else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a not-yet-existing staging path with the same name as ``path``; on success the
    caller-created directory there becomes ``path`` in one rename.

    The staging path lives in a hidden temporary directory beside ``path`` and carries the final
    name, so tools that name files after their directory (rosbag2 does) get the final names.
    An existing ``path`` is an error unless ``overwrite`` is true; then it is replaced only once
    the new content is complete.
    """
    path = Path(path)
    if not path.name or not path.parent.is_dir():
        raise FileNotFoundError(f"cannot create {path}: directory {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    staging = temp_sibling(path)
    staging.mkdir()
    try:
        target = staging / path.name
        yield target
        if not target.is_dir():
            raise RuntimeError(f"atomic_directory: nothing was written at {target}")
        if path.exists():
            old = staging / (path.name + ".old")
            os.replace(path, old)
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Timestamps


def format_stamp_ns(stamp_ns: int) -> str:
    """Integer nanoseconds -> seconds with exactly nine decimals, e.g. ``1700000000.100000000``."""
    stamp_ns = int(stamp_ns)
    if stamp_ns < 0:
        raise ValueError(f"timestamps must be non-negative nanoseconds, got {stamp_ns}")
    return f"{stamp_ns // _NS_PER_S}.{stamp_ns % _NS_PER_S:09d}"


def parse_stamp_s(text: str) -> int:
    """Decimal seconds (any number of decimals) -> integer nanoseconds, rounded half-even."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a timestamp in seconds: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"timestamps must be finite non-negative seconds, got {text!r}")
    return int((value * _NS_PER_S).to_integral_value(rounding=ROUND_HALF_EVEN))


def _check_stamps(stamps_ns, name: str = "stamps_ns") -> np.ndarray:
    stamps = np.asarray(stamps_ns)
    if stamps.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer nanoseconds, got shape {stamps.shape}")
    if stamps.size and not np.issubdtype(stamps.dtype, np.integer):
        raise TypeError(f"{name} must be integer nanoseconds (int64), got dtype {stamps.dtype}; "
                        "convert seconds with np.round(seconds * 1e9).astype(np.int64)")
    stamps = stamps.astype(np.int64)
    if np.any(stamps < 0):
        raise ValueError(f"{name} must be non-negative")
    return stamps


# ---------------------------------------------------------------------------------------------
# PLY


class PointCloud(NamedTuple):
    xyz: np.ndarray  # float32 [N,3]
    rgb: np.ndarray | None  # uint8 [N,3] or None


_PLY_SCALARS = {  # PLY scalar type names (both spellings) -> numpy kind and size
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_PLY_FORMATS = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": "ascii"}


def write_ply(path, xyz, rgb=None) -> None:
    """Write points (and optional colours) as a binary little-endian PLY.

    ``xyz``: real array [N,3] (stored as float32); ``rgb``: uint8 [N,3] or None. The header is the
    common ``x y z`` float / ``red green blue`` uchar layout that Open3D, PCL, CloudCompare and
    MeshLab read.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape [N, 3], got {xyz.shape}")
    if not (np.issubdtype(xyz.dtype, np.floating) or np.issubdtype(xyz.dtype, np.integer)):
        raise TypeError(f"xyz must be a real numeric array, got dtype {xyz.dtype}")
    xyz = xyz.astype(np.float32)
    bad = ~np.isfinite(xyz).all(axis=1)
    if np.any(bad):
        raise ValueError(f"xyz has {int(bad.sum())} points with NaN/inf coordinates; drop them before writing")
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape != xyz.shape:
            raise ValueError(f"rgb must have shape {xyz.shape} to match xyz, got {rgb.shape}")
        if rgb.dtype != np.uint8:
            raise TypeError(f"rgb must be uint8 0..255, got dtype {rgb.dtype} (scale and convert floats first)")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    records = np.empty(len(xyz), dtype=fields)
    records["x"], records["y"], records["z"] = xyz.T
    if rgb is not None:
        records["red"], records["green"], records["blue"] = rgb.T
    props = [f"property float {n}" for n in "xyz"]
    if rgb is not None:
        props += [f"property uchar {n}" for n in ("red", "green", "blue")]
    header = "\n".join(["ply", "format binary_little_endian 1.0", "comment written by spark3r",
                        f"element vertex {len(xyz)}", *props, "end_header"]) + "\n"
    with atomic_write(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(records.tobytes())


def _parse_ply_header(fh, path) -> tuple[str, list[tuple[str, int, list[tuple[str, str | None, str]]]]]:
    """Return (byte order or 'ascii', [(element name, count, [(prop, list count type|None, type)])])."""
    if fh.readline().strip() != b"ply":
        raise ValueError(f"{path} is not a PLY file (missing 'ply' magic line)")
    fmt, elements = None, []
    while True:
        line = fh.readline()
        if not line:
            raise ValueError(f"{path}: PLY header has no 'end_header' line")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            if len(words) < 2 or words[1] not in _PLY_FORMATS:
                raise ValueError(f"{path}: unsupported PLY format line {line!r}")
            fmt = _PLY_FORMATS[words[1]]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise ValueError(f"{path}: PLY property before any element")
            if words[1] == "list":
                elements[-1][2].append((words[4], words[2], words[3]))
            else:
                if words[1] not in _PLY_SCALARS:
                    raise ValueError(f"{path}: unknown PLY property type {words[1]!r}")
                elements[-1][2].append((words[2], None, words[1]))
        else:
            raise ValueError(f"{path}: unexpected PLY header line {line!r}")
    if fmt is None:
        raise ValueError(f"{path}: PLY header has no format line")
    return fmt, elements


def read_ply(path) -> PointCloud:
    """Read the vertex positions (float32 [N,3]) and colours (uint8 [N,3] or None) of a PLY.

    Reads binary (either byte order) and ASCII files. Elements after ``vertex`` (faces) are
    ignored; elements before it must have fixed-size records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PLY file {path} does not exist")
    with open(path, "rb") as fh:
        fmt, elements = _parse_ply_header(fh, path)
        names = [e[0] for e in elements]
        if "vertex" not in names:
            raise ValueError(f"{path}: PLY has no 'vertex' element")
        data = None
        for name, count, props in elements:
            if any(p[1] is not None for p in props) and name != "vertex":
                if names.index(name) < names.index("vertex"):
                    raise ValueError(f"{path}: list element {name!r} before 'vertex' is not supported")
            if fmt == "ascii":
                rows = [fh.readline() for _ in range(count)]
                if name == "vertex":
                    data = _ascii_records(rows, props, path)
                    break
                continue
            if any(p[1] is not None for p in props):
                raise ValueError(f"{path}: list properties in the 'vertex' element are not supported")
            dtype = np.dtype([(p[0], fmt + _PLY_SCALARS[p[2]]) for p in props])
            raw = fh.read(dtype.itemsize * count)
            if len(raw) != dtype.itemsize * count:
                raise ValueError(f"{path}: PLY data is truncated ({len(raw)} of {dtype.itemsize * count} bytes "
                                 f"for element {name!r})")
            if name == "vertex":
                data = np.frombuffer(raw, dtype=dtype)
                break
    fields = data.dtype.names
    missing = [c for c in "xyz" if c not in fields]
    if missing:
        raise ValueError(f"{path}: PLY vertex element lacks coordinates {missing}")
    xyz = np.stack([data[c] for c in "xyz"], axis=1).astype(np.float32)
    rgb = None
    colour_names = next((n for n in (("red", "green", "blue"), ("r", "g", "b")) if all(c in fields for c in n)), None)
    if colour_names:
        cols = np.stack([data[c] for c in colour_names], axis=1)
        if np.issubdtype(cols.dtype, np.floating):  # some writers store 0..1 floats
            cols = np.clip(np.round(cols * 255.0), 0, 255)
        elif cols.dtype != np.uint8:
            raise ValueError(f"{path}: PLY colour properties of type {cols.dtype} are not supported (expected uchar)")
        rgb = cols.astype(np.uint8)
    return PointCloud(xyz, rgb)


def _ascii_records(rows, props, path) -> np.ndarray:
    dtype = np.dtype([(p[0], _PLY_SCALARS[p[2]]) for p in props])
    if any(p[1] is not None for p in props):
        raise ValueError(f"{path}: list properties in the 'vertex' element are not supported")
    out = np.empty(len(rows), dtype=dtype)
    for i, row in enumerate(rows):
        values = row.split()
        if len(values) != len(props):
            raise ValueError(f"{path}: PLY vertex {i} has {len(values)} values, expected {len(props)}")
        out[i] = tuple(float(v) if dtype[k].kind == "f" else int(v) for k, v in enumerate(values))
    return out


# ---------------------------------------------------------------------------------------------
# TUM trajectories


def _check_poses(poses, n: int | None = None, name: str = "c2w") -> np.ndarray:
    poses = np.asarray(poses)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"{name} must have shape [N, 4, 4], got {poses.shape}")
    if n is not None and len(poses) != n:
        raise ValueError(f"{name} has {len(poses)} poses but there are {n} timestamps")
    poses = poses.astype(np.float64)
    for i, pose in enumerate(poses):
        err = rigid_error(pose)
        if err > RIGID_TOLERANCE:
            raise ValueError(f"{name}[{i}] is not a rigid transform (deviation {err:.3g}); "
                             "TUM files store rotation + translation only")
    return poses


def write_tum_trajectory(path, stamps_ns, c2w) -> None:
    """Write ``timestamp tx ty tz qx qy qz qw`` lines (TUM RGB-D / evo format).

    Stamps are written with nine decimals straight from the integers; translations and
    quaternions with the shortest text that reads back to the same float64.
    """
    stamps = _check_stamps(stamps_ns)
    poses = _check_poses(c2w, len(stamps))
    quats = matrix_to_quat_xyzw(poses[:, :3, :3]) if len(poses) else np.zeros((0, 4))
    lines = ["# timestamp tx ty tz qx qy qz qw"]
    for stamp, pose, quat in zip(stamps, poses, quats):
        numbers = " ".join(repr(float(v)) for v in (*pose[:3, 3], *quat))
        lines.append(f"{format_stamp_ns(stamp)} {numbers}")
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def read_tum_trajectory(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory: (int64 stamps_ns [N], float64 poses [N,4,4]). '#' lines are comments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {path} does not exist")
    stamps, poses = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            text = line.split("#", 1)[0].replace(",", " ").strip()
            if not text:
                continue
            words = text.split()
            if len(words) != 8:
                raise ValueError(f"{path}:{lineno}: expected 8 values 'timestamp tx ty tz qx qy qz qw', got {len(words)}")
            try:
                stamp = parse_stamp_s(words[0])
                values = [float(w) for w in words[1:]]
                pose = np.eye(4)
                pose[:3, :3] = quat_xyzw_to_matrix(values[3:])
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            pose[:3, 3] = values[:3]
            if not np.all(np.isfinite(pose)):
                raise ValueError(f"{path}:{lineno}: non-finite translation")
            stamps.append(stamp)
            poses.append(pose)
    return np.array(stamps, dtype=np.int64), np.array(poses, dtype=np.float64).reshape(-1, 4, 4)


# ---------------------------------------------------------------------------------------------
# TUM RGB-D folders


def _encode_png(image: np.ndarray) -> bytes:
    import cv2  # local: only the folder writer needs OpenCV

    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {image.shape} and dtype {image.dtype}")
    return buf.tobytes()


def depth_to_tum_png(depth_m: np.ndarray) -> np.ndarray:
    """Metric depth -> uint16 TUM depth (x5000); invalid, non-positive or too far (>13.1 m) -> 0."""
    depth = np.asarray(depth_m, dtype=np.float64)
    scaled = np.round(np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0) * TUM_DEPTH_FACTOR)
    return np.where((scaled > 0) & (scaled <= np.iinfo(np.uint16).max), scaled, 0).astype(np.uint16)


def write_tum_rgbd_folder(seq, path, overwrite: bool = False) -> Path:
    """Write a sequence as a TUM RGB-D folder and return its path.

    Layout: ``rgb/<stamp>.png`` (8-bit RGB), ``depth/<stamp>.png`` (16-bit, metres x 5000,
    0 = no depth), ``rgb.txt`` / ``depth.txt`` (``timestamp filename``), ``groundtruth.txt``
    (TUM trajectory of ``seq.c2w``) and, beyond the TUM standard, ``intrinsics.txt``
    (``fx fy cx cy width height``) because synthetic sequences have no fixed calibration.
    ``seq`` needs ``images``, ``depth``, ``stamps_ns``, ``c2w`` and ``K`` as in SyntheticSequence.
    """
    images, depth = np.asarray(seq.images), np.asarray(seq.depth)
    stamps = _check_stamps(seq.stamps_ns, "seq.stamps_ns")
    n = len(stamps)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        raise ValueError(f"seq.images must be uint8 [{n}, H, W, 3], got {images.dtype} {images.shape}")
    if depth.shape != images.shape[:3]:
        raise ValueError(f"seq.depth must have shape {images.shape[:3]}, got {depth.shape}")
    K = np.asarray(seq.K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"seq.K must be [3, 3], got {K.shape}")
    poses = _check_poses(seq.c2w, n, "seq.c2w")
    names = [format_stamp_ns(s) for s in stamps]
    if len(set(names)) != n:
        raise ValueError("seq.stamps_ns has duplicate timestamps; TUM file names must be unique")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        (tmp / "rgb").mkdir()
        (tmp / "depth").mkdir()
        for name, image, d in zip(names, images, depth):
            (tmp / "rgb" / f"{name}.png").write_bytes(_encode_png(image))
            (tmp / "depth" / f"{name}.png").write_bytes(_encode_png(depth_to_tum_png(d)))
        for kind in ("rgb", "depth"):
            lines = [f"# {kind} images", "# timestamp filename"] + [f"{s} {kind}/{s}.png" for s in names]
            (tmp / f"{kind}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_tum_trajectory(tmp / "groundtruth.txt", stamps, poses)
        h, w = images.shape[1:3]
        focal_centre = " ".join(repr(float(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
        (tmp / "intrinsics.txt").write_text(
            f"# fx fy cx cy width height\n{focal_centre} {w} {h}\n", encoding="utf-8")
    return Path(path)


class TumRgbdFrame(NamedTuple):
    stamp_ns: int  # stamp of the colour image
    rgb: np.ndarray  # uint8 [H,W,3]
    depth: np.ndarray | None  # float32 [H,W] metres (0 = no depth), None without a close depth image


def read_file_list(path: Path) -> list[tuple[int, str]]:
    """``timestamp filename`` lines of rgb.txt / depth.txt ('#' comments allowed)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a TUM RGB-D folder?)")
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'timestamp filename', got {line!r}")
        try:
            entries.append((parse_stamp_s(words[0]), words[1]))
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
    return entries


def read_tum_intrinsics(path) -> tuple[np.ndarray, int, int] | None:
    """(K [3,3], width, height) from a folder's ``intrinsics.txt``, or None if it has none
    (real TUM sequences document their calibration elsewhere)."""
    file = Path(path) / "intrinsics.txt"
    if not file.is_file():
        return None
    rows = [l.split() for l in file.read_text(encoding="utf-8").splitlines() if l.strip() and not l.startswith("#")]
    if len(rows) != 1 or len(rows[0]) != 6:
        raise ValueError(f"{file}: expected one line 'fx fy cx cy width height'")
    fx, fy, cx, cy = (float(v) for v in rows[0][:4])
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), int(rows[0][4]), int(rows[0][5])


def iter_tum_rgbd_folder(path, with_depth: bool = True, max_depth_offset_ns: int = 20_000_000) -> Iterator[TumRgbdFrame]:
    """Frames of a TUM RGB-D folder in rgb.txt order. Each colour image gets the depth image
    with the nearest stamp if it is within ``max_depth_offset_ns`` (TUM's associate.py uses
    20 ms), else ``depth=None``. The file lists are checked on the call, images are read lazily."""
    import cv2

    root = Path(path)
    rgb_list = read_file_list(root / "rgb.txt")
    depth_list = read_file_list(root / "depth.txt") if with_depth else []
    depth_stamps = np.array([s for s, _ in depth_list], dtype=np.int64)

    def read(name: str, flags: int) -> np.ndarray:
        image = cv2.imread(str(root / name), flags)
        if image is None:
            raise ValueError(f"cannot read image {root / name}")
        return image

    def frames() -> Iterator[TumRgbdFrame]:
        for stamp, name in rgb_list:
            bgr = read(name, cv2.IMREAD_COLOR)
            depth = None
            if depth_stamps.size:
                k = int(np.argmin(np.abs(depth_stamps - stamp)))
                if abs(int(depth_stamps[k]) - stamp) <= max_depth_offset_ns:
                    raw = read(depth_list[k][1], cv2.IMREAD_UNCHANGED)
                    if raw.dtype != np.uint16 or raw.ndim != 2:
                        raise ValueError(f"{root / depth_list[k][1]}: expected a 16-bit single-channel depth PNG")
                    depth = (raw / TUM_DEPTH_FACTOR).astype(np.float32)
            yield TumRgbdFrame(stamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), depth)

    return frames()
