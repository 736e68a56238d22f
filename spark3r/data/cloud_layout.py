"""The one PointCloud2 layout spark3r writes, ROS-free.

x, y, z as little-endian float32 at offsets 0/4/8 and the colour packed as 0x00RRGGBB in a field
named ``rgb`` declared FLOAT32 at offset 12 (the PCL/RViz convention), point_step 16, height 1.
``spark3r_ros.conversions.cloud_to_msg`` produces the same bytes for the live node; the offline
writer builds its messages from these constants (a test checks both agree byte for byte).
"""
from __future__ import annotations

import numpy as np

POINTFIELD_FLOAT32 = 7  # sensor_msgs/PointField.FLOAT32
CLOUD_FIELDS = (("x", 0), ("y", 4), ("z", 8), ("rgb", 12))  # (name, byte offset), all FLOAT32, count 1
POINT_STEP = 16


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [N, 3]`` -> ``uint32 [N]`` 0x00RRGGBB."""
    rgb = rgb.astype(np.uint32, copy=False)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def cloud_payload(xyz, rgb) -> tuple[np.ndarray, int]:
    """Point records for ``xyz float [N, 3]`` + ``rgb uint8 [N, 3]`` as ``uint8 [N * 16]`` and the
    number of points; points with a non-finite coordinate are dropped so the cloud is dense."""
    xyz = np.asarray(xyz)
    rgb = np.asarray(rgb)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or not np.issubdtype(xyz.dtype, np.floating):
        raise ValueError(f"xyz must be a float array of shape [N, 3], got {xyz.dtype} {xyz.shape}")
    if rgb.dtype != np.uint8 or rgb.shape != xyz.shape:
        raise ValueError(f"rgb must be uint8 [N, 3] matching xyz {xyz.shape}, got {rgb.dtype} {rgb.shape}")
    finite = np.isfinite(xyz).all(axis=1)
    records = np.empty((int(finite.sum()), 4), dtype="<u4")
    records[:, :3] = np.ascontiguousarray(xyz[finite], dtype="<f4").view("<u4")
    records[:, 3] = pack_rgb(rgb[finite])
    return records.view(np.uint8).reshape(-1), len(records)
