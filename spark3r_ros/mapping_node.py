"""The spark3r mapping node: camera images in; REP-105 TF, odometry, path, clouds and a voxel map out.

    python -m spark3r_ros.mapping_node --ros-args --params-file config/mapping.yaml
    ros2 run spark3r_ros mapping_node --ros-args --params-file ...        (colcon install)

Threads (:class:`~spark3r_ros.node_support.MappingPipeline`): the executor only stores incoming
messages (images go into a bounded queue that drops its oldest entry when full); the intake thread
decodes every image and runs the keyframe gate (:meth:`spark3r.mapping.Mapper.offer`) at camera
rate; accepted keyframes wait in the mapper's bounded pending store while the inference thread runs
the backbone (:meth:`~spark3r.mapping.Mapper.process_pending`) and publishes each window's result.
Services and timers run on the executor, so they answer while a window is being inferred.

What is published is computed in the core: parameters come from the config dataclasses
(:mod:`spark3r_ros.parameters`), each window's TF / Odometry / Path / cloud records from
:class:`spark3r.mapping.outputs.OutputComposer` (frames and REP-105 policy are documented there;
the offline ``mapping.bag`` is written from the same records; with the SLAM back end also the
``map -> odom`` correction and the "poses updated" Path/map after a loop closure or relocalization).
Sessions (``~/save_map``, ``~/load_map``, ``localization_only``) are the mapper's; the ROS-free
service bodies are in :mod:`spark3r_ros.node_support`. This module holds the ROS objects:
publishers, subscriptions, QoS, services, timers and the pipeline threads. Without
``publish_odom_to_base_tf`` another node owns ``odom -> base_link``; the node reads it from
``/tf`` (:class:`~spark3r_ros.odom_tf_buffer.OdomTfBuffer`) at each keyframe stamp.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import asdict
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
from spark3r.mapping.outputs import OutputComposer, backend_poses
from spark3r.mapping.tracking import poses_moved, window_failed
from spark3r_ros.conversions import (PathConverter, camera_info_to_intrinsics, cloud_record_to_msg, compressed_to_rgb,
                                     image_to_rgb, odometry_record_to_msg, time_to_ns, transform_record_to_msg)
from spark3r_ros.node_support import (FrameQueue, MappingPipeline, NodeCounters, RateMeter, WarningThrottle,
                                      camera_info_intrinsics, diagnostic_summary, diagnostic_text, load_map,
                                      mapper_diagnostics, save_map, static_extrinsic)
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
        self._last_stamp_ns: Optional[int] = None
        self._backlog_drops_seen = 0
        self._path_msg = PathConverter()
        self._map_dirty = False
        self._last_map_publish = -math.inf
        self._publish_lock = threading.RLock()  # composer, path, map, map epoch: inference, intake, services, timers
        self._input_rate = RateMeter()
        self._pipeline = MappingPipeline(self._queue, self._intake, self.mapper, self._publish_outcome, self._on_stage_error)

        self._create_interfaces()
        if self.values["load_directory"]:
            self._answer(Trigger.Response(), self._load_session)
        elif self.values["localization_only"]:
            self.get_logger().warning("localization_only: no map to localize in (load_directory is empty); mapping "
                                      "until ~/load_map loads one")
        self._pipeline.start()
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
        self.create_service(Trigger, "~/reset", lambda _, response: self._answer(response, self._reset),
                            callback_group=services)
        self.create_service(Trigger, "~/save_map", lambda _, response: self._answer(
            response, lambda: save_map(self.mapper, self.values["save_directory"])), callback_group=services)
        self.create_service(Trigger, "~/load_map", lambda _, response: self._answer(response, self._load_session),
                            callback_group=services)

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

    def _reset(self) -> str:
        with self._publish_lock:
            self._pipeline.new_map()  # a window finishing during the reset belongs to the old map
        self._queue.clear()
        self.mapper.reset()
        self._clear_outputs()
        return "map reset on request: map, trajectory and queue cleared"

    def _answer(self, response, action: Callable[[], str]):
        """Fill a Trigger response from ``action`` (its message; OSError/ValueError: failure), logged."""
        if self.mapper is None:
            response.success, response.message = False, f"backbone not loaded ({self.backbone_error}): restart the node"
        else:
            try:
                response.success, response.message = True, action()
            except (OSError, ValueError) as exc:
                response.success, response.message = False, str(exc)
        (self.get_logger().info if response.success else self.get_logger().error)(response.message)
        return response

    def _load_session(self) -> str:
        """Replace the map with the session at ``load_directory`` (``localization_only`` applies)."""
        with self._publish_lock:
            self._pipeline.new_map()  # a window finishing during the load belongs to the old map
        self._queue.clear()
        message = load_map(self.mapper, self.values["load_directory"], self.values["localization_only"])
        self._clear_outputs()
        self.composer.tracking.adopt(self.mapper.tracking_state)  # LOST until relocalized in the loaded map
        self._publish_map()
        with self._counter_lock:
            self.counters.sessions_loaded += 1
        return message

    # ------------------------------------------------------------------ the pipeline stages

    def _on_stage_error(self, stage: str, exc: Exception) -> None:
        message = f"unexpected error in the {stage} thread: {type(exc).__name__}: {exc}"
        if self.context.ok():  # else shutting down: publishers are gone
            self._count(None, message)
            self.get_logger().error(message)

    def _intake(self, msg) -> bool:
        """Intake thread, every image: decode, extrinsic, keyframe gate. True if a keyframe was accepted."""
        if self.mapper is None:
            self._count("images_dropped_no_backbone", f"dropping images: the backbone is not loaded ({self.backbone_error})")
            return False
        try:
            rgb = compressed_to_rgb(msg) if self._compressed else image_to_rgb(msg)
        except (ValueError, TypeError) as exc:
            self._count("images_bad", f"dropping an image that cannot be decoded: {exc}")
            return False
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
        drops = self.mapper.stats.keyframes_dropped_backlog if decision.accepted else 0
        if drops > self._backlog_drops_seen:
            self._backlog_drops_seen = drops
            self._throttle.warn("backlog", f"the backbone is slower than the keyframes: dropped the oldest pending keyframe "
                                           f"({drops} so far, max_pending_keyframes={self._pipeline.pending_capacity})")
        return decision.accepted

    def _publish_outcome(self, epoch: int, before, after, result: Optional[WindowResult]) -> None:
        """Inference thread, after every ``process_pending`` call."""
        nonfinite = after.nonfinite_depth_pixels - before.nonfinite_depth_pixels
        if nonfinite:
            self._throttle.warn("nonfinite_depth", f"the backbone returned {nonfinite} NaN/inf depth values in the "
                                                   "last window; they are not mapped (counted as nonfinite_depth_pixels)")
        # Read from the back end before the publishing lock (its reads take the mapper's worker lock).
        backend = backend_poses(self.mapper) if result is not None and result.keyframes else None
        moved = poses_moved(before, after)
        if moved:  # a loop or relocalization moved published keyframes: their map points move now
            self.mapper.refresh_map()
        with self._publish_lock:
            if epoch != self._pipeline.map_epoch:
                return  # ~/reset or a time jump while this window ran: it belongs to the old map
            if result is not None and result.keyframes:
                self._publish_window_locked(result, backend)
            if moved:
                update = self.composer.compose_poses_updated(self.mapper.trajectory, *self.mapper.voxel_map.points())
                self._path_pub.publish(self._path_msg(update.path))
                self._map_pub.publish(cloud_record_to_msg(update.map))
                self._map_dirty, self._last_map_publish = False, time.monotonic()
            elif window_failed(before, after, result) and (lost := self.composer.compose_lost(after.last_window_stamp_ns)):
                self._odom_pub.publish(odometry_record_to_msg(lost))
                self._throttle.warn("lost", "tracking LOST: the last window gave no poses (alignment rejected or output "
                                            "dropped); odometry holds the last pose with a large covariance")

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
        T, problem = static_extrinsic(self._static_tf, self.base_frame, camera_frame)
        if T is None:
            self._throttle.warn(problem[0], problem[1])
        elif (camera_frame, T.tobytes()) != self._applied_extrinsic:
            self.mapper.set_base_to_camera(T)
            self._applied_extrinsic = (camera_frame, T.tobytes())
            self.get_logger().info(f"camera extrinsic {self.base_frame} -> {camera_frame}: translation "
                                   f"{np.round(T[:3, 3], 4).tolist()} (from /tf_static)")

    def _intrinsics_for(self, image_shape) -> Optional[np.ndarray]:
        K, problem = camera_info_intrinsics(self._camera_info, image_shape)
        if problem == "none" and self.values["use_camera_info_intrinsics"] and not self._warned_no_camera_info:
            self._warned_no_camera_info = True
            self.get_logger().warning("no camera_info received (yet): using the backbone's predicted intrinsics "
                                      "(counted as frames_missing_intrinsics)")
        elif problem and problem != "none":
            self._count("camera_info_size_mismatch", problem)
        return K

    def _count(self, counter: Optional[str], message: str) -> None:
        with self._counter_lock:
            if counter is not None:
                setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            self.counters.last_error = message
        self._throttle.warn(counter or "error", message)

    # ------------------------------------------------------------------ publishing

    def _publish_window_locked(self, result: WindowResult, backend) -> None:
        lookup = self._odom_buffer.lookup if self._odom_buffer is not None else None
        outputs = self.composer.compose_window(result, odom_to_base=lookup, backend=backend)
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
            self._pipeline.new_map()
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
                  "queue_capacity": self.values["queue_depth"],
                  "pending_capacity": self._pipeline.pending_capacity,
                  "inference_running": int(self._pipeline.inference_running), **counters}
        with self._publish_lock:
            values.update(self.composer.tracking_values())
        if self.mapper is not None:
            values.update(mapper_diagnostics(self.mapper))
        values.update(backbone=self.backbone_name, backbone_error=self.backbone_error)
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
        """Stop the intake and inference threads (a window in flight is finished) and wait for them."""
        self._pipeline.stop(timeout)


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
