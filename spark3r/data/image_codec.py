"""sensor_msgs Image / CompressedImage payloads <-> RGB numpy arrays, without ROS.

The functions take the message fields, not message objects, so the same code can serve rosbags
messages (bags) and rclpy messages (the live node). Output images are always uint8 [H,W,3] RGB.
The policy matches ``spark3r_ros.conversions.image_to_rgb``: colour and mono8 images are
accepted, 16-bit and float (depth-like) encodings are refused rather than scaled to 8 bits.
"""
from __future__ import annotations

import numpy as np

# encoding -> channels in the packed payload (all 8-bit); YUV 4:2:2 packs 2 bytes per pixel.
_RAW_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC3": 3, "8UC1": 1,
                 "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2}
_NOT_PICTURES = ("mono16", "16UC1", "32FC1", "rgb16", "bgr16", "rgba16", "bgra16")
WRITABLE_ENCODINGS = ("rgb8", "bgr8", "mono8")
COMPRESSED_FORMATS = ("jpeg", "png")


def _payload_bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype != np.uint8 else data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    # rclpy gives array.array('B') or a list for uint8[] fields
    return np.frombuffer(bytes(data), dtype=np.uint8)


def decode_raw_image(data, height: int, width: int, encoding: str, step: int = 0) -> np.ndarray:
    """Decode a sensor_msgs/Image payload into uint8 RGB [H,W,3].

    Handles row padding (``step`` larger than a packed row; 0 means packed) and the packed
    YUV 4:2:2 camera formats. ``data`` must hold exactly ``step * height`` bytes.
    """
    if encoding in _NOT_PICTURES:
        raise ValueError(f"encoding {encoding} is not an 8-bit colour image; expected one of "
                         f"{sorted(_RAW_CHANNELS)} (depth and 16-bit images need an explicit conversion)")
    if encoding not in _RAW_CHANNELS:
        raise ValueError(f"unsupported image encoding {encoding!r}; expected one of {sorted(_RAW_CHANNELS)}")
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({height}x{width})")
    channels = _RAW_CHANNELS[encoding]
    row_bytes = width * channels
    step = int(step) or row_bytes
    if step < row_bytes:
        raise ValueError(f"image step {step} is smaller than a {encoding} row of {width} pixels ({row_bytes} bytes)")
    buf = _payload_bytes(data)
    if buf.size != step * height:
        raise ValueError(f"image data has {buf.size} bytes, expected step*height = {step}*{height} = {step * height} "
                         f"({encoding} {width}x{height})")
    pixels = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    import cv2

    if encoding in ("yuv422", "uyvy"):
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_YUV2RGB_UYVY)
    if encoding in ("yuv422_yuy2", "yuyv"):
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_YUV2RGB_YUY2)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if encoding.startswith("bgr"):
        pixels = pixels[..., 2::-1]
    return np.ascontiguousarray(pixels[..., :3])


def decode_compressed_image(data, fmt: str = "") -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage payload (JPEG or PNG) into uint8 RGB [H,W,3].

    The codec is recognised from the bytes; the free-form ``format`` field ("jpeg",
    "rgb8; jpeg compressed bgr8", ...) only serves to refuse compressedDepth streams.
    """
    import cv2

    if "compresseddepth" in fmt.lower():
        raise ValueError(f"compressedDepth images ({fmt!r}) are depth, not colour; expected a jpeg or png colour image")
    buf = _payload_bytes(data)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise ValueError(f"could not decode compressed image ({buf.size} bytes, format {fmt!r})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {rgb.shape}")
    return rgb


def encode_raw_image(rgb, encoding: str = "rgb8") -> tuple[np.ndarray, int]:
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


def encode_compressed_image(rgb, fmt: str = "jpeg", jpeg_quality: int = 95) -> tuple[bytes, str]:
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
