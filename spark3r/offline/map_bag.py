"""The offline mapper's rosbag2 (mcap) output: what the live node would have published.

Topics (ROS 2 CDR, standard type hashes, so ``ros2 bag play/info``, RViz through rosbag2 and
Foxglove open it):

* ``/tf``         tf2_msgs/TFMessage  odom -> base_link and map -> odom (identity) per keyframe
* ``/tf_static``  tf2_msgs/TFMessage  base_link -> camera optical frame, transient-local QoS
* ``/spark3r_mapping/odometry`` nav_msgs/Odometry  base_link pose in odom per keyframe
* ``/spark3r_mapping/path``  nav_msgs/Path  all keyframe base poses so far (map), after every window
* ``/spark3r_mapping/cloud`` sensor_msgs/PointCloud2  points each window added (map frame)
* ``/spark3r_mapping/map``   sensor_msgs/PointCloud2  the voxel map, once, at the end

Topic and frame names are the live node's defaults (node ``spark3r_mapping``; REP-105 frames
with the mapper as the odometry source, so map -> odom is the identity), so one RViz or Foxglove
layout serves both. Bag time = header stamp = the keyframe's source stamp (bag/sensor time).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spark3r.data.bag_io import TF_STATIC_TOPIC, TF_TYPE, header_msg, qos_profile, typestore
from spark3r.geometry import matrix_to_quat_xyzw
from spark3r.data.cloud_layout import CLOUD_FIELDS, POINTFIELD_FLOAT32, cloud_payload

TF_TOPIC = "/tf"
NODE_NAMESPACE = "/spark3r_mapping"
ODOMETRY_TOPIC = f"{NODE_NAMESPACE}/odometry"
PATH_TOPIC = f"{NODE_NAMESPACE}/path"
CLOUD_TOPIC = f"{NODE_NAMESPACE}/cloud"
MAP_TOPIC = f"{NODE_NAMESPACE}/map"
CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
PATH_TYPE = "nav_msgs/msg/Path"
ODOMETRY_TYPE = "nav_msgs/msg/Odometry"


class MapBagWriter:
    """Writes a rosbag2 directory with an mcap file at ``path`` (which must not exist).

    Use as a context manager or call :meth:`close`; :meth:`abort` leaves an unusable bag, so
    callers write into a staging directory (the offline runner does).
    """

    def __init__(self, path, map_frame: str = "map", base_frame: str = "base_link",
                 camera_frame: str = "camera_optical_frame", odom_frame: str = "odom"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        self.map_frame, self.odom_frame = map_frame, odom_frame
        self.base_frame, self.camera_frame = base_frame, camera_frame
        self._ts = typestore()
        self._writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        volatile = [qos_profile(transient_local=False, depth=10)]
        add = lambda topic, msgtype, qos=volatile: self._writer.add_connection(  # noqa: E731
            topic, msgtype, typestore=self._ts, offered_qos_profiles=qos)
        self._tf = add(TF_TOPIC, TF_TYPE)
        self._tf_static = add(TF_STATIC_TOPIC, TF_TYPE, [qos_profile(transient_local=True, depth=1)])
        self._odometry = add(ODOMETRY_TOPIC, ODOMETRY_TYPE)
        self._path = add(PATH_TOPIC, PATH_TYPE, [qos_profile(transient_local=True, depth=1)])  # latched, as the node's
        self._cloud = add(CLOUD_TOPIC, CLOUD_TYPE)
        self._map = add(MAP_TOPIC, CLOUD_TYPE, [qos_profile(transient_local=True, depth=1)])  # latched, as the node's
        self._path_poses: list = []
        self.messages = 0

    def __enter__(self) -> "MapBagWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()

    # -- messages -----------------------------------------------------------------------------

    def _write(self, conn, stamp_ns: int, msg, msgtype: str) -> None:
        self._writer.write(conn, int(stamp_ns), self._ts.serialize_cdr(msg, msgtype))
        self.messages += 1

    def _pose(self, T: np.ndarray):
        t = self._ts.types
        q = matrix_to_quat_xyzw(T[:3, :3])
        return t["geometry_msgs/msg/Pose"](
            position=t["geometry_msgs/msg/Point"](x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
            orientation=t["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))

    def _transform(self, stamp_ns: int, parent: str, child: str, T: np.ndarray):
        t = self._ts.types
        pose = self._pose(T)
        transform = t["geometry_msgs/msg/Transform"](
            translation=t["geometry_msgs/msg/Vector3"](x=pose.position.x, y=pose.position.y, z=pose.position.z),
            rotation=pose.orientation)
        return t["geometry_msgs/msg/TransformStamped"](header=header_msg(self._ts, stamp_ns, parent),
                                                       child_frame_id=child, transform=transform)

    def write_static(self, stamp_ns: int, base_to_camera: np.ndarray) -> None:
        """The camera's pose in base_link, latched."""
        msg = self._ts.types[TF_TYPE](transforms=[self._transform(stamp_ns, self.base_frame, self.camera_frame, base_to_camera)])
        self._write(self._tf_static, stamp_ns, msg, TF_TYPE)

    def write_keyframe(self, stamp_ns: int, base_to_map: np.ndarray) -> None:
        """TF odom -> base_link + map -> odom and an Odometry for one mapped keyframe."""
        t = self._ts.types
        tf = t[TF_TYPE](transforms=[self._transform(stamp_ns, self.odom_frame, self.base_frame, base_to_map),
                                    self._transform(stamp_ns, self.map_frame, self.odom_frame, np.eye(4))])
        self._write(self._tf, stamp_ns, tf, TF_TYPE)
        zero = t["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
        odom = t[ODOMETRY_TYPE](
            header=header_msg(self._ts, stamp_ns, self.odom_frame), child_frame_id=self.base_frame,
            pose=t["geometry_msgs/msg/PoseWithCovariance"](pose=self._pose(base_to_map), covariance=np.zeros(36)),
            twist=t["geometry_msgs/msg/TwistWithCovariance"](
                twist=t["geometry_msgs/msg/Twist"](linear=zero, angular=zero), covariance=np.zeros(36)))
        self._write(self._odometry, stamp_ns, odom, ODOMETRY_TYPE)
        self._path_poses.append(t["geometry_msgs/msg/PoseStamped"](
            header=header_msg(self._ts, stamp_ns, self.map_frame), pose=self._pose(base_to_map)))

    def write_path(self, stamp_ns: int) -> None:
        """The keyframe path so far (call after the keyframes of a window)."""
        msg = self._ts.types[PATH_TYPE](header=header_msg(self._ts, stamp_ns, self.map_frame), poses=list(self._path_poses))
        self._write(self._path, stamp_ns, msg, PATH_TYPE)

    def _cloud_msg(self, stamp_ns: int, xyz, rgb):
        t = self._ts.types
        data, count, point_step = cloud_payload(xyz, rgb)
        fields = [t["sensor_msgs/msg/PointField"](name=name, offset=offset, datatype=POINTFIELD_FLOAT32, count=1)
                  for name, offset in CLOUD_FIELDS]
        return t[CLOUD_TYPE](header=header_msg(self._ts, stamp_ns, self.map_frame), height=1, width=count, fields=fields,
                             is_bigendian=False, point_step=point_step, row_step=point_step * count, data=data,
                             is_dense=True)

    def write_window_cloud(self, stamp_ns: int, xyz, rgb) -> None:
        self._write(self._cloud, stamp_ns, self._cloud_msg(stamp_ns, xyz, rgb), CLOUD_TYPE)

    def write_map(self, stamp_ns: int, xyz, rgb) -> None:
        self._write(self._map, stamp_ns, self._cloud_msg(stamp_ns, xyz, rgb), CLOUD_TYPE)
