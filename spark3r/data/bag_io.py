"""rosbag2 bags (mcap or sqlite3) of camera sequences, written and read with `rosbags` (no ROS).

Writing: :func:`write_sequence_bag` turns a sequence (e.g. ``render_sequence``) into the topics a
camera driver + robot description would produce: images (``sensor_msgs/Image`` or
``CompressedImage``), ``sensor_msgs/CameraInfo`` and a latched ``/tf_static`` with
base_link -> camera optical frame. Messages are stamped with ``seq.stamps_ns`` (header stamp and
bag time agree). The bag uses rosbag2 format version 9 and standard type hashes, so
``ros2 bag play/info`` and rclpy read it.

Reading: :func:`iter_bag_images`, :func:`read_bag_camera_info` and :func:`read_bag_tf_static`
give numpy data for the offline mapper. Image stamps are the message header stamps (sensor time).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from spark3r.data.image_codec import (
    COMPRESSED_FORMATS,
    WRITABLE_ENCODINGS,
    decode_compressed_image,
    decode_raw_image,
    encode_compressed_image,
    encode_raw_image,
)
from spark3r.data.io import atomic_directory
from spark3r.geometry import RIGID_TOLERANCE, matrix_to_quat_xyzw, quat_xyzw_to_matrix, rigid_error

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_TYPE = "tf2_msgs/msg/TFMessage"
TF_STATIC_TOPIC = "/tf_static"
STORAGES = ("mcap", "sqlite3")


def typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def qos_profile(transient_local: bool, depth: int):
    """One offered QoS profile in the form rosbag2 records (and `ros2 bag play` re-offers)."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    unset = QosTime(sec=0, nsec=0)  # "default": no deadline / lifespan / lease
    return Qos(
        history=QosHistory.KEEP_LAST,
        depth=depth,
        reliability=QosReliability.RELIABLE,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=unset,
        lifespan=unset,
        liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=unset,
        avoid_ros_namespace_conventions=False,
    )


def header_msg(ts, stamp_ns: int, frame_id: str):
    t = ts.types
    stamp = t["builtin_interfaces/msg/Time"](sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9))
    return t["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)


def _camera_info_msg(ts, stamp_ns: int, frame_id: str, K: np.ndarray, height: int, width: int):
    t = ts.types
    P = np.zeros((3, 4))
    P[:, :3] = K
    roi = t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return t[CAMERA_INFO_TYPE](
        header=header_msg(ts, stamp_ns, frame_id), height=height, width=width, distortion_model="plumb_bob",
        d=np.zeros(5), k=K.reshape(-1).astype(np.float64), r=np.eye(3).reshape(-1), p=P.reshape(-1),
        binning_x=0, binning_y=0, roi=roi,
    )


def _tf_static_msg(ts, stamp_ns: int, parent: str, child: str, transform: np.ndarray):
    t = ts.types
    q = matrix_to_quat_xyzw(transform[:3, :3])
    tr = transform[:3, 3]
    geometry = t["geometry_msgs/msg/Transform"](
        translation=t["geometry_msgs/msg/Vector3"](x=float(tr[0]), y=float(tr[1]), z=float(tr[2])),
        rotation=t["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
    )
    stamped = t["geometry_msgs/msg/TransformStamped"](
        header=header_msg(ts, stamp_ns, parent), child_frame_id=child, transform=geometry)
    return t[TF_TYPE](transforms=[stamped])


def _check_sequence(seq) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.asarray(seq.images)
    stamps = np.asarray(seq.stamps_ns)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"seq.images must be uint8 [N, H, W, 3] RGB, got {images.dtype} {images.shape}")
    if stamps.shape != (len(images),) or not np.issubdtype(stamps.dtype, np.integer):
        raise ValueError(f"seq.stamps_ns must be integer nanoseconds of shape ({len(images)},), "
                         f"got {stamps.dtype} {stamps.shape}")
    if len(images) and (stamps.min() < 0 or np.any(np.diff(stamps) <= 0)):
        raise ValueError("seq.stamps_ns must be non-negative and strictly increasing")
    K = np.asarray(seq.K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        raise ValueError(f"seq.K must be a finite [3, 3] matrix, got shape {K.shape}")
    return images, stamps.astype(np.int64), K


def _check_topic(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.startswith("/") or value.endswith("/") or " " in value:
        raise ValueError(f"{name} must be an absolute ROS topic name like '/camera/image_raw', got {value!r}")


def write_sequence_bag(seq, path, storage: str = "mcap", image_topic: str = "/camera/image_raw",
                       camera_info_topic: str = "/camera/camera_info", encoding: str = "rgb8",
                       compressed: bool = False, camera_frame: str = "camera_optical_frame",
                       base_frame: str = "base_link", write_tf_static: bool = True,
                       compressed_format: str = "jpeg", overwrite: bool = False) -> Path:
    """Write ``seq`` (images, stamps_ns, K and, for tf, base_to_camera) as a rosbag2 directory.

    ``compressed=True`` writes ``sensor_msgs/CompressedImage`` (``compressed_format`` "jpeg" or
    "png") on ``image_topic + "/compressed"`` as image_transport names it (unless the topic already
    ends in ``/compressed``); otherwise raw ``Image`` with ``encoding`` "rgb8", "bgr8" or "mono8".
    ``/tf_static`` is recorded once, at the first stamp, with a transient-local QoS profile so
    ``ros2 bag play`` latches it for late subscribers. The bag appears at ``path`` atomically;
    an existing path is an error unless ``overwrite``. Returns ``path``.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if compressed:
        if compressed_format not in COMPRESSED_FORMATS:
            raise ValueError(f"compressed_format must be one of {COMPRESSED_FORMATS}, got {compressed_format!r}")
        if not image_topic.endswith("/compressed"):
            image_topic = image_topic.rstrip("/") + "/compressed"
    elif encoding not in WRITABLE_ENCODINGS:
        raise ValueError(f"encoding must be one of {WRITABLE_ENCODINGS}, got {encoding!r}")
    _check_topic("image_topic", image_topic)
    _check_topic("camera_info_topic", camera_info_topic)
    if image_topic == camera_info_topic:
        raise ValueError("image_topic and camera_info_topic must differ")
    for name, frame in (("camera_frame", camera_frame), ("base_frame", base_frame)):
        if not isinstance(frame, str) or not frame or frame.startswith("/"):
            raise ValueError(f"{name} must be a non-empty tf frame id without a leading '/', got {frame!r}")
    images, stamps, K = _check_sequence(seq)
    if len(images) == 0:
        raise ValueError("seq has no frames; a bag needs at least one image")
    height, width = images.shape[1:3]
    base_to_camera = None
    if write_tf_static:
        base_to_camera = np.asarray(getattr(seq, "base_to_camera", None), dtype=np.float64)
        if base_to_camera.shape != (4, 4) or rigid_error(base_to_camera) > RIGID_TOLERANCE:
            raise ValueError("write_tf_static needs seq.base_to_camera as a rigid 4x4 transform "
                             "(pose of the camera optical frame in base_link)")

    ts = typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with atomic_directory(path, overwrite=overwrite) as staging:
        writer = Writer(staging, version=Writer.VERSION_LATEST, storage_plugin=plugin)
        writer.open()
        try:
            sensor_qos = [qos_profile(transient_local=False, depth=10)]
            image_type = COMPRESSED_TYPE if compressed else IMAGE_TYPE
            image_conn = writer.add_connection(image_topic, image_type, typestore=ts, offered_qos_profiles=sensor_qos)
            info_conn = writer.add_connection(camera_info_topic, CAMERA_INFO_TYPE, typestore=ts,
                                              offered_qos_profiles=sensor_qos)
            if base_to_camera is not None:
                tf_conn = writer.add_connection(TF_STATIC_TOPIC, TF_TYPE, typestore=ts,
                                                offered_qos_profiles=[qos_profile(transient_local=True, depth=1)])
                tf_msg = _tf_static_msg(ts, int(stamps[0]), base_frame, camera_frame, base_to_camera)
                writer.write(tf_conn, int(stamps[0]), ts.serialize_cdr(tf_msg, TF_TYPE))
            for stamp, rgb in zip(stamps, images):
                stamp = int(stamp)
                header = header_msg(ts, stamp, camera_frame)
                if compressed:
                    data, fmt = encode_compressed_image(rgb, compressed_format)
                    msg = ts.types[COMPRESSED_TYPE](header=header, format=fmt, data=np.frombuffer(data, np.uint8))
                else:
                    data, step = encode_raw_image(rgb, encoding)
                    msg = ts.types[IMAGE_TYPE](header=header, height=height, width=width, encoding=encoding,
                                               is_bigendian=0, step=step, data=data)
                writer.write(image_conn, stamp, ts.serialize_cdr(msg, image_type))
                info = _camera_info_msg(ts, stamp, camera_frame, K, height, width)
                writer.write(info_conn, stamp, ts.serialize_cdr(info, CAMERA_INFO_TYPE))
        except BaseException:
            writer.abort()
            raise
        writer.close()
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading


class BagCameraInfo(NamedTuple):
    K: np.ndarray  # float64 [3,3]
    D: np.ndarray  # float64 [n] distortion coefficients
    distortion_model: str
    width: int
    height: int
    frame_id: str
    stamp_ns: int


def open_reader(path):
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag {path} does not exist")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        # A copied or hand-made bag folder often lacks metadata.yaml; one storage file can be
        # read on its own, several cannot be ordered without it.
        storage = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".mcap", ".db3"))
        if not storage:
            raise ValueError(f"{path} is not a readable rosbag2 bag: the folder has no metadata.yaml and no "
                             ".mcap/.db3 file")
        if len(storage) > 1:
            listed = ", ".join(p.name for p in storage)
            raise ValueError(f"bag folder {path} has no metadata.yaml, so its storage files ({listed}) cannot be "
                             "read as one bag; pass a single .mcap/.db3 file as the input, or restore metadata.yaml "
                             "(`ros2 bag reindex`)")
        path = storage[0]
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # rosbags raises several error types for broken input
        raise ValueError(f"{path} is not a readable rosbag2 bag (directory with metadata.yaml, "
                         f".mcap or .db3): {exc}") from exc
    return reader


def _topics_of_types(reader, msgtypes: tuple[str, ...]) -> dict[str, str]:
    return {c.topic: c.msgtype for c in reader.connections if c.msgtype in msgtypes}


def pick_topic(reader, path, topic: str | None, msgtypes: tuple[str, ...], what: str) -> str | None:
    """The topic to read: ``topic`` checked against the bag, or the only one of ``msgtypes``."""
    candidates = _topics_of_types(reader, msgtypes)
    if topic is not None:
        all_topics = {c.topic: c.msgtype for c in reader.connections}
        if topic not in all_topics:
            raise ValueError(f"topic {topic!r} is not in bag {path}; {what} topics there: {sorted(candidates) or 'none'}")
        if all_topics[topic] not in msgtypes:
            raise ValueError(f"topic {topic!r} in bag {path} has type {all_topics[topic]}, expected {' or '.join(msgtypes)}")
        return topic
    if len(candidates) == 1:
        return next(iter(candidates))
    if not candidates:
        return None
    raw = [t for t, mt in candidates.items() if mt == msgtypes[0]]
    if len(raw) == 1:  # raw and compressed variants of one stream: the raw one is lossless
        return raw[0]
    raise ValueError(f"bag {path} has several {what} topics {sorted(candidates)}; pass topic= to choose one")


def header_stamp_ns(header) -> int:
    return int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)


def iter_bag_images(path, topic: str | None = None) -> Iterator[tuple[int, np.ndarray, str]]:
    """Iterate ``(header stamp ns, uint8 RGB [H,W,3], frame_id)`` over every image in bag order.

    ``topic=None`` picks the bag's only Image or CompressedImage topic (a raw topic wins over
    compressed ones when both exist). The bag and topic are checked on the call itself, not on
    the first ``next()``: FileNotFoundError / ValueError for a missing or unreadable bag, a
    missing topic, a topic of another type, or no image topic at all.
    """
    reader = open_reader(path)
    try:
        chosen = pick_topic(reader, path, topic, (IMAGE_TYPE, COMPRESSED_TYPE), "image")
        if chosen is None:
            topics = sorted(c.topic for c in reader.connections)
            raise ValueError(f"bag {path} has no sensor_msgs/Image or CompressedImage topic (topics: {topics})")
    finally:
        reader.close()
    return _decode_images(path, chosen)


def _decode_images(path, topic: str) -> Iterator[tuple[int, np.ndarray, str]]:
    reader = open_reader(path)
    try:
        ts = typestore()
        connections = [c for c in reader.connections if c.topic == topic]
        for conn, _, raw in reader.messages(connections=connections):
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            if conn.msgtype == IMAGE_TYPE:
                rgb = decode_raw_image(msg.data, msg.height, msg.width, msg.encoding, msg.step)
            else:
                rgb = decode_compressed_image(msg.data, msg.format)
            yield header_stamp_ns(msg.header), rgb, msg.header.frame_id
    finally:
        reader.close()


def read_bag_camera_info(path, topic: str | None = None) -> BagCameraInfo | None:
    """Calibration from the first CameraInfo message, or None if the bag has no CameraInfo topic
    (only when ``topic`` is None; a named topic that is missing is an error)."""
    reader = open_reader(path)
    try:
        chosen = pick_topic(reader, path, topic, (CAMERA_INFO_TYPE,), "CameraInfo")
        if chosen is None:
            return None
        ts = typestore()
        connections = [c for c in reader.connections if c.topic == chosen]
        for conn, _, raw in reader.messages(connections=connections):
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
            if K[0, 0] <= 0 or K[1, 1] <= 0:
                raise ValueError(f"CameraInfo on {chosen} in {path} has no calibration (K = {K.tolist()})")
            return BagCameraInfo(K=K, D=np.asarray(msg.d, dtype=np.float64), distortion_model=msg.distortion_model,
                                 width=int(msg.width), height=int(msg.height), frame_id=msg.header.frame_id,
                                 stamp_ns=header_stamp_ns(msg.header))
        raise ValueError(f"CameraInfo topic {chosen} in {path} has no messages")
    finally:
        reader.close()


def read_bag_tf_static(path, topic: str = TF_STATIC_TOPIC) -> dict[tuple[str, str], np.ndarray]:
    """All static transforms in the bag: ``{(parent, child): 4x4 float64}`` where the matrix is
    the pose of ``child`` in ``parent`` (maps child coordinates to parent). Empty if the bag has
    no such topic; later messages override earlier ones for the same frame pair."""
    reader = open_reader(path)
    try:
        connections = [c for c in reader.connections if c.topic == topic]
        if not connections:
            return {}
        wrong = {c.msgtype for c in connections} - {TF_TYPE}
        if wrong:
            raise ValueError(f"topic {topic!r} in bag {path} has type {sorted(wrong)}, expected {TF_TYPE}")
        ts = typestore()
        transforms: dict[tuple[str, str], np.ndarray] = {}
        for conn, _, raw in reader.messages(connections=connections):
            for tf in ts.deserialize_cdr(raw, conn.msgtype).transforms:
                r, tr = tf.transform.rotation, tf.transform.translation
                pose = np.eye(4)
                pose[:3, :3] = quat_xyzw_to_matrix([r.x, r.y, r.z, r.w])
                pose[:3, 3] = (tr.x, tr.y, tr.z)
                transforms[(tf.header.frame_id, tf.child_frame_id)] = pose
        return transforms
    finally:
        reader.close()
