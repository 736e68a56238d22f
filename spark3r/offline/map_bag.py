"""The offline mapper's rosbag2 (mcap) output: what the live node would have published.

Topics (ROS 2 CDR, standard type hashes, so ``ros2 bag play/info``, RViz through rosbag2 and
Foxglove open it):

* ``/tf``         tf2_msgs/TFMessage  odom -> base_link and map -> odom (identity, future-dated by
  ``transform_tolerance`` as the node's) per keyframe
* ``/tf_static``  tf2_msgs/TFMessage  base_link -> camera optical frame, transient-local QoS
* ``/spark3r_mapping/odometry`` nav_msgs/Odometry  base_link pose in odom, body twist and covariances per
  keyframe; while tracking is lost, one per failed window with the last pose and a 9999 covariance
* ``/spark3r_mapping/path``  nav_msgs/Path  all keyframe base poses so far (map), after every window
* ``/spark3r_mapping/cloud`` sensor_msgs/PointCloud2  points each window added (map frame)
* ``/spark3r_mapping/map``   sensor_msgs/PointCloud2  the voxel map, once, at the end

The records come from the same composer as the live node's messages
(:class:`spark3r.mapping.outputs.OutputComposer`); this module only serialises them. Topic and
frame names are the live node's defaults (node ``spark3r_mapping``; REP-105 frames with the
mapper as the odometry source, so map -> odom is the identity), so one RViz or Foxglove layout
serves both. Bag time = the keyframe's source stamp (bag/sensor time).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spark3r.data.bag_io import TF_STATIC_TOPIC, TF_TYPE, header_msg, qos_profile, typestore
from spark3r.geometry import matrix_to_quat_xyzw
from spark3r.data.cloud_layout import CLOUD_FIELDS, POINTFIELD_FLOAT32, cloud_payload
from spark3r.mapping.outputs import CloudRecord, OdometryRecord, PathRecord, PosesUpdate, TransformRecord, WindowOutputs

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

    def __init__(self, path):
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
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
        self._pose_cache: dict[int, tuple[object, object]] = {}  # id(PoseRecord) -> (record, message)
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

    def _vector(self, v):
        return self._ts.types["geometry_msgs/msg/Vector3"](x=float(v[0]), y=float(v[1]), z=float(v[2]))

    def _transform(self, record: TransformRecord):
        t = self._ts.types
        pose = self._pose(record.T)
        transform = t["geometry_msgs/msg/Transform"](
            translation=t["geometry_msgs/msg/Vector3"](x=pose.position.x, y=pose.position.y, z=pose.position.z),
            rotation=pose.orientation)
        return t["geometry_msgs/msg/TransformStamped"](header=header_msg(self._ts, record.stamp_ns, record.parent),
                                                       child_frame_id=record.child, transform=transform)

    def _odometry_msg(self, record: OdometryRecord):
        t = self._ts.types
        return t[ODOMETRY_TYPE](
            header=header_msg(self._ts, record.stamp_ns, record.frame_id), child_frame_id=record.child_frame_id,
            pose=t["geometry_msgs/msg/PoseWithCovariance"](
                pose=self._pose(record.pose), covariance=np.asarray(record.pose_covariance, np.float64).reshape(36)),
            twist=t["geometry_msgs/msg/TwistWithCovariance"](
                twist=t["geometry_msgs/msg/Twist"](linear=self._vector(record.linear), angular=self._vector(record.angular)),
                covariance=np.asarray(record.twist_covariance, np.float64).reshape(36)))

    def _path_msg(self, record: PathRecord):
        # Each pose is converted once: the whole path is written after every window.
        cache = {}
        for pose in record.poses:
            hit = self._pose_cache.get(id(pose))
            cache[id(pose)] = hit if hit is not None and hit[0] is pose else (pose, self._ts.types["geometry_msgs/msg/PoseStamped"](
                header=header_msg(self._ts, pose.stamp_ns, pose.frame_id), pose=self._pose(pose.pose)))
        self._pose_cache = cache
        return self._ts.types[PATH_TYPE](header=header_msg(self._ts, record.stamp_ns, record.frame_id),
                                         poses=[cache[id(pose)][1] for pose in record.poses])

    def _cloud_msg(self, record: CloudRecord):
        t = self._ts.types
        data, count, point_step = cloud_payload(record.xyz, record.rgb)
        fields = [t["sensor_msgs/msg/PointField"](name=name, offset=offset, datatype=POINTFIELD_FLOAT32, count=1)
                  for name, offset in CLOUD_FIELDS]
        return t[CLOUD_TYPE](header=header_msg(self._ts, record.stamp_ns, record.frame_id), height=1, width=count,
                             fields=fields, is_bigendian=False, point_step=point_step, row_step=point_step * count,
                             data=data, is_dense=True)

    def write_static(self, record: TransformRecord) -> None:
        """The camera's pose in base_link, latched."""
        self._write(self._tf_static, record.stamp_ns, self._ts.types[TF_TYPE](transforms=[self._transform(record)]), TF_TYPE)

    def write_window(self, outputs: WindowOutputs) -> None:
        """A window's records: per keyframe its TF message and Odometry (bag time = keyframe
        stamp), then the path and the window's cloud."""
        for kf in outputs.keyframes:
            stamp = kf.odometry.stamp_ns
            if kf.transforms:
                tf = self._ts.types[TF_TYPE](transforms=[self._transform(r) for r in kf.transforms])
                self._write(self._tf, stamp, tf, TF_TYPE)
            self._write(self._odometry, stamp, self._odometry_msg(kf.odometry), ODOMETRY_TYPE)
        self._write(self._path, outputs.path.stamp_ns, self._path_msg(outputs.path), PATH_TYPE)
        self._write(self._cloud, outputs.cloud.stamp_ns, self._cloud_msg(outputs.cloud), CLOUD_TYPE)

    def write_odometry(self, record: OdometryRecord) -> None:
        """An Odometry without a window (tracking lost: the last pose with a large covariance)."""
        self._write(self._odometry, record.stamp_ns, self._odometry_msg(record), ODOMETRY_TYPE)

    def write_poses_update(self, update: PosesUpdate) -> None:
        """After the back end moved published poses (a loop closure, a relocalization): the Path
        with the corrected poses and the rebuilt map, as the node republishes them."""
        self._write(self._path, update.path.stamp_ns, self._path_msg(update.path), PATH_TYPE)
        self.write_map(update.map)

    def write_map(self, record: CloudRecord) -> None:
        self._write(self._map, record.stamp_ns, self._cloud_msg(record), CLOUD_TYPE)
