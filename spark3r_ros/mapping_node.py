"""The spark3r mapping node: camera images in; REP-105 TF, odometry, path, clouds and a voxel map out.

    python -m spark3r_ros.mapping_node --ros-args --params-file config/mapping.yaml
    ros2 run spark3r_ros mapping_node --ros-args --params-file ...        (colcon install)

Threads: the executor only stores incoming messages (images go into a bounded queue that drops
its oldest entry when full); one worker thread decodes images, runs the keyframe gate and the
backbone (:class:`spark3r.mapping.Mapper`) and publishes each window's result. Services and
timers run on the executor, so they answer while a window is being inferred.

What is published is computed in the core: parameters come from the config dataclasses
(:mod:`spark3r_ros.parameters`), each window's TF / Odometry / Path / cloud records from
:class:`spark3r.mapping.outputs.OutputComposer` (frames and REP-105 policy are documented there;
the offline ``mapping.bag`` is written from the same records). This module holds the ROS objects:
publishers, subscriptions, QoS, services, timers and the worker thread. Without
``publish_odom_to_base_tf`` another node owns ``odom -> base_link``; the node reads it from
``/tf`` (:class:`~spark3r_ros.odom_tf_buffer.OdomTfBuffer`) at each keyframe stamp.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry, Path as PathMsg
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from spark3r.mapping import BackboneConfig, Frame, Mapper, MapperConfig, WindowResult
from spark3r.mapping.keyframes import REJECT_BAD_IMAGE, REJECT_IMAGE_SIZE
from spark3r.mapping.outputs import OutputComposer
from spark3r_ros.conversions import (PathConverter, camera_info_to_intrinsics, cloud_record_to_msg, compressed_to_rgb,
                                     image_to_rgb, odometry_record_to_msg, time_to_ns, transform_record_to_msg)
from spark3r_ros.node_support import (FrameQueue, NodeCounters, RateMeter, WarningThrottle, diagnostic_summary,
                                      diagnostic_text)
from spark3r_ros.odom_tf_buffer import OdomTfBuffer
from spark3r_ros.parameters import NodeSettings, all_parameter_docs, all_parameter_specs, parameter_descriptor
from spark3r_ros.static_tf import StaticTransformCache, subscribe_static_tf

NODE_NAME = "spark3r_mapping"
DIAGNOSTICS_PERIOD_S = 1.0
_DIAGNOSTIC_LEVELS = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN, "error": DiagnosticStatus.ERROR}

BackboneFactory = Callable[[BackboneConfig, MapperConfig], object]

__all__ = ["NODE_NAME", "FrameQueue", "MappingNode", "NodeCounters", "all_parameter_docs", "main"]


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
        self.settings = NodeSettings.from_values(self.values)
        self.mapper_config, self.backbone_config = self.settings.mapper, self.settings.backbone
        self.counters = NodeCounters()
        self._counter_lock = threading.Lock()
        self._throttle = WarningThrottle(self.get_logger())
        outputs = self.settings.outputs
        self.map_frame, self.odom_frame, self.base_frame = outputs.map_frame, outputs.odom_frame, outputs.base_frame
        self.composer = OutputComposer(outputs)

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
        self._path_msg = PathConverter()
        self._map_dirty = False
        self._last_map_publish = -math.inf
        self._publish_lock = threading.RLock()  # composer, path and map state: worker, services and timers
        self._input_rate = RateMeter()
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
        return {name: self.declare_parameter(name, spec.default, parameter_descriptor(spec)).value
                for name, spec in all_parameter_specs().items()}

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
        if self.composer.needs_external_odometry:
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
        self._input_rate.record()
        with self._counter_lock:
            self.counters.images_received += 1
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
        lookup = self._odom_buffer.lookup if self._odom_buffer is not None else None
        outputs = self.composer.compose_window(result, odom_to_base=lookup)
        for stamp_ns in outputs.missing_odometry:
            self._count("map_to_odom_missing_odometry",
                        f"no {self.odom_frame} -> {self.base_frame} on /tf around stamp {stamp_ns} ns: map -> odom not "
                        "published for this keyframe (is the odometry node running?)")
        for kf in outputs.keyframes:
            self._odom_pub.publish(odometry_record_to_msg(kf.odometry))
        if outputs.transforms:
            self._tf_pub.publish(TFMessage(transforms=[transform_record_to_msg(t) for t in outputs.transforms]))
        self._path_pub.publish(self._path_msg(outputs.path))
        self._cloud_pub.publish(cloud_record_to_msg(outputs.cloud))
        with self._counter_lock:
            self.counters.windows_published += 1
        self._map_dirty = True
        if time.monotonic() - self._last_map_publish >= self.values["map_publish_period"]:
            self._publish_map()

    def _publish_map(self) -> None:
        if self.mapper is None:
            return
        with self._publish_lock:
            self._map_pub.publish(cloud_record_to_msg(self.composer.map_cloud(*self.mapper.voxel_map.points())))
            self._map_dirty = False
            self._last_map_publish = time.monotonic()

    def _publish_map_if_due(self) -> None:
        if self._map_dirty and time.monotonic() - self._last_map_publish >= self.values["map_publish_period"]:
            self._publish_map()

    def _clear_outputs(self) -> None:
        """Empty path and map (latched, so late joiners do not see the old run)."""
        with self._publish_lock:
            self.composer.reset()
            self._path_pub.publish(self._path_msg(self.composer.path()))
            # Empty by construction: after a time jump the mapper clears its map only when its
            # worker next runs.
            self._map_pub.publish(cloud_record_to_msg(self.composer.empty_map_cloud()))
            self._map_dirty = False

    # ------------------------------------------------------------------ diagnostics

    def diagnostics_values(self) -> dict:
        with self._counter_lock:
            counters = asdict(self.counters)
        values = {"input_rate_hz": round(self._input_rate.rate(), 2), "queue_depth": len(self._queue),
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
        level, message = diagnostic_summary(values, self.backbone_error)
        status = DiagnosticStatus(level=_DIAGNOSTIC_LEVELS[level], name=f"{self.get_name()}: mapping", message=message,
                                  hardware_id=self.backbone_name,
                                  values=[KeyValue(key=k, value=diagnostic_text(v)) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)

    # ------------------------------------------------------------------ shutdown

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker (it finishes the window in flight) and wait for it."""
        self._stop.set()
        self._worker.join(timeout)


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
