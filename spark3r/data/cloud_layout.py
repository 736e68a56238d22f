"""The one PointCloud2 layout spark3r writes, ROS-free.

x, y, z as little-endian float32 at offsets 0/4/8 and, with colour, the colour packed as
0x00RRGGBB in a field named ``rgb`` declared FLOAT32 at offset 12 (the PCL/RViz convention);
point_step 16 (12 without colour), height 1, dense. The live node
(``spark3r_ros.conversions.cloud_to_msg``) and the offline mcap writer both build their messages
from this module.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

POINTFIELD_FLOAT32 = 7  # sensor_msgs/PointField.FLOAT32
XYZ_FIELDS = (("x", 0), ("y", 4), ("z", 8))  # (name, byte offset), FLOAT32, count 1
CLOUD_FIELDS = XYZ_FIELDS + (("rgb", 12),)
POINT_STEP = 16
XYZ_POINT_STEP = 12


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [N, 3]`` -> ``uint32 [N]`` 0x00RRGGBB."""
    rgb = rgb.astype(np.uint32, copy=False)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """``uint32 [N]`` 0x00RRGGBB (alpha byte ignored) -> ``uint8 [N, 3]``."""
    packed = packed.astype(np.uint32, copy=False)
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF], axis=1).astype(np.uint8)


def cloud_payload(xyz, rgb: Optional[np.ndarray]) -> tuple[np.ndarray, int, int]:
    """Point records for ``xyz float [N, 3]`` (+ ``rgb uint8 [N, 3]`` or None) as a flat
    ``uint8`` array, the number of points and the point step. Points with a non-finite
    coordinate are dropped with their colours, so the cloud is dense."""
    xyz = np.asarray(xyz)
    if not np.issubdtype(xyz.dtype, np.floating):
        raise TypeError(f"xyz must be a floating point array, got {xyz.dtype}")
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape [N, 3], got {xyz.shape}")
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.shape != xyz.shape:
            raise ValueError(f"rgb must be uint8 [N, 3] matching xyz {xyz.shape}, got {rgb.dtype} {rgb.shape}")
    finite = np.isfinite(xyz).all(axis=1)
    xyz32 = np.ascontiguousarray(xyz[finite], dtype="<f4")
    if rgb is None:
        return xyz32.view(np.uint8).reshape(-1), len(xyz32), XYZ_POINT_STEP
    # One uint32 word per field: the float bits of x, y, z and the packed colour.
    records = np.empty((len(xyz32), 4), dtype="<u4")
    records[:, :3] = xyz32.view("<u4")
    records[:, 3] = pack_rgb(rgb[finite])
    return records.view(np.uint8).reshape(-1), len(records), POINT_STEP
