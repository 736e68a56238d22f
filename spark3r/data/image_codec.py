"""sensor_msgs Image / CompressedImage payloads <-> RGB numpy arrays, without ROS.

The functions take the message fields, not message objects, so the same code serves rosbags
messages (bags) and rclpy messages (the live node). Output images are always uint8 [H,W,3] RGB.
"""
from __future__ import annotations

import numpy as np

# encoding -> (channels, bytes per channel); only colour or grey camera encodings: depth images
# (16UC1, 32FC1) are not pictures and are rejected rather than turned into grey noise.
_RAW_LAYOUTS = {
    "rgb8": (3, 1), "bgr8": (3, 1), "rgba8": (4, 1), "bgra8": (4, 1), "mono8": (1, 1),
    "8UC3": (3, 1), "8UC1": (1, 1), "mono16": (1, 2), "rgb16": (3, 2), "bgr16": (3, 2),
    "yuv422": (2, 1), "uyvy": (2, 1), "yuv422_yuy2": (2, 1), "yuyv": (2, 1),
}
WRITABLE_ENCODINGS = ("rgb8", "bgr8", "mono8")
COMPRESSED_FORMATS = ("jpeg", "png")


def _payload_bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype != np.uint8 else data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    # rclpy gives array.array('B') or a list for uint8[] fields
    return np.frombuffer(bytes(data), dtype=np.uint8)


def raw_to_rgb(data, height: int, width: int, encoding: str, step: int = 0, is_bigendian: bool = False) -> np.ndarray:
    """Decode a sensor_msgs/Image payload into uint8 RGB [H,W,3].

    Handles row padding (``step`` larger than a packed row), 16-bit data in either byte order
    (scaled to 8 bits) and the packed YUV 4:2:2 camera formats.
    """
    if encoding not in _RAW_LAYOUTS:
        raise ValueError(f"unsupported image encoding {encoding!r}; expected one of {sorted(_RAW_LAYOUTS)}")
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({height}x{width})")
    channels, depth_bytes = _RAW_LAYOUTS[encoding]
    row_bytes = width * channels * depth_bytes
    step = int(step) or row_bytes
    if step < row_bytes:
        raise ValueError(f"image step {step} is smaller than a {encoding} row of {width} pixels ({row_bytes} bytes)")
    buf = _payload_bytes(data)
    if buf.size < step * (height - 1) + row_bytes:
        raise ValueError(f"image data has {buf.size} bytes, expected {step * height} for {height} rows of step {step}")
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row_bytes), strides=(step, 1))
    if depth_bytes == 2:
        pixels = rows.copy().view(">u2" if is_bigendian else "<u2")
        pixels = (pixels >> 8).astype(np.uint8)  # keep the most significant byte
    else:
        pixels = rows
    import cv2

    if encoding in ("yuv422", "uyvy"):
        return cv2.cvtColor(np.ascontiguousarray(pixels).reshape(height, width, 2), cv2.COLOR_YUV2RGB_UYVY)
    if encoding in ("yuv422_yuy2", "yuyv"):
        return cv2.cvtColor(np.ascontiguousarray(pixels).reshape(height, width, 2), cv2.COLOR_YUV2RGB_YUY2)
    img = pixels.reshape(height, width, channels)
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if encoding.startswith("bgr"):
        img = img[..., 2::-1]
    return np.ascontiguousarray(img[..., :3])


def compressed_to_rgb(data, fmt: str = "") -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage payload (JPEG/PNG/...) into uint8 RGB [H,W,3].

    The codec is recognised from the bytes, so the free-form ``format`` field ("jpeg",
    "rgb8; jpeg compressed bgr8", ...) is only used in error messages.
    """
    import cv2

    buf = _payload_bytes(data)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise ValueError(f"could not decode compressed image ({buf.size} bytes, format {fmt!r})")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    code = cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(img, code)


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {rgb.shape}")
    return rgb


def rgb_to_raw(rgb, encoding: str = "rgb8") -> tuple[np.ndarray, int]:
    """uint8 RGB [H,W,3] -> (packed payload as a flat uint8 array, row step in bytes)."""
    rgb = _check_rgb(rgb)
    if encoding == "rgb8":
        out = rgb
    elif encoding == "bgr8":
        out = rgb[..., ::-1]
    elif encoding == "mono8":
        import cv2

        out = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"cannot encode RGB as {encoding!r}; expected one of {WRITABLE_ENCODINGS}")
    out = np.ascontiguousarray(out)
    return out.reshape(-1), out.shape[1] * (out.shape[2] if out.ndim == 3 else 1)


def rgb_to_compressed(rgb, fmt: str = "jpeg", jpeg_quality: int = 95) -> tuple[bytes, str]:
    """uint8 RGB -> (encoded bytes, CompressedImage.format) as compressed_image_transport writes it."""
    import cv2

    rgb = _check_rgb(rgb)
    if fmt not in COMPRESSED_FORMATS:
        raise ValueError(f"unsupported compressed format {fmt!r}; expected one of {COMPRESSED_FORMATS}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if fmt == "jpeg" else []
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"{fmt} encoding failed for an image of shape {rgb.shape}")
    # Same wording as image_transport's compressed plugin: source encoding; codec compressed bgr8.
    return buf.tobytes(), f"rgb8; {fmt} compressed bgr8"
