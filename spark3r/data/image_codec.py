"""sensor_msgs Image / CompressedImage payloads <-> numpy, without ROS.

The one implementation of image decoding and encoding in the project: the live node
(``spark3r_ros.conversions``, rclpy messages) and the bag reader (``spark3r.data.bag_io``,
rosbags messages) both pass message *fields* here.

* :func:`decode_image` returns the pixels as stored (any supported encoding, native endian).
* :func:`decode_raw_image` / :func:`decode_compressed_image` return what the mapper consumes:
  uint8 ``[H, W, 3]`` RGB. Colour and mono8 images are accepted; 16-bit and float
  (depth-like) encodings are refused rather than silently scaled to 8 bits.
"""
from __future__ import annotations

import numpy as np

# encoding -> (element dtype, channels as stored). YUV 4:2:2 packs 2 bytes per pixel.
IMAGE_ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "8UC3": (np.dtype(np.uint8), 3),
    "8UC1": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
    "yuv422": (np.dtype(np.uint8), 2),
    "uyvy": (np.dtype(np.uint8), 2),
    "yuv422_yuy2": (np.dtype(np.uint8), 2),
    "yuyv": (np.dtype(np.uint8), 2),
}
# Encodings that are pictures the mapper can use, and how each becomes RGB.
_TO_RGB_CHANNELS = {"rgb8": [0, 1, 2], "bgr8": [2, 1, 0], "rgba8": [0, 1, 2], "bgra8": [2, 1, 0], "8UC3": [0, 1, 2]}
_GREY = ("mono8", "8UC1")
_UYVY = ("yuv422", "uyvy")
_YUY2 = ("yuv422_yuy2", "yuyv")
_NOT_PICTURES = ("mono16", "16UC1", "32FC1")
RGB_ENCODINGS = tuple(_TO_RGB_CHANNELS) + _GREY + _UYVY + _YUY2
WRITABLE_ENCODINGS = ("rgb8", "bgr8", "mono8")
COMPRESSED_FORMATS = ("jpeg", "png")


def payload_bytes(data) -> np.ndarray:
    """The uint8 payload of a message's ``data`` field as a flat numpy view where possible
    (bytes, array.array('B') from rclpy, numpy arrays from rosbags, or a list)."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype != np.uint8 else data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8)


def encoding_info(encoding: str) -> tuple[np.dtype, int]:
    try:
        return IMAGE_ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: {', '.join(IMAGE_ENCODINGS)}") from None


def decode_image(data, height: int, width: int, encoding: str, step: int = 0, is_bigendian: bool = False) -> np.ndarray:
    """Image payload -> a new native-endian array ``[H, W]`` (1 channel) or ``[H, W, C]``.

    Row padding (``step`` larger than a packed row; 0 means packed) is dropped and big-endian
    data is swapped. Sizes that disagree with the payload raise ValueError instead of being
    guessed. Empty images (0 rows or columns) decode to empty arrays.
    """
    dtype, channels = encoding_info(encoding)
    height, width = int(height), int(width)
    if height < 0 or width < 0:
        raise ValueError(f"image size {width}x{height} is negative")
    row_bytes = width * channels * dtype.itemsize
    step = int(step) or row_bytes
    shape = (height, width) if channels == 1 else (height, width, channels)
    if step < row_bytes:
        raise ValueError(
            f"image step {step} is smaller than width*channels*bytes = {width}*{channels}*{dtype.itemsize} = {row_bytes}"
        )
    buf = payload_bytes(data)
    if buf.size != step * height:
        raise ValueError(
            f"image data has {buf.size} bytes, expected step*height = {step}*{height} = {step * height} "
            f"({encoding} {width}x{height})"
        )
    if height == 0 or width == 0:
        return np.zeros(shape, dtype)
    rows = np.ascontiguousarray(buf.reshape(height, step)[:, :row_bytes])
    wire_dtype = dtype.newbyteorder(">" if is_bigendian else "<")
    return rows.view(wire_dtype).reshape(shape).astype(dtype, copy=True)


def decode_raw_image(data, height: int, width: int, encoding: str, step: int = 0) -> np.ndarray:
    """Image payload -> uint8 RGB ``[H, W, 3]``: colour encodings reordered, alpha dropped,
    mono8 replicated to grey, packed YUV 4:2:2 converted. Depth-like encodings are refused."""
    if encoding in _NOT_PICTURES:
        raise ValueError(
            f"encoding {encoding} is not a colour image; expected one of {', '.join(RGB_ENCODINGS)} "
            "(decode depth or 16-bit images with decode_image and convert them explicitly)"
        )
    if encoding not in RGB_ENCODINGS:
        encoding_info(encoding)  # raises the unsupported-encoding error
    pixels = decode_image(data, height, width, encoding, step)
    if pixels.size == 0:
        return np.zeros((pixels.shape[0], pixels.shape[1], 3), np.uint8)
    if encoding in _UYVY or encoding in _YUY2:
        import cv2

        code = cv2.COLOR_YUV2RGB_UYVY if encoding in _UYVY else cv2.COLOR_YUV2RGB_YUY2
        return cv2.cvtColor(pixels, code)
    if encoding in _GREY:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, _TO_RGB_CHANNELS[encoding]])


def compressed_codec(fmt: str) -> str:
    """The codec named by a CompressedImage ``format`` field ("jpeg", "png", or "auto" when the
    field is empty); compressedDepth and unknown codecs raise ValueError."""
    lowered = fmt.lower()
    if "compresseddepth" in lowered:
        raise ValueError(f"compressedDepth images ({fmt!r}) are depth, not colour; expected a jpeg or png colour image")
    if "jpeg" in lowered or "jpg" in lowered:
        return "jpeg"
    if "png" in lowered:
        return "png"
    if lowered.strip() == "":
        return "auto"
    raise ValueError(f"unsupported CompressedImage format {fmt!r}; expected jpeg or png")


def decode_compressed_image(data, fmt: str = "") -> np.ndarray:
    """CompressedImage payload (JPEG or PNG) -> uint8 RGB ``[H, W, 3]``. The codec is
    recognised from the bytes; ``fmt`` only serves to refuse depth and unknown codecs."""
    import cv2

    compressed_codec(fmt)
    buf = payload_bytes(data)
    if buf.size == 0:
        raise ValueError("CompressedImage has no data")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"could not decode compressed image ({buf.size} bytes, format {fmt!r})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {rgb.shape}")
    return rgb


def encode_image(array, encoding: str) -> tuple[bytes, int, int, int]:
    """numpy -> (little-endian packed payload, height, width, step). The dtype must match the
    encoding exactly (uint8 / uint16 / float32): a silent cast would change pixel values."""
    dtype, channels = encoding_info(encoding)
    arr = np.asarray(array)
    if arr.dtype != dtype:
        raise TypeError(f"encoding {encoding} needs a {dtype} array, got {arr.dtype}")
    if channels == 1 and arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    expected = "[H, W]" if channels == 1 else f"[H, W, {channels}]"
    if (channels == 1 and arr.ndim != 2) or (channels > 1 and (arr.ndim != 3 or arr.shape[2] != channels)):
        raise ValueError(f"encoding {encoding} needs an array of shape {expected}, got {arr.shape}")
    height, width = int(arr.shape[0]), int(arr.shape[1])
    payload = arr.astype(dtype.newbyteorder("<"), copy=False).tobytes()
    return payload, height, width, width * channels * dtype.itemsize


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
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"cannot compress an empty image of shape {rgb.shape}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if fmt == "jpeg" else []
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"{fmt} encoding failed for an image of shape {rgb.shape}")
    # Same wording as image_transport's compressed plugin: source encoding; codec compressed bgr8.
    return buf.tobytes(), f"rgb8; {fmt} compressed bgr8"
