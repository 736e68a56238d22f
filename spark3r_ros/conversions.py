"""ROS 2 message <-> numpy conversions (own code: no cv_bridge / sensor_msgs_py here).

* Images: ``sensor_msgs/Image`` <-> numpy for rgb8, bgr8, rgba8, bgra8, mono8, mono16, 16UC1 and
  32FC1, honouring ``step`` padding and ``is_bigendian``; ``CompressedImage`` (jpeg/png).
* Clouds: unorganised ``PointCloud2`` with float32 x/y/z at offsets 0/4/8 and ``rgb`` packed as
  0x00RRGGBB at offset 12 (the PCL/RViz convention), built and read with whole-array numpy ops.
* TF: rigid 4x4 <-> ``TransformStamped`` / ``Pose``; a similarity's scale can never go into TF.
* ``CameraInfo`` -> :class:`CameraIntrinsics` with validation.
* Output records of :mod:`spark3r.mapping.outputs` (TF, Odometry, Path, clouds) -> messages.
* Time: ``builtin_interfaces/Time`` <-> int nanoseconds, exact; stamps never pass through a float.

Every function that takes a ``stamp`` accepts a ``builtin_interfaces/Time``, an ``int`` of
nanoseconds, an ``rclpy.time.Time`` or ``None`` (zero time). Floats are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseStamped, TransformStamped
from nav_msgs.msg import Odometry, Path
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField

from spark3r.data import cloud_layout, image_codec
from spark3r.geometry import RIGID_TOLERANCE, matrix_to_quat_xyzw, quat_xyzw_to_matrix, rigid_error

_NS_PER_S = 1_000_000_000
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# ---------------------------------------------------------------------------------------------
# Time


def time_to_ns(stamp: Time) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds (exact)."""
    if not (hasattr(stamp, "sec") and hasattr(stamp, "nanosec")):
        raise TypeError(f"expected builtin_interfaces/Time, got {type(stamp).__name__}")
    return int(stamp.sec) * _NS_PER_S + int(stamp.nanosec)


def ns_to_time(ns: int) -> Time:
    """Integer nanoseconds -> ``builtin_interfaces/Time`` (exact; nanosec always in [0, 1e9))."""
    if isinstance(ns, (bool, float)) or not isinstance(ns, (int, np.integer)):
        raise TypeError(f"nanoseconds must be an int (stamps never go through a float), got {type(ns).__name__}")
    sec, nanosec = divmod(int(ns), _NS_PER_S)
    if not _INT32_MIN <= sec <= _INT32_MAX:
        raise ValueError(f"{ns} ns is outside the range of builtin_interfaces/Time (int32 seconds)")
    return Time(sec=sec, nanosec=nanosec)


def as_time_msg(stamp) -> Time:
    """Normalise a stamp argument (Time, int ns, rclpy.time.Time or None) to a new Time msg."""
    if stamp is None:
        return Time()
    if isinstance(stamp, Time):
        return Time(sec=stamp.sec, nanosec=stamp.nanosec)
    if isinstance(stamp, (int, np.integer)) and not isinstance(stamp, bool):
        return ns_to_time(stamp)
    if hasattr(stamp, "nanoseconds") and hasattr(stamp, "to_msg"):  # rclpy.time.Time
        return ns_to_time(int(stamp.nanoseconds))
    raise TypeError(
        f"stamp must be builtin_interfaces/Time, int nanoseconds, rclpy.time.Time or None, got {type(stamp).__name__}"
    )


def _set_header(msg, stamp, frame_id: str) -> None:
    if not isinstance(frame_id, str):
        raise TypeError(f"frame_id must be a str, got {type(frame_id).__name__}")
    msg.header.stamp = as_time_msg(stamp)
    msg.header.frame_id = frame_id


# ---------------------------------------------------------------------------------------------
# Images: decoding and encoding live in spark3r.data.image_codec (shared with the bag reader);
# these wrappers only move fields between messages and that code.

IMAGE_ENCODINGS = image_codec.IMAGE_ENCODINGS  # encoding -> (element dtype, stored channels)


def image_to_numpy(msg: Image) -> np.ndarray:
    """``sensor_msgs/Image`` -> a new native-endian array: ``[H, W]`` (1 channel) or ``[H, W, C]``.

    Row padding (``step`` larger than the pixel bytes) is dropped, big-endian data is swapped.
    Sizes that do not agree with ``len(data)`` raise ValueError instead of being guessed.
    """
    if int(msg.step) == 0 and int(msg.height) > 0 and int(msg.width) > 0:
        raise ValueError(f"image step is 0 for a {msg.width}x{msg.height} {msg.encoding} image")
    return image_codec.decode_image(msg.data, msg.height, msg.width, msg.encoding, msg.step, bool(msg.is_bigendian))


def numpy_to_image(array, encoding: str, stamp=None, frame_id: str = "") -> Image:
    """numpy -> ``sensor_msgs/Image`` (little-endian, no row padding).

    The array dtype must match the encoding exactly (uint8 for 8-bit encodings, uint16 for
    mono16/16UC1, float32 for 32FC1): a silent cast would change the pixel values.
    """
    payload, height, width, step = image_codec.encode_image(array, encoding)
    msg = Image()
    _set_header(msg, stamp, frame_id)
    msg.height, msg.width, msg.step = height, width, step
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.data = payload
    return msg


def image_to_rgb(msg: Image) -> np.ndarray:
    """``sensor_msgs/Image`` -> ``uint8 [H, W, 3]`` RGB (what the mapper consumes).

    Colour encodings are reordered, alpha is dropped, mono8 is replicated to grey. Depth-like
    encodings (mono16, 16UC1, 32FC1) are refused: scaling them to 8 bits is a policy decision
    the caller must make explicitly (use :func:`image_to_numpy`).
    """
    return image_codec.decode_raw_image(msg.data, msg.height, msg.width, msg.encoding, msg.step)


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg or png) -> ``uint8 [H, W, 3]`` RGB."""
    return image_codec.decode_compressed_image(msg.data, msg.format)


def numpy_to_compressed(rgb, fmt: str = "jpeg", stamp=None, frame_id: str = "", jpeg_quality: int = 95) -> CompressedImage:
    """``uint8 [H, W, 3]`` RGB -> ``CompressedImage``; ``format`` follows image_transport
    (``"rgb8; jpeg compressed bgr8"``) so image_transport decoders restore rgb8."""
    data, fmt_field = image_codec.encode_compressed_image(rgb, fmt, jpeg_quality)
    msg = CompressedImage()
    _set_header(msg, stamp, frame_id)
    msg.format = fmt_field
    msg.data = data
    return msg


# ---------------------------------------------------------------------------------------------
# Point clouds

_POINTFIELD_DTYPES = {
    PointField.INT8: np.dtype(np.int8),
    PointField.UINT8: np.dtype(np.uint8),
    PointField.INT16: np.dtype(np.int16),
    PointField.UINT16: np.dtype(np.uint16),
    PointField.INT32: np.dtype(np.int32),
    PointField.UINT32: np.dtype(np.uint32),
    PointField.FLOAT32: np.dtype(np.float32),
    PointField.FLOAT64: np.dtype(np.float64),
}


def _point_fields(with_rgb: bool) -> list[PointField]:
    layout = cloud_layout.CLOUD_FIELDS if with_rgb else cloud_layout.XYZ_FIELDS
    return [PointField(name=name, offset=offset, datatype=PointField.FLOAT32, count=1) for name, offset in layout]


pack_rgb = cloud_layout.pack_rgb
unpack_rgb = cloud_layout.unpack_rgb


def cloud_to_msg(xyz, rgb, stamp, frame_id: str) -> PointCloud2:
    """``xyz float [N, 3]`` (+ ``rgb uint8 [N, 3]`` or None) -> unorganised ``PointCloud2``.

    Points with a non-finite coordinate are dropped (with their colours), so the message is
    ``is_dense``. Layout: x, y, z float32 at offsets 0/4/8, and with colour ``rgb`` at offset
    12, point_step 16 (12 without colour), little-endian, height 1.
    """
    if not frame_id:
        raise ValueError("a point cloud needs a frame_id (e.g. 'map')")
    payload, count, point_step = cloud_layout.cloud_payload(xyz, rgb)
    msg = PointCloud2()
    _set_header(msg, stamp, frame_id)
    msg.height, msg.width = 1, count
    msg.fields = _point_fields(rgb is not None)
    msg.is_bigendian = False
    msg.point_step = point_step
    msg.row_step = point_step * count
    msg.is_dense = True
    msg.data = payload.tobytes()
    return msg


def _field_column(records: np.ndarray, field: PointField, big_endian: bool, what: str) -> np.ndarray:
    """One scalar field of every point as a 1-D array (records: ``uint8 [N, point_step]``)."""
    if field.datatype not in _POINTFIELD_DTYPES:
        raise ValueError(f"field {field.name!r} has unknown PointField datatype {field.datatype}")
    dtype = _POINTFIELD_DTYPES[field.datatype].newbyteorder(">" if big_endian else "<")
    end = field.offset + dtype.itemsize
    if end > records.shape[1]:
        raise ValueError(f"field {field.name!r} ({what}) ends at byte {end}, beyond point_step {records.shape[1]}")
    return np.ascontiguousarray(records[:, field.offset:end]).view(dtype)[:, 0]


def msg_to_cloud(msg: PointCloud2) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``PointCloud2`` -> ``(xyz float32 [N, 3], rgb uint8 [N, 3] or None)``, finite points only.

    Reads any layout by field offsets, ``point_step`` and ``row_step`` (organised clouds too):
    x, y, z as FLOAT32 or FLOAT64, colour from an ``rgb`` or ``rgba`` field of 4 bytes
    (FLOAT32/UINT32/INT32 holding 0x00RRGGBB / 0xAARRGGBB; alpha is dropped).
    """
    fields = {f.name: f for f in msg.fields}
    missing = [name for name in "xyz" if name not in fields]
    if missing:
        raise ValueError(f"PointCloud2 lacks field(s) {missing}; has {sorted(fields)}")
    for name in "xyz":
        if fields[name].datatype not in (PointField.FLOAT32, PointField.FLOAT64):
            raise ValueError(f"field {name!r} must be FLOAT32 or FLOAT64, got PointField datatype {fields[name].datatype}")
    color = fields["rgb"] if "rgb" in fields else fields.get("rgba")
    if color is not None and color.datatype not in (PointField.FLOAT32, PointField.UINT32, PointField.INT32):
        raise ValueError(f"colour field {color.name!r} must be a 4-byte FLOAT32/UINT32/INT32, got datatype {color.datatype}")

    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    data = image_codec.payload_bytes(msg.data)
    if height * width and point_step <= 0:
        raise ValueError(f"point_step must be positive, got {point_step}")
    if row_step < width * point_step:
        raise ValueError(f"row_step {row_step} is smaller than width*point_step = {width}*{point_step}")
    if data.size != row_step * height:
        raise ValueError(f"cloud data has {data.size} bytes, expected row_step*height = {row_step}*{height} = {row_step * height}")
    if height * width == 0:
        return np.zeros((0, 3), np.float32), (None if color is None else np.zeros((0, 3), np.uint8))

    records = data.reshape(height, row_step)[:, : width * point_step].reshape(height * width, point_step)
    big_endian = bool(msg.is_bigendian)
    xyz = np.stack([_field_column(records, fields[n], big_endian, "coordinate") for n in "xyz"], axis=1).astype(np.float32)
    finite = np.isfinite(xyz).all(axis=1)
    rgb = None
    if color is not None:
        packed = _field_column(records, color, big_endian, "colour").view(np.uint32 if not big_endian else ">u4")
        rgb = unpack_rgb(packed[finite])
    return np.ascontiguousarray(xyz[finite]), rgb


# ---------------------------------------------------------------------------------------------
# Transforms

# tf2 refuses quaternions whose squared length is further than this from 1.
_QUATERNION_NORM_TOLERANCE = 0.01


def _checked_rigid(T, tol: float) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"transform must be a 4x4 matrix, got shape {T.shape}")
    err = rigid_error(T)
    if err > tol:
        raise ValueError(
            f"transform is not rigid (deviation {err:.3g} > tolerance {tol:g}); TF carries rotation and "
            "translation only, so apply any similarity scale to the points/trajectory instead"
        )
    return T


def matrix_to_transform(T, stamp, parent: str, child: str, tol: float = RIGID_TOLERANCE) -> TransformStamped:
    """Rigid ``T_parent_child`` (4x4, maps child-frame points into the parent frame) ->
    ``TransformStamped`` with ``header.frame_id=parent`` and ``child_frame_id=child``."""
    T = _checked_rigid(T, tol)
    for label, name in (("parent", parent), ("child", child)):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{label} frame id must be a non-empty str, got {name!r}")
    if parent == child:
        raise ValueError(f"parent and child frame are both {parent!r}")
    msg = TransformStamped()
    _set_header(msg, stamp, parent)
    msg.child_frame_id = child
    x, y, z, w = (float(v) for v in matrix_to_quat_xyzw(T[:3, :3]))
    msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = (float(v) for v in T[:3, 3])
    msg.transform.rotation.x, msg.transform.rotation.y, msg.transform.rotation.z, msg.transform.rotation.w = x, y, z, w
    return msg


def _quaternion_msg_to_matrix(q) -> np.ndarray:
    quat = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    if not np.all(np.isfinite(quat)) or abs(float(quat @ quat) - 1.0) > _QUATERNION_NORM_TOLERANCE:
        raise ValueError(f"quaternion {quat.tolist()} (x, y, z, w) is not normalised")
    return quat_xyzw_to_matrix(quat)


def _assemble(rotation_msg, translation) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = _quaternion_msg_to_matrix(rotation_msg)
    T[:3, 3] = [translation.x, translation.y, translation.z]
    if not np.all(np.isfinite(T)):
        raise ValueError("translation contains NaN or infinite values")
    return T


def transform_to_matrix(msg) -> np.ndarray:
    """``TransformStamped`` or ``Transform`` -> 4x4 float64 (``T_parent_child``)."""
    transform = getattr(msg, "transform", msg)
    if not (hasattr(transform, "translation") and hasattr(transform, "rotation")):
        raise TypeError(f"expected geometry_msgs/TransformStamped or Transform, got {type(msg).__name__}")
    return _assemble(transform.rotation, transform.translation)


def matrix_to_pose(T, tol: float = RIGID_TOLERANCE) -> Pose:
    """Rigid 4x4 -> ``geometry_msgs/Pose``."""
    T = _checked_rigid(T, tol)
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in T[:3, 3])
    x, y, z, w = (float(v) for v in matrix_to_quat_xyzw(T[:3, :3]))
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = x, y, z, w
    return pose


def pose_to_matrix(pose: Pose) -> np.ndarray:
    """``geometry_msgs/Pose`` -> 4x4 float64."""
    if not (hasattr(pose, "position") and hasattr(pose, "orientation")):
        raise TypeError(f"expected geometry_msgs/Pose, got {type(pose).__name__}")
    return _assemble(pose.orientation, pose.position)


# ---------------------------------------------------------------------------------------------
# Camera info

# Number of coefficients each standard distortion model uses (an empty D means "none").
_DISTORTION_COEFFS = {"plumb_bob": (5,), "rational_polynomial": (8,), "equidistant": (4,)}


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics from ``CameraInfo``: ``K`` in pixels of a ``width x height`` image."""

    K: np.ndarray  # float64 [3, 3]
    distortion_model: str
    D: np.ndarray  # float64 [n]
    width: int
    height: int

    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    @property
    def cx(self) -> float:
        return float(self.K[0, 2])

    @property
    def cy(self) -> float:
        return float(self.K[1, 2])

    @property
    def is_distorted(self) -> bool:
        return bool(np.any(self.D != 0))


def camera_info_to_intrinsics(msg: CameraInfo) -> CameraIntrinsics:
    """``CameraInfo`` -> :class:`CameraIntrinsics`; ValueError for an uncalibrated/invalid one."""
    width, height = int(msg.width), int(msg.height)
    if width <= 0 or height <= 0:
        raise ValueError(f"CameraInfo has image size {width}x{height}; expected positive width and height")
    K = np.array(msg.k, dtype=np.float64)
    if K.size != 9:
        raise ValueError(f"CameraInfo.k must have 9 values, got {K.size}")
    K = K.reshape(3, 3)
    if not np.all(np.isfinite(K)):
        raise ValueError(f"CameraInfo.k contains NaN or infinite values: {K.tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(
            f"CameraInfo.k has focal lengths fx={K[0, 0]}, fy={K[1, 1]}; expected positive values (uncalibrated camera?)"
        )
    if not (np.allclose(K[2], [0.0, 0.0, 1.0]) and K[1, 0] == 0.0):
        raise ValueError(f"CameraInfo.k is not an upper-triangular pinhole matrix with K[2] = [0, 0, 1]: {K.tolist()}")
    D = np.array(msg.d, dtype=np.float64)
    if not np.all(np.isfinite(D)):
        raise ValueError(f"CameraInfo.d contains NaN or infinite values: {D.tolist()}")
    model = str(msg.distortion_model)
    if model in _DISTORTION_COEFFS:
        if D.size not in (0,) + _DISTORTION_COEFFS[model]:
            raise ValueError(f"distortion model {model!r} needs {_DISTORTION_COEFFS[model][0]} coefficients, got {D.size}")
    elif np.any(D != 0):
        raise ValueError(
            f"unknown distortion model {model!r} with non-zero coefficients; expected one of {sorted(_DISTORTION_COEFFS)}"
        )
    return CameraIntrinsics(K=K, distortion_model=model, D=D, width=width, height=height)


# ---------------------------------------------------------------------------------------------
# Output records (spark3r.mapping.outputs) -> messages


def transform_record_to_msg(record) -> TransformStamped:
    return matrix_to_transform(record.T, record.stamp_ns, record.parent, record.child)


def odometry_record_to_msg(record) -> Odometry:
    msg = Odometry()
    _set_header(msg, record.stamp_ns, record.frame_id)
    msg.child_frame_id = record.child_frame_id
    msg.pose.pose = matrix_to_pose(record.pose)
    twist = msg.twist.twist
    twist.linear.x, twist.linear.y, twist.linear.z = (float(v) for v in record.linear)
    twist.angular.x, twist.angular.y, twist.angular.z = (float(v) for v in record.angular)
    return msg


def cloud_record_to_msg(record) -> PointCloud2:
    return cloud_to_msg(record.xyz, record.rgb, record.stamp_ns, record.frame_id)


def pose_record_to_msg(record) -> PoseStamped:
    msg = PoseStamped()
    _set_header(msg, record.stamp_ns, record.frame_id)
    msg.pose = matrix_to_pose(record.pose)
    return msg


class PathConverter:
    """Path records -> ``nav_msgs/Path``, converting each pose once: the whole path (up to
    ``path_max_size`` poses) is re-published after every window, and a conversion costs ~0.1 ms."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[object, PoseStamped]] = {}  # id(record) -> (record, msg)

    def __call__(self, record) -> Path:
        cache = {}
        for pose in record.poses:
            hit = self._cache.get(id(pose))
            # Holding the record keeps its id from being reused while it is cached.
            cache[id(pose)] = hit if hit is not None and hit[0] is pose else (pose, pose_record_to_msg(pose))
        self._cache = cache
        msg = Path()
        _set_header(msg, record.stamp_ns, record.frame_id)
        msg.poses = [cache[id(pose)][1] for pose in record.poses]
        return msg
