"""The spark3r mapping node: camera images in; REP-105 TF, odometry, path, clouds and a voxel map out.

    python -m spark3r_ros.mapping_node --ros-args --params-file config/mapping.yaml
    ros2 run spark3r_ros mapping_node --ros-args --params-file ...        (colcon install)

Threads: the executor only stores incoming messages (images go into a bounded queue that drops
its oldest entry when full); one worker thread decodes images, runs the keyframe gate and the
backbone (:class:`spark3r.mapping.Mapper`) and publishes each window's result. Services and
timers run on the executor, so they answer while a window is being inferred.

Frames (REP-105): ``map -> odom -> base_link``. With ``publish_odom_to_base_tf`` the node owns
odometry (camera-only robot): ``odom -> base_link`` is the mapped base pose and ``map -> odom``
is the identity. Without it, another node owns ``odom -> base_link`` and the node publishes
``map -> odom = T_map_base * T_odom_base^-1`` with ``T_odom_base`` read from ``/tf`` at the image
stamp. ``map -> odom`` is future-dated by ``transform_tolerance``. Every other output carries the
stamp of the image it comes from. TF never carries scale: the mapper's poses are rigid, the map
unit is the first window's unit (metric only with a metric backbone).
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry, Path as PathMsg
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from spark3r.geometry import invert_rigid
from spark3r.mapping import BackboneConfig, Frame, Mapper, MapperConfig, WindowResult
from spark3r.mapping.config import KeyframeConfig, MapConfig, WindowConfig, parameter_docs
from spark3r.mapping.keyframes import REJECT_BAD_IMAGE, REJECT_IMAGE_SIZE
from spark3r_ros.conversions import (camera_info_to_intrinsics, cloud_to_msg, compressed_to_rgb, image_to_rgb,
                                     matrix_to_pose, matrix_to_transform, ns_to_time, time_to_ns)
from spark3r_ros.odom_tf_buffer import OdomTfBuffer
from spark3r_ros.static_tf import StaticTransformCache, subscribe_static_tf

NODE_NAME = "spark3r_mapping"

# Parameters of the node itself (the mapper's come from its config dataclasses):
# name -> (default, description).
NODE_PARAMETERS: dict[str, tuple[object, str]] = {
    "reduction_schedule": ("", "Spark3R key/value schedule JSON file for reduction 'spark3r' ('' = the backbone's default schedule)"),
    "map_frame": ("map", "world-fixed frame of the map, path and clouds (REP-105 map)"),
    "odom_frame": ("odom", "continuous odometry frame (REP-105 odom)"),
    "base_frame": ("base_link", "robot body frame; the camera extrinsic base_frame -> image frame_id comes from /tf_static"),
    "publish_map_to_odom_tf": (True, "publish map -> odom on /tf (future-dated by transform_tolerance)"),
    "publish_odom_to_base_tf": (True, "publish odom -> base_link on /tf (the node owns odometry); false when another node does"),
    "queue_depth": (4, "images waiting for the mapping worker; when full the oldest is dropped (counted)"),
    "transform_tolerance": (0.1, "seconds map -> odom is future-dated so that TF lookups at 'now' succeed"),
    "map_publish_period": (2.0, "minimum seconds between two ~/map publications (0 = after every window)"),
    "path_max_size": (10000, "poses kept in ~/path; the oldest are dropped beyond it"),
    "save_directory": ("~/.ros/spark3r_maps", "where ~/save_map writes map.ply and trajectory.tum"),
    "image_transport": ("raw", "'raw' subscribes sensor_msgs/Image on 'image', 'compressed' CompressedImage on 'image/compressed'"),
}

# Inclusive bounds advertised in the parameter descriptors. The config dataclasses stay the
# authority (they also check relations such as window_stride < window_size).
PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "min_parallax_px": (0.0, 10000.0), "max_time_gap_s": (0.0, 3600.0), "min_time_gap_s": (0.0, 3600.0),
    "blur_threshold": (0.0, 1e6), "flow_image_width": (32, 8192), "flow_max_corners": (8, 100000),
    "min_tracked_fraction": (0.0, 1.0),
    "window_size": (2, 1024), "window_stride": (1, 1023), "max_pending_keyframes": (2, 100000),
    "min_shared_keyframes": (1, 1023), "camera_center_weight": (0.0, 1.0), "alignment_points_per_frame": (0, 1000000),
    "max_alignment_residual": (0.0, 1000.0), "min_inlier_fraction": (0.0, 1.0),
    "conf_percentile": (0.0, 100.0), "conf_min": (0.0, 1e6), "max_points_per_keyframe": (1, 10000000),
    "voxel_size": (1e-6, 100.0), "max_map_points": (1, 1000000000), "max_trajectory_length": (1, 100000000),
    "image_width": (28, 4088), "cache_max_frames": (0, 100000),
    "queue_depth": (1, 1000), "transform_tolerance": (0.0, 10.0), "map_publish_period": (0.0, 3600.0),
    "path_max_size": (1, 10000000),
}
_RANGE_STEPS = {"image_width": 14}  # the network needs a multiple of the patch size

# BackboneConfig.reduction_params is a dict, which ROS parameters cannot carry; the node exposes
# the schedule file instead.
_BACKBONE_PARAMETER_NAMES = tuple(f.name for f in fields(BackboneConfig) if f.name != "reduction_params")

DIAGNOSTICS_PERIOD_S = 1.0
WARN_PERIOD_S = 5.0

BackboneFactory = Callable[[BackboneConfig, MapperConfig], object]


def all_parameter_docs() -> dict[str, tuple[object, str]]:
    """Every parameter the node declares: ``{name: (default, description)}``."""
    docs: dict[str, tuple[object, str]] = {}
    for cls in (BackboneConfig, KeyframeConfig, WindowConfig, MapConfig):
        for name, (default, doc) in parameter_docs(cls).items():
            if cls is BackboneConfig and name not in _BACKBONE_PARAMETER_NAMES:
                continue
            docs[name] = (default, doc)
    overlap = set(docs) & set(NODE_PARAMETERS)
    if overlap:  # one name per thing
        raise RuntimeError(f"parameters declared twice: {sorted(overlap)}")
    docs.update(NODE_PARAMETERS)
    return docs


def parameter_descriptor(name: str, default, description: str) -> ParameterDescriptor:
    desc = ParameterDescriptor(name=name, description=description, read_only=True)
    if name in PARAMETER_RANGES:
        lo, hi = PARAMETER_RANGES[name]
        if isinstance(default, bool):
            pass
        elif isinstance(default, int):
            desc.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=_RANGE_STEPS.get(name, 1))]
        elif isinstance(default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
    return desc


def backbone_config_from(values: dict) -> BackboneConfig:
    """BackboneConfig from the flat parameter values (``reduction_schedule`` -> reduction params)."""
    kwargs = {name: values[name] for name in _BACKBONE_PARAMETER_NAMES}
    schedule = values["reduction_schedule"]
    if schedule:
        if values["reduction"] != "spark3r":
            raise ValueError(f"reduction_schedule={schedule!r} is set but reduction={values['reduction']!r}; "
                             "a schedule is only used by reduction 'spark3r' (or leave reduction_schedule empty)")
        kwargs["reduction_params"] = {"schedule": os.path.expanduser(schedule)}
    return BackboneConfig(**kwargs)


def check_node_values(values: dict) -> None:
    """ValueError with the parameter name for node-level values the descriptors cannot express."""
    if values["image_transport"] not in ("raw", "compressed"):
        raise ValueError(f"image_transport={values['image_transport']!r} is invalid: expected 'raw' or 'compressed'")
    for name in ("map_frame", "odom_frame", "base_frame"):
        if not values[name] or values[name].startswith("/"):
            raise ValueError(f"{name}={values[name]!r} is invalid: expected a non-empty frame id without a leading '/'")
    if len({values["map_frame"], values["odom_frame"], values["base_frame"]}) != 3:
        raise ValueError("map_frame, odom_frame and base_frame must be three different frames, got "
                         f"{values['map_frame']!r}, {values['odom_frame']!r}, {values['base_frame']!r}")
    if not values["save_directory"]:
        raise ValueError("save_directory is empty: expected a directory for ~/save_map")


class FrameQueue:
    """Bounded FIFO between the executor (producer) and the mapping worker (consumer); when
    full, ``put`` drops the oldest item so the newest image always gets in."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"queue depth must be >= 1, got {depth}")
        self._items: deque = deque()
        self._depth = int(depth)
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item) -> bool:
        """Append ``item``; True if an older item had to be dropped for it."""
        with self._cond:
            dropped = len(self._items) >= self._depth
            if dropped:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()
            return dropped

    def get(self, timeout: float):
        """The oldest item, or None after ``timeout`` seconds without one."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


@dataclass
class NodeCounters:
    """What the node itself counts (the mapper's own counters are in ``Mapper.stats``)."""

    images_received: int = 0
    images_dropped_queue: int = 0          # overload: oldest queued image dropped
    images_dropped_no_backbone: int = 0    # backbone failed to load
    images_bad: int = 0                    # undecodable: wrong encoding, bad payload, corrupt jpeg
    frames_rejected_bad_image: int = 0     # decoded, but unusable (too small, ...)
    camera_info_bad: int = 0
    camera_info_size_mismatch: int = 0
    time_jumps_backwards: int = 0
    map_to_odom_missing_odometry: int = 0  # external odom -> base not available at the image stamp
    windows_published: int = 0
    last_error: str = ""


class _Throttle:
    """Warn at most once per period per key (and say how many were suppressed)."""

    def __init__(self, logger, period_s: float = WARN_PERIOD_S):
        self._logger = logger
        self._period = period_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self._period:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        extra = f" ({suppressed} similar messages suppressed)" if suppressed else ""
        self._logger.warning(message + extra)


def default_backbone_factory(config: BackboneConfig, mapper_config: MapperConfig):
    from spark3r.mapping.model_backbone import ModelBackbone  # torch: imported only when needed

    return ModelBackbone.from_config(config, mapper_config.window.window_size, mapper_config.window.window_stride)


# History of the image subscription (SensorDataQoS keeps 5): at 30 Hz, a third of a second.
IMAGE_QOS_DEPTH = 10


def latched_qos(depth: int = 1) -> QoSProfile:
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class MappingNode(Node):
    """See the module docstring. ``backbone_factory(backbone_config, mapper_config)`` builds the
    backbone (default: :class:`~spark3r.mapping.model_backbone.ModelBackbone` from the
    parameters); tests and the demo inject a test double here."""

    def __init__(self, *, backbone_factory: Optional[BackboneFactory] = None, node_name: str = NODE_NAME, **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        self.values = self._declare_parameters()
        check_node_values(self.values)
        self.mapper_config = MapperConfig.from_flat(
            {n: v for n, v in self.values.items() if n in _mapper_parameter_names()})
        self.backbone_config = backbone_config_from(self.values)
        self.counters = NodeCounters()
        self._counter_lock = threading.Lock()
        self._throttle = _Throttle(self.get_logger())
        self.map_frame, self.odom_frame, self.base_frame = (self.values[n] for n in ("map_frame", "odom_frame", "base_frame"))
        self.transform_tolerance_ns = int(round(self.values["transform_tolerance"] * 1e9))

        self.backbone_error = ""
        self.backbone_name = self.backbone_config.backbone  # a test double reports its own name
        self.mapper: Optional[Mapper] = None
        self._build_mapper(backbone_factory or default_backbone_factory)

        self._queue = FrameQueue(self.values["queue_depth"])
        self._static_tf = StaticTransformCache()
        self._camera_info: Optional[tuple[np.ndarray, int, int]] = None  # (K, width, height)
        self._applied_extrinsic: Optional[tuple[str, bytes]] = None
        self._warned_no_camera_info = False
        self._resets = 0  # ~/reset calls; the worker drops a window result that straddles one
        self._last_stamp_ns: Optional[int] = None
        self._latest_stamp_ns = 0
        self._last_base_pose: Optional[tuple[int, np.ndarray]] = None
        self._path: deque[PoseStamped] = deque(maxlen=self.values["path_max_size"])
        self._map_dirty = False
        self._last_map_publish = -math.inf
        self._publish_lock = threading.RLock()  # path/map state: worker, services and timers
        self._rate_window: deque[float] = deque()
        self._stop = threading.Event()

        self._create_interfaces()
        self._worker = threading.Thread(target=self._worker_loop, name="spark3r_mapping_worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"mapping node up: backbone={self.backbone_name} reduction={self.backbone_config.reduction} "
            f"device={self.backbone_config.device} input={'image/compressed' if self._compressed else 'image'} "
            f"frames {self.map_frame} -> {self.odom_frame} -> {self.base_frame}"
            + (f"; BACKBONE NOT LOADED: {self.backbone_error}" if self.backbone_error else ""))

    # ------------------------------------------------------------------ set-up

    def _declare_parameters(self) -> dict:
        values = {}
        for name, (default, doc) in all_parameter_docs().items():
            param = self.declare_parameter(name, default, parameter_descriptor(name, default, doc))
            values[name] = param.value
        return values

    def _build_mapper(self, factory: BackboneFactory) -> None:
        try:
            backbone = factory(self.backbone_config, self.mapper_config)
            self.mapper = Mapper(self.mapper_config, backbone)
            self.backbone_name = str(getattr(backbone, "name", "") or self.backbone_name)
        except Exception as exc:  # keep the node up: diagnostics and logs carry the reason
            self.backbone_error = f"{type(exc).__name__}: {exc}"
            self.get_logger().error(
                f"could not build backbone {self.backbone_config.backbone!r} with checkpoint "
                f"{self.backbone_config.checkpoint!r}: {self.backbone_error}. The node stays up but maps nothing; "
                "fix the 'backbone'/'checkpoint'/'device'/'dtype'/'reduction' parameters and restart the node "
                "(~/reset does not reload the backbone).")

    def _create_interfaces(self) -> None:
        self._compressed = self.values["image_transport"] == "compressed"
        # Best effort like any sensor stream, but with room in the DDS reader for a short stall of
        # the executor (GIL, a loaded machine): an image that reaches the callback is counted (mapped,
        # gated or dropped by the bounded queue); one overwritten inside DDS is lost uncounted.
        image_qos = QoSProfile(depth=max(IMAGE_QOS_DEPTH, self.values["queue_depth"]),
                               reliability=qos_profile_sensor_data.reliability,
                               durability=qos_profile_sensor_data.durability, history=qos_profile_sensor_data.history)
        if self._compressed:
            self._image_sub = self.create_subscription(CompressedImage, "image/compressed", self._on_image, image_qos)
        else:
            self._image_sub = self.create_subscription(Image, "image", self._on_image, image_qos)
        self._info_sub = self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos_profile_sensor_data)
        self._tf_static_sub = subscribe_static_tf(self, self._static_tf)
        self._odom_buffer: Optional[OdomTfBuffer] = None
        if self.values["publish_map_to_odom_tf"] and not self.values["publish_odom_to_base_tf"]:
            self._odom_buffer = OdomTfBuffer(self.odom_frame, self.base_frame)
            self._tf_sub = self.create_subscription(TFMessage, "/tf", self._odom_buffer.add_message, 100)

        self._tf_pub = self.create_publisher(TFMessage, "/tf", 100)
        self._odom_pub = self.create_publisher(Odometry, "~/odometry", 10)
        self._path_pub = self.create_publisher(PathMsg, "~/path", latched_qos())
        self._cloud_pub = self.create_publisher(PointCloud2, "~/cloud", 2)
        self._map_pub = self.create_publisher(PointCloud2, "~/map", latched_qos())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        services = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=services)
        self.create_service(Trigger, "~/save_map", self._on_save_map, callback_group=services)

        # Steady clock: diagnostics and the map rate limit keep running while a bag is paused.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        timers = MutuallyExclusiveCallbackGroup()
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics, callback_group=timers, clock=steady)
        period = self.values["map_publish_period"]
        if period > 0:
            self.create_timer(min(period, 1.0), self._publish_map_if_due, callback_group=timers, clock=steady)

    # ------------------------------------------------------------------ executor callbacks (never block)

    def _on_image(self, msg) -> None:
        with self._counter_lock:
            self.counters.images_received += 1
            self._rate_window.append(time.monotonic())
        if self._queue.put(msg):
            with self._counter_lock:
                self.counters.images_dropped_queue += 1
            self._throttle.warn("queue", f"mapping is slower than the input: dropped the oldest queued image "
                                         f"({self._queue.dropped} so far, queue_depth={self.values['queue_depth']})")

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            intrinsics = camera_info_to_intrinsics(msg)
        except ValueError as exc:
            self._count("camera_info_bad", f"ignoring camera_info: {exc}")
            return
        if intrinsics.is_distorted:
            self._throttle.warn("distorted", "camera_info has non-zero distortion: the backbone assumes a pinhole "
                                             "camera, feed the rectified image (image_proc) for good geometry")
        self._camera_info = (intrinsics.K, intrinsics.width, intrinsics.height)

    def _on_reset(self, request, response):
        if self.mapper is None:
            response.success = False
            response.message = f"backbone not loaded ({self.backbone_error}); a reset cannot fix that, restart the node"
            return response
        self._resets += 1
        self._queue.clear()
        self.mapper.reset()
        self._clear_outputs()
        self.get_logger().info("map reset on request")
        response.success = True
        response.message = "map, trajectory and queue cleared"
        return response

    def _on_save_map(self, request, response):
        if self.mapper is None:
            response.success = False
            response.message = f"backbone not loaded ({self.backbone_error}); nothing to save"
            return response
        directory = Path(os.path.expanduser(self.values["save_directory"]))
        try:
            paths = self.mapper.save(directory)
        except (OSError, ValueError) as exc:
            response.success = False
            response.message = f"could not save to {directory}: {exc}"
            self.get_logger().error(response.message)
            return response
        response.success = True
        response.message = f"saved {len(self.mapper.voxel_map)} points to {paths['map']} and " \
                           f"{len(self.mapper.trajectory)} keyframe poses to {paths['trajectory']}"
        self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------ the worker

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            msg = self._queue.get(timeout=0.1)
            if msg is None:
                continue
            try:
                self._process(msg)
            except Exception as exc:  # one bad message must never stop the mapping
                if self._stop.is_set() or not self.context.ok():
                    return  # shutting down: publishers are gone
                self._count(None, f"unexpected error while processing an image: {type(exc).__name__}: {exc}")
                self.get_logger().error(f"unexpected error while processing an image: {type(exc).__name__}: {exc}")

    def _process(self, msg) -> None:
        if self.mapper is None:
            with self._counter_lock:
                self.counters.images_dropped_no_backbone += 1
            self._throttle.warn("no_backbone", f"dropping images: the backbone is not loaded ({self.backbone_error})")
            return
        try:
            rgb = compressed_to_rgb(msg) if self._compressed else image_to_rgb(msg)
        except (ValueError, TypeError) as exc:
            self._count("images_bad", f"dropping an image that cannot be decoded: {exc}")
            return
        stamp_ns = time_to_ns(msg.header.stamp)
        if self._last_stamp_ns is not None and stamp_ns < self._last_stamp_ns:
            self._on_time_backwards(stamp_ns)
        self._last_stamp_ns = stamp_ns
        self._update_extrinsic(msg.header.frame_id)
        decision = self.mapper.offer(Frame(rgb, stamp_ns, self._intrinsics_for(rgb.shape)))
        if decision.reason == REJECT_BAD_IMAGE:
            self._count("frames_rejected_bad_image", f"image rejected: {decision.detail}")
        elif decision.reason == REJECT_IMAGE_SIZE:
            self._throttle.warn("image_size", f"image rejected: {decision.detail}; call ~/reset to start a new map "
                                              "at the new size")
        while not self._stop.is_set():
            nonfinite_before = self.mapper.stats.nonfinite_depth_pixels
            resets_before = self._resets
            result = self.mapper.process_pending()
            nonfinite = self.mapper.stats.nonfinite_depth_pixels - nonfinite_before
            if nonfinite:
                self._throttle.warn("nonfinite_depth", f"the backbone returned {nonfinite} NaN/inf depth values in the "
                                                       "last window; they are not mapped (counted as nonfinite_depth_pixels)")
            if result is None:
                break
            if self._resets != resets_before:
                continue  # ~/reset arrived while this window was integrated: it belongs to the old map
            self._publish_window(result)

    def _on_time_backwards(self, stamp_ns: int) -> None:
        # The mapper resets itself on the next offer; the node drops what it derived from the old run.
        with self._counter_lock:
            self.counters.time_jumps_backwards += 1
        self.get_logger().warning(f"image stamp went backwards ({stamp_ns} ns < {self._last_stamp_ns} ns; bag loop or "
                                  "restarted driver): starting a new map")
        if self._odom_buffer is not None:
            self._odom_buffer.clear()
        self._clear_outputs()

    def _update_extrinsic(self, camera_frame: str) -> None:
        if not camera_frame:
            self._throttle.warn("no_frame_id", "image has an empty header.frame_id: cannot look up the camera "
                                               "extrinsic; assuming the camera at the base origin")
            return
        T = self._static_tf.lookup(self.base_frame, camera_frame)
        if T is None:
            self._throttle.warn("no_extrinsic", f"no /tf_static path {self.base_frame} -> {camera_frame} (yet): assuming "
                                                "the camera optical frame at the base origin, looking along base x")
            return
        key = (camera_frame, T.tobytes())
        if key != self._applied_extrinsic:
            self.mapper.set_base_to_camera(T)
            self._applied_extrinsic = key
            self.get_logger().info(f"camera extrinsic {self.base_frame} -> {camera_frame}: translation "
                                   f"{np.round(T[:3, 3], 4).tolist()} (from /tf_static)")

    def _intrinsics_for(self, image_shape) -> Optional[np.ndarray]:
        info = self._camera_info
        if info is None:
            if self.values["use_camera_info_intrinsics"] and not self._warned_no_camera_info:
                self._warned_no_camera_info = True
                self.get_logger().warning("no camera_info received (yet): using the backbone's predicted intrinsics "
                                          "(counted as frames_missing_intrinsics)")
            return None
        K, width, height = info
        if (height, width) != tuple(image_shape[:2]):
            self._count("camera_info_size_mismatch",
                        f"camera_info is for {width}x{height} but the image is {image_shape[1]}x{image_shape[0]}: "
                        "using the backbone's intrinsics")
            return None
        return K

    def _count(self, counter: Optional[str], message: str) -> None:
        with self._counter_lock:
            if counter is not None:
                setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            self.counters.last_error = message
        self._throttle.warn(counter or "error", message)

    # ------------------------------------------------------------------ publishing

    def _publish_window(self, result: WindowResult) -> None:
        if not result.keyframes:
            return
        with self._publish_lock:
            self._publish_window_locked(result)

    def _publish_window_locked(self, result: WindowResult) -> None:
        if result.starts_map:  # a new map (first window, or the mapper lost tracking): no history
            self._path.clear()
            self._last_base_pose = None
        tf_out = []
        own_odometry = self.values["publish_odom_to_base_tf"]
        for kf in result.keyframes:
            stamp = ns_to_time(kf.stamp_ns)
            pose = matrix_to_pose(kf.base_to_map)
            self._path.append(PoseStamped(header=_header(stamp, self.map_frame), pose=pose))
            self._odom_pub.publish(self._odometry(kf.stamp_ns, kf.base_to_map, own_odometry))
            if own_odometry:
                tf_out.append(matrix_to_transform(kf.base_to_map, kf.stamp_ns, self.odom_frame, self.base_frame))
        latest = result.keyframes[-1]
        self._latest_stamp_ns = latest.stamp_ns
        if self.values["publish_map_to_odom_tf"]:
            T_map_odom = self._map_to_odom(latest.stamp_ns, latest.base_to_map, own_odometry)
            if T_map_odom is not None:
                tf_out.append(matrix_to_transform(T_map_odom, latest.stamp_ns + self.transform_tolerance_ns,
                                                  self.map_frame, self.odom_frame))
        if tf_out:
            self._tf_pub.publish(TFMessage(transforms=tf_out))
        self._path_pub.publish(PathMsg(header=_header(ns_to_time(latest.stamp_ns), self.map_frame), poses=list(self._path)))
        self._cloud_pub.publish(cloud_to_msg(result.points_xyz, result.points_rgb, latest.stamp_ns, self.map_frame))
        with self._counter_lock:
            self.counters.windows_published += 1
        self._map_dirty = True
        if time.monotonic() - self._last_map_publish >= self.values["map_publish_period"]:
            self._publish_map()

    def _map_to_odom(self, stamp_ns: int, T_map_base: np.ndarray, own_odometry: bool) -> Optional[np.ndarray]:
        if own_odometry:
            return np.eye(4)
        T_odom_base = self._odom_buffer.lookup(stamp_ns)
        if T_odom_base is None:
            self._count("map_to_odom_missing_odometry",
                        f"no {self.odom_frame} -> {self.base_frame} on /tf around stamp {stamp_ns} ns: map -> odom not "
                        "published for this window (is the odometry node running?)")
            return None
        return T_map_base @ invert_rigid(T_odom_base, tol=1e-4)

    def _odometry(self, stamp_ns: int, T_map_base: np.ndarray, own_odometry: bool) -> Odometry:
        # Without own odometry the pose is only known in the map frame.
        msg = Odometry(header=_header(ns_to_time(stamp_ns), self.odom_frame if own_odometry else self.map_frame),
                       child_frame_id=self.base_frame)
        msg.pose.pose = matrix_to_pose(T_map_base)
        previous = self._last_base_pose
        if previous is not None and stamp_ns > previous[0]:
            # Body-frame velocity from consecutive keyframe poses (keyframes are sparse: a coarse estimate).
            dt = (stamp_ns - previous[0]) * 1e-9
            delta = invert_rigid(previous[1], tol=1e-4) @ T_map_base
            msg.twist.twist.linear.x, msg.twist.twist.linear.y, msg.twist.twist.linear.z = (float(v) for v in delta[:3, 3] / dt)
            angle_axis = _rotation_vector(delta[:3, :3]) / dt
            msg.twist.twist.angular.x, msg.twist.twist.angular.y, msg.twist.twist.angular.z = (float(v) for v in angle_axis)
        self._last_base_pose = (stamp_ns, T_map_base)
        return msg

    def _publish_map(self) -> None:
        if self.mapper is None:
            return
        with self._publish_lock:
            xyz, rgb = self.mapper.voxel_map.points()
            self._map_pub.publish(cloud_to_msg(np.asarray(xyz, np.float32), np.asarray(rgb, np.uint8),
                                               self._latest_stamp_ns, self.map_frame))
            self._map_dirty = False
            self._last_map_publish = time.monotonic()

    def _publish_map_if_due(self) -> None:
        if self._map_dirty and time.monotonic() - self._last_map_publish >= self.values["map_publish_period"]:
            self._publish_map()

    def _clear_outputs(self) -> None:
        """Empty path and map (latched, so late joiners do not see the old run)."""
        with self._publish_lock:
            self._path.clear()
            self._last_base_pose = None
            stamp = ns_to_time(self._latest_stamp_ns)
            self._path_pub.publish(PathMsg(header=_header(stamp, self.map_frame), poses=[]))
            # Empty by construction: after a time jump the mapper clears its map only when its
            # worker next runs.
            self._map_pub.publish(cloud_to_msg(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8),
                                               self._latest_stamp_ns, self.map_frame))
            self._map_dirty = False

    # ------------------------------------------------------------------ diagnostics

    def diagnostics_values(self) -> dict:
        now = time.monotonic()
        with self._counter_lock:
            while self._rate_window and now - self._rate_window[0] > 5.0:
                self._rate_window.popleft()
            rate = len(self._rate_window) / 5.0
            counters = asdict(self.counters)
        values = {"input_rate_hz": round(rate, 2), "queue_depth": len(self._queue),
                  "queue_capacity": self.values["queue_depth"], **counters}
        if self.mapper is not None:
            stats = self.mapper.stats.as_dict()
            decisions = stats.pop("decisions")
            values.update(stats)
            values["trajectory_keyframes"] = len(self.mapper.trajectory)  # mapped keyframes of the current map
            values.update({f"decisions.{k}": v for k, v in sorted(decisions.items())})
        values["backbone"] = self.backbone_name
        values["backbone_error"] = self.backbone_error
        return values

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics_values()
        if self.backbone_error:
            level, message = DiagnosticStatus.ERROR, f"backbone not loaded: {self.backbone_error}"
        elif values["images_received"] == 0:
            level, message = DiagnosticStatus.WARN, "no images received yet"
        elif values.get("windows_mapped", 0) == 0:
            level, message = DiagnosticStatus.OK, "waiting for the first window"
        else:
            level, message = DiagnosticStatus.OK, (f"{values['windows_mapped']} windows, {values['keyframes']} keyframes, "
                                                   f"{values['map_points']} map points")
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: mapping", message=message,
                                  hardware_id=self.backbone_name,
                                  values=[KeyValue(key=k, value=_diag_str(v)) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)

    # ------------------------------------------------------------------ shutdown

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker (it finishes the window in flight) and wait for it."""
        self._stop.set()
        self._worker.join(timeout)


def _mapper_parameter_names() -> set[str]:
    return {f.name for cls in (KeyframeConfig, WindowConfig, MapConfig) for f in fields(cls)}


def _header(stamp, frame_id: str):
    from std_msgs.msg import Header

    return Header(stamp=stamp, frame_id=frame_id)


def _rotation_vector(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_rotvec()


def _diag_str(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def main(argv=None, backbone_factory: Optional[BackboneFactory] = None) -> int:
    """Run the node until SIGINT; returns the process exit code (2 = invalid parameters)."""
    rclpy.init(args=argv if argv is not None else sys.argv)
    try:
        node = MappingNode(backbone_factory=backbone_factory)
    except (ValueError, TypeError, RuntimeError, ParameterException) as exc:
        print(f"{NODE_NAME}: invalid parameters: {exc}", file=sys.stderr, flush=True)
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
