"""spark3r_ros.conversions: exact values for images, clouds, TF, CameraInfo and stamps."""
import struct

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pytest.importorskip("rclpy", reason="ROS 2 message packages (rclpy, sensor_msgs) are not installed")

from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import Transform  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField  # noqa: E402

from spark3r.geometry import make_transform  # noqa: E402
from spark3r_ros import conversions as cv  # noqa: E402


# ------------------------------------------------------------------------------------- time

def test_time_round_trip_is_exact_for_large_stamps():
    ns = 1_700_000_000_123_456_789  # not representable exactly as a float64 of seconds
    t = cv.ns_to_time(ns)
    assert (t.sec, t.nanosec) == (1_700_000_000, 123_456_789)
    assert cv.time_to_ns(t) == ns
    assert cv.time_to_ns(cv.ns_to_time(np.int64(ns))) == ns


def test_time_negative_and_range():
    t = cv.ns_to_time(-1)
    assert (t.sec, t.nanosec) == (-1, 999_999_999)
    assert cv.time_to_ns(t) == -1
    with pytest.raises(ValueError, match="int32"):
        cv.ns_to_time(2**31 * 1_000_000_000)
    with pytest.raises(TypeError, match="float"):
        cv.ns_to_time(1.5e9)


def test_stamp_arguments():
    from rclpy.time import Time as RclpyTime

    ns = 1_234_000_000_987
    assert cv.time_to_ns(cv.as_time_msg(ns)) == ns
    assert cv.time_to_ns(cv.as_time_msg(Time(sec=1234, nanosec=987))) == 1_234_000_000_987
    assert cv.time_to_ns(cv.as_time_msg(RclpyTime(nanoseconds=ns))) == ns
    assert cv.time_to_ns(cv.as_time_msg(None)) == 0
    with pytest.raises(TypeError, match="stamp"):
        cv.as_time_msg(12.5)
    with pytest.raises(TypeError):
        cv.as_time_msg(True)


# ------------------------------------------------------------------------------------- images

def _random_image(encoding, h, w, seed=0):
    dtype, channels = cv.IMAGE_ENCODINGS[encoding]
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    if dtype == np.float32:
        return rng.normal(size=shape).astype(np.float32)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("encoding", list(cv.IMAGE_ENCODINGS))
@pytest.mark.parametrize("size", [(5, 7), (1, 1), (480, 640)])
def test_image_round_trip_exact(encoding, size):
    arr = _random_image(encoding, *size)
    msg = cv.numpy_to_image(arr, encoding, stamp=42, frame_id="cam")
    dtype, channels = cv.IMAGE_ENCODINGS[encoding]
    assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (size[0], size[1], encoding, 0)
    assert msg.step == size[1] * channels * dtype.itemsize
    assert len(msg.data) == msg.step * msg.height
    assert msg.header.frame_id == "cam" and cv.time_to_ns(msg.header.stamp) == 42
    out = cv.image_to_numpy(msg)
    assert out.dtype == dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_image_wire_bytes_are_little_endian_row_major():
    arr = np.array([[1, 258], [513, 65535]], dtype=np.uint16)
    msg = cv.numpy_to_image(arr, "mono16")
    assert bytes(msg.data) == bytes([1, 0, 2, 1, 1, 2, 255, 255])


def test_odd_stride_padding_is_ignored():
    # rgb8, 3 pixels wide (9 bytes) in rows of 13 bytes: 4 bytes of junk padding per row.
    h, w, step = 2, 3, 13
    pixels = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    raw = bytearray()
    for row in pixels:
        raw += row.tobytes() + b"\xAA\xBB\xCC\xDD"
    msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=step, data=bytes(raw))
    np.testing.assert_array_equal(cv.image_to_numpy(msg), pixels)
    np.testing.assert_array_equal(cv.image_to_rgb(msg), pixels)


def test_odd_stride_16bit_unaligned_rows():
    # mono16 rows of 2 pixels (4 bytes) padded to 5 bytes: every other row starts on an odd byte.
    values = np.array([[1, 2], [300, 65535], [7, 1024]], dtype=np.uint16)
    raw = b"".join(row.astype("<u2").tobytes() + b"\x00" for row in values)
    msg = Image(height=3, width=2, encoding="16UC1", is_bigendian=0, step=5, data=raw)
    np.testing.assert_array_equal(cv.image_to_numpy(msg), values)


def test_big_endian_mono16():
    values = np.array([[0x0102, 0xA0B0], [0xFFFE, 7]], dtype=np.uint16)
    msg = Image(height=2, width=2, encoding="mono16", is_bigendian=1, step=4, data=values.astype(">u2").tobytes())
    out = cv.image_to_numpy(msg)
    assert out.dtype == np.uint16 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)
    # The same bytes read as little-endian give the byte-swapped values.
    msg.is_bigendian = 0
    np.testing.assert_array_equal(cv.image_to_numpy(msg), values.byteswap())


def test_big_endian_float_with_nan():
    values = np.array([[1.5, np.nan, -2.25]], dtype=np.float32)
    msg = Image(height=1, width=3, encoding="32FC1", is_bigendian=1, step=12, data=values.astype(">f4").tobytes())
    np.testing.assert_array_equal(cv.image_to_numpy(msg), values)  # NaN positions compare equal


@pytest.mark.parametrize("h,w", [(0, 0), (0, 5), (4, 0)])
def test_empty_images(h, w):
    arr = np.zeros((h, w, 3), np.uint8)
    msg = cv.numpy_to_image(arr, "bgr8")
    assert len(msg.data) == 0
    out = cv.image_to_numpy(msg)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert cv.image_to_rgb(msg).shape == (h, w, 3)
    assert cv.image_to_numpy(cv.numpy_to_image(np.zeros((h, w), np.float32), "32FC1")).shape == (h, w)


def test_one_pixel_image_to_rgb_per_encoding():
    rgb = np.array([[[10, 20, 30]]], np.uint8)
    assert cv.image_to_rgb(cv.numpy_to_image(rgb, "rgb8")).tolist() == [[[10, 20, 30]]]
    assert cv.image_to_rgb(cv.numpy_to_image(rgb[:, :, ::-1].copy(), "bgr8")).tolist() == [[[10, 20, 30]]]
    rgba = np.array([[[10, 20, 30, 40]]], np.uint8)
    assert cv.image_to_rgb(cv.numpy_to_image(rgba, "rgba8")).tolist() == [[[10, 20, 30]]]
    bgra = np.array([[[30, 20, 10, 40]]], np.uint8)
    assert cv.image_to_rgb(cv.numpy_to_image(bgra, "bgra8")).tolist() == [[[10, 20, 30]]]
    gray = np.array([[77]], np.uint8)
    assert cv.image_to_rgb(cv.numpy_to_image(gray, "mono8")).tolist() == [[[77, 77, 77]]]


def test_image_to_rgb_channel_order_on_larger_image():
    bgr = _random_image("bgr8", 6, 9, seed=3)
    rgb = cv.image_to_rgb(cv.numpy_to_image(bgr, "bgr8"))
    assert rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "32FC1"])
def test_image_to_rgb_rejects_depth_encodings(encoding):
    msg = cv.numpy_to_image(_random_image(encoding, 2, 2), encoding)
    with pytest.raises(ValueError, match="not a colour image"):
        cv.image_to_rgb(msg)


def test_image_errors():
    with pytest.raises(ValueError, match="unsupported image encoding 'bayer_rggb8'"):
        cv.image_to_numpy(Image(height=1, width=1, encoding="bayer_rggb8", step=1, data=b"\x00"))
    with pytest.raises(ValueError, match="expected step\\*height"):
        cv.image_to_numpy(Image(height=2, width=2, encoding="mono8", step=2, data=b"\x00" * 3))
    with pytest.raises(ValueError, match="step 5 is smaller"):
        cv.image_to_numpy(Image(height=1, width=2, encoding="rgb8", step=5, data=b"\x00" * 5))
    with pytest.raises(TypeError, match="needs a uint16"):
        cv.numpy_to_image(np.zeros((2, 2), np.float64), "mono16")
    with pytest.raises(ValueError, match="shape"):
        cv.numpy_to_image(np.zeros((2, 2), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="unsupported image encoding"):
        cv.numpy_to_image(np.zeros((2, 2), np.uint8), "8UC9")


# ------------------------------------------------------------------------------------- compressed

def test_png_round_trip_exact():
    rgb = _random_image("rgb8", 31, 17, seed=5)
    msg = cv.numpy_to_compressed(rgb, "png", stamp=5, frame_id="cam")
    assert msg.format == "rgb8; png compressed bgr8"
    assert bytes(msg.data[:8]) == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(cv.compressed_to_rgb(msg), rgb)


def test_jpeg_round_trip_close_and_channel_order():
    # Smooth colour blocks survive JPEG nearly unchanged; a channel swap would not.
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:32] = [200, 30, 10]
    rgb[32:] = [10, 60, 220]
    msg = cv.numpy_to_compressed(rgb, "jpeg")
    assert bytes(msg.data[:2]) == b"\xff\xd8"
    out = cv.compressed_to_rgb(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 3


def test_compressed_plain_format_strings_and_mono():
    gray = np.tile(np.arange(16, dtype=np.uint8) * 16, (4, 1))
    import cv2

    ok, png = cv2.imencode(".png", gray)
    msg = CompressedImage(format="png", data=png.tobytes())
    out = cv.compressed_to_rgb(msg)
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_compressed_errors():
    with pytest.raises(ValueError, match="compressedDepth"):
        cv.compressed_to_rgb(CompressedImage(format="16UC1; compressedDepth png", data=b"\x00"))
    with pytest.raises(ValueError, match="could not decode"):
        cv.compressed_to_rgb(CompressedImage(format="jpeg", data=b"not a jpeg at all"))
    with pytest.raises(ValueError, match="no data"):
        cv.compressed_to_rgb(CompressedImage(format="jpeg", data=b""))
    with pytest.raises(ValueError, match="unsupported CompressedImage format"):
        cv.compressed_to_rgb(CompressedImage(format="tiff", data=b"\x00"))
    with pytest.raises(ValueError, match="empty image"):
        cv.numpy_to_compressed(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        cv.numpy_to_compressed(np.zeros((4, 4, 3), np.float32))


# ------------------------------------------------------------------------------------- clouds

def test_cloud_layout_and_exact_bytes():
    xyz = np.array([[1.0, -2.0, 3.5], [0.25, 0.5, -0.75]], np.float32)
    rgb = np.array([[255, 0, 16], [1, 2, 3]], np.uint8)
    msg = cv.cloud_to_msg(xyz, rgb, 10**18 + 1, "map")
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 2, 16, 32)
    assert msg.is_dense and not msg.is_bigendian
    assert msg.header.frame_id == "map" and cv.time_to_ns(msg.header.stamp) == 10**18 + 1
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, PointField.FLOAT32, 1),
        ("y", 4, PointField.FLOAT32, 1),
        ("z", 8, PointField.FLOAT32, 1),
        ("rgb", 12, PointField.FLOAT32, 1),
    ]
    expected = struct.pack("<fffI", 1.0, -2.0, 3.5, 0xFF0010) + struct.pack("<fffI", 0.25, 0.5, -0.75, 0x010203)
    assert bytes(msg.data) == expected


def test_cloud_round_trip_and_nan_points_dropped():
    rng = np.random.default_rng(7)
    xyz = rng.normal(size=(1000, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(1000, 3), dtype=np.uint8)
    xyz[[3, 10, 999], [0, 2, 1]] = [np.nan, np.inf, -np.inf]
    msg = cv.cloud_to_msg(xyz, rgb, None, "map")
    keep = np.ones(1000, bool)
    keep[[3, 10, 999]] = False
    assert msg.width == 997 and msg.is_dense
    out_xyz, out_rgb = cv.msg_to_cloud(msg)
    np.testing.assert_array_equal(out_xyz, xyz[keep])
    np.testing.assert_array_equal(out_rgb, rgb[keep])


def test_cloud_without_colour_and_float64_input():
    xyz = np.array([[1.0, 2.0, 3.0], [np.nan, 0, 0], [4.0, 5.0, 6.0]])
    msg = cv.cloud_to_msg(xyz, None, 0, "odom")
    assert msg.point_step == 12 and msg.width == 2 and [f.name for f in msg.fields] == ["x", "y", "z"]
    out_xyz, out_rgb = cv.msg_to_cloud(msg)
    assert out_rgb is None and out_xyz.dtype == np.float32
    np.testing.assert_array_equal(out_xyz, [[1, 2, 3], [4, 5, 6]])


def test_empty_cloud():
    msg = cv.cloud_to_msg(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), 0, "map")
    assert msg.width == 0 and len(msg.data) == 0
    xyz, rgb = cv.msg_to_cloud(msg)
    assert xyz.shape == (0, 3) and rgb.shape == (0, 3)


def test_million_point_cloud_is_built_by_array_ops():
    n = 1_000_000
    xyz = np.arange(3 * n, dtype=np.float32).reshape(n, 3)
    rgb = (np.arange(3 * n) % 251).astype(np.uint8).reshape(n, 3)
    msg = cv.cloud_to_msg(xyz, rgb, 0, "map")
    assert msg.width == n and len(msg.data) == 16 * n
    words = np.frombuffer(msg.data, "<u4").reshape(n, 4)
    for i in (0, 1, 123_457, n - 1):
        assert words[i, :3].view("<f4").tolist() == xyz[i].tolist()
        r, g, b = (int(c) for c in rgb[i])
        assert int(words[i, 3]) == (r << 16) | (g << 8) | b
    out_xyz, out_rgb = cv.msg_to_cloud(msg)
    np.testing.assert_array_equal(out_xyz, xyz)
    np.testing.assert_array_equal(out_rgb, rgb)


def test_reads_foreign_layout_organised_big_endian_float64_rgba():
    # A 2x3 organised cloud, big-endian, fields out of order, float64 coordinates, UINT32 rgba
    # with alpha, 4 bytes of padding per point and 7 bytes of padding per row.
    h, w = 2, 3
    point = np.dtype({"names": ["rgba", "z", "x", "y"], "formats": [">u4", ">f8", ">f8", ">f8"],
                      "offsets": [0, 4, 12, 20], "itemsize": 32})
    rng = np.random.default_rng(2)
    xyz = rng.normal(size=(h * w, 3))
    xyz[4] = [np.nan, np.nan, np.nan]
    rgb = rng.integers(0, 256, size=(h * w, 3), dtype=np.uint8)
    records = np.zeros(h * w, point)
    records["x"], records["y"], records["z"] = xyz.T
    records["rgba"] = (0xAB << 24) | cv.pack_rgb(rgb)
    row_step = w * 32 + 7
    raw = b"".join(records[r * w:(r + 1) * w].tobytes() + b"\x11" * 7 for r in range(h))
    fields = [PointField(name="rgba", offset=0, datatype=PointField.UINT32, count=1),
              PointField(name="z", offset=4, datatype=PointField.FLOAT64, count=1),
              PointField(name="x", offset=12, datatype=PointField.FLOAT64, count=1),
              PointField(name="y", offset=20, datatype=PointField.FLOAT64, count=1)]
    msg = PointCloud2(height=h, width=w, fields=fields, is_bigendian=True, point_step=32,
                      row_step=row_step, data=raw, is_dense=False)
    out_xyz, out_rgb = cv.msg_to_cloud(msg)
    keep = np.arange(h * w) != 4
    np.testing.assert_array_equal(out_xyz, xyz[keep].astype(np.float32))
    np.testing.assert_array_equal(out_rgb, rgb[keep])


def test_cloud_errors():
    good = cv.cloud_to_msg(np.zeros((2, 3), np.float32), None, 0, "map")
    with pytest.raises(TypeError, match="floating"):
        cv.cloud_to_msg(np.zeros((2, 3), np.int32), None, 0, "map")
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        cv.cloud_to_msg(np.zeros((2, 4), np.float32), None, 0, "map")
    with pytest.raises(ValueError, match="rgb must be uint8"):
        cv.cloud_to_msg(np.zeros((2, 3), np.float32), np.zeros((3, 3), np.uint8), 0, "map")
    with pytest.raises(ValueError, match="frame_id"):
        cv.cloud_to_msg(np.zeros((2, 3), np.float32), None, 0, "")
    with pytest.raises(ValueError, match="lacks field"):
        cv.msg_to_cloud(PointCloud2(height=1, width=0, fields=good.fields[:2], point_step=12))
    truncated = cv.cloud_to_msg(np.zeros((2, 3), np.float32), None, 0, "map")
    truncated.data = bytes(truncated.data)[:-1]
    with pytest.raises(ValueError, match="expected row_step\\*height"):
        cv.msg_to_cloud(truncated)
    bad_type = cv.cloud_to_msg(np.zeros((2, 3), np.float32), None, 0, "map")
    bad_type.fields[0].datatype = PointField.INT32
    with pytest.raises(ValueError, match="FLOAT32 or FLOAT64"):
        cv.msg_to_cloud(bad_type)
    beyond = cv.cloud_to_msg(np.zeros((2, 3), np.float32), None, 0, "map")
    beyond.fields[2].offset = 10
    with pytest.raises(ValueError, match="beyond point_step"):
        cv.msg_to_cloud(beyond)


# ------------------------------------------------------------------------------------- TF

def test_matrix_to_transform_exact_values():
    R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 deg about z
    msg = cv.matrix_to_transform(make_transform(R, [1.0, 2.0, 3.0]), 1_700_000_000_000_000_001, "base_link", "camera")
    assert msg.header.frame_id == "base_link" and msg.child_frame_id == "camera"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1_700_000_000, 1)
    t, q = msg.transform.translation, msg.transform.rotation
    assert (t.x, t.y, t.z) == (1.0, 2.0, 3.0)
    s = np.sqrt(0.5)
    np.testing.assert_allclose([q.x, q.y, q.z, q.w], [0, 0, s, s], atol=1e-15)


def test_transform_round_trip_random():
    for i, rot in enumerate(Rotation.random(20, random_state=11)):
        T = make_transform(rot.as_matrix(), [i, -i * 0.5, 2.0])
        msg = cv.matrix_to_transform(T, i, "map", "odom")
        np.testing.assert_allclose(cv.transform_to_matrix(msg), T, atol=1e-12)
        np.testing.assert_allclose(cv.transform_to_matrix(msg.transform), T, atol=1e-12)
        np.testing.assert_allclose(cv.pose_to_matrix(cv.matrix_to_pose(T)), T, atol=1e-12)


def test_scale_never_goes_into_tf():
    T = make_transform(np.eye(3), [0, 0, 0])
    similarity = T.copy()
    similarity[:3, :3] *= 1.5
    with pytest.raises(ValueError, match="not rigid.*scale"):
        cv.matrix_to_transform(similarity, 0, "map", "odom")
    with pytest.raises(ValueError, match="not rigid"):
        cv.matrix_to_pose(similarity)
    sheared = T.copy()
    sheared[0, 2] = 0.1
    with pytest.raises(ValueError, match="not rigid"):
        cv.matrix_to_transform(sheared, 0, "map", "odom")
    with pytest.raises(ValueError, match="4x4"):
        cv.matrix_to_transform(np.eye(3), 0, "map", "odom")


def test_transform_argument_errors():
    T = np.eye(4)
    with pytest.raises(TypeError, match="float"):
        cv.matrix_to_transform(T, 1.5, "map", "odom")
    with pytest.raises(ValueError, match="non-empty"):
        cv.matrix_to_transform(T, 0, "", "odom")
    with pytest.raises(ValueError, match="both"):
        cv.matrix_to_transform(T, 0, "map", "map")


def test_quaternion_normalisation_on_read():
    tf = Transform()
    tf.rotation.x, tf.rotation.y, tf.rotation.z, tf.rotation.w = 0.0, 0.0, 0.0, 1.003
    np.testing.assert_allclose(cv.transform_to_matrix(tf)[:3, :3], np.eye(3), atol=1e-12)
    tf.rotation.w = 1.5
    with pytest.raises(ValueError, match="not normalised"):
        cv.transform_to_matrix(tf)
    tf.rotation.w = 0.0
    with pytest.raises(ValueError, match="not normalised"):
        cv.transform_to_matrix(tf)


# ------------------------------------------------------------------------------------- camera info

def _camera_info(**overrides):
    msg = CameraInfo(width=640, height=480, distortion_model="plumb_bob",
                     d=[0.1, -0.05, 0.001, 0.002, 0.0], k=[525.0, 0, 319.5, 0, 526.0, 239.5, 0, 0, 1])
    for key, value in overrides.items():
        setattr(msg, key, value)
    return msg


def test_camera_info_to_intrinsics():
    intr = cv.camera_info_to_intrinsics(_camera_info())
    assert (intr.width, intr.height, intr.distortion_model) == (640, 480, "plumb_bob")
    np.testing.assert_array_equal(intr.K, [[525, 0, 319.5], [0, 526, 239.5], [0, 0, 1]])
    assert (intr.fx, intr.fy, intr.cx, intr.cy) == (525.0, 526.0, 319.5, 239.5)
    np.testing.assert_array_equal(intr.D, [0.1, -0.05, 0.001, 0.002, 0.0])
    assert intr.is_distorted
    undistorted = cv.camera_info_to_intrinsics(_camera_info(d=[], distortion_model=""))
    assert not undistorted.is_distorted and undistorted.D.shape == (0,)


def test_camera_info_validation():
    with pytest.raises(ValueError, match="focal"):
        cv.camera_info_to_intrinsics(_camera_info(k=[0.0] * 9))
    with pytest.raises(ValueError, match="image size 0x480"):
        cv.camera_info_to_intrinsics(_camera_info(width=0))
    with pytest.raises(ValueError, match="NaN"):
        cv.camera_info_to_intrinsics(_camera_info(k=[525.0, 0, np.nan, 0, 526.0, 239.5, 0, 0, 1]))
    with pytest.raises(ValueError, match="upper-triangular"):
        cv.camera_info_to_intrinsics(_camera_info(k=[525.0, 0, 319.5, 0, 526.0, 239.5, 0, 0, 2]))
    with pytest.raises(ValueError, match="needs 5 coefficients"):
        cv.camera_info_to_intrinsics(_camera_info(d=[0.1, 0.2]))
    with pytest.raises(ValueError, match="unknown distortion model"):
        cv.camera_info_to_intrinsics(_camera_info(distortion_model="kannala", d=[0.1]))
