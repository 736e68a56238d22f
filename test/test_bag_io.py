"""rosbag2 writing/reading of camera sequences, checked with rosbags and with real rclpy types."""
from __future__ import annotations

import os

import numpy as np
import pytest
from rosbags.interfaces import QosDurability
from rosbags.rosbag2 import Reader, Writer
from rosbags.typesys import Stores, get_typestore

from spark3r.data.bag_io import (
    iter_bag_images,
    read_bag_camera_info,
    read_bag_tf_static,
    write_sequence_bag,
)
from spark3r.data.image_codec import (
    decode_compressed_image,
    decode_raw_image,
    encode_compressed_image,
    encode_raw_image,
)
from spark3r.data.synthetic import render_sequence
from spark3r.geometry import quat_xyzw_to_matrix

TYPESTORE = get_typestore(Stores.ROS2_KILTED)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(num_frames=4, height=25, width=33, seed=2, trajectory="orbit")


def _grey(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("encoding,compressed", [("rgb8", False), ("bgr8", False), ("mono8", False),
                                                  ("rgb8", "png"), ("rgb8", "jpeg")])
def test_round_trip(tmp_path, seq, storage, encoding, compressed):
    path = write_sequence_bag(seq, tmp_path / "bag", storage=storage, encoding=encoding,
                              compressed=bool(compressed), compressed_format=compressed or "jpeg")
    frames = list(iter_bag_images(path))
    assert [f[0] for f in frames] == list(seq.stamps_ns)
    assert {f[2] for f in frames} == {"camera_optical_frame"}
    for (_, rgb, _), expected in zip(frames, seq.images):
        assert rgb.dtype == np.uint8 and rgb.shape == expected.shape
        if encoding == "mono8":
            assert np.array_equal(rgb[..., 0], _grey(expected)) and np.array_equal(rgb[..., 0], rgb[..., 2])
        elif compressed == "jpeg":
            assert np.abs(rgb.astype(int) - expected).mean() < 8
        else:
            assert np.array_equal(rgb, expected)
    info = read_bag_camera_info(path)
    np.testing.assert_array_equal(info.K, seq.K)
    assert (info.width, info.height, info.frame_id) == (33, 25, "camera_optical_frame")
    assert info.stamp_ns == seq.stamps_ns[0] and info.distortion_model == "plumb_bob"
    tf = read_bag_tf_static(path)
    assert list(tf) == [("base_link", "camera_optical_frame")]
    np.testing.assert_allclose(tf[("base_link", "camera_optical_frame")], seq.base_to_camera, atol=1e-12)


@pytest.mark.parametrize("storage,suffix", [("mcap", ".mcap"), ("sqlite3", ".db3")])
def test_bag_layout_read_by_plain_rosbags(tmp_path, seq, storage, suffix):
    path = write_sequence_bag(seq, tmp_path / "run1", storage=storage)
    assert sorted(os.listdir(path)) == sorted(["metadata.yaml", f"run1{suffix}"])
    with Reader(path) as reader:
        topics = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
        assert topics == {"/camera/image_raw": ("sensor_msgs/msg/Image", 4),
                          "/camera/camera_info": ("sensor_msgs/msg/CameraInfo", 4),
                          "/tf_static": ("tf2_msgs/msg/TFMessage", 1)}
        qos = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
        assert qos["/tf_static"][0].durability == QosDurability.TRANSIENT_LOCAL
        assert qos["/camera/image_raw"][0].durability == QosDurability.VOLATILE
        assert reader.start_time == seq.stamps_ns[0]
        for conn, bag_time, raw in reader.messages():
            msg = TYPESTORE.deserialize_cdr(raw, conn.msgtype)
            header = msg.transforms[0].header if conn.topic == "/tf_static" else msg.header
            assert header.stamp.sec * 10**9 + header.stamp.nanosec == bag_time


def test_messages_deserialize_into_real_ros_types(tmp_path, seq):
    """Standard ROS tooling (rclpy's C deserializer) reads our CDR bytes; no rclpy.init()."""
    serialization = pytest.importorskip("rclpy.serialization", reason="rclpy not installed")
    sensor_msgs = pytest.importorskip("sensor_msgs.msg", reason="sensor_msgs not installed")
    tf2_msgs = pytest.importorskip("tf2_msgs.msg", reason="tf2_msgs not built (tools/setup_env.sh)")
    path = write_sequence_bag(seq, tmp_path / "bag", storage="mcap")
    ros_types = {"sensor_msgs/msg/Image": sensor_msgs.Image, "sensor_msgs/msg/CameraInfo": sensor_msgs.CameraInfo,
                 "tf2_msgs/msg/TFMessage": tf2_msgs.TFMessage}
    seen = set()
    with Reader(path) as reader:
        for conn, bag_time, raw in reader.messages():
            msg = serialization.deserialize_message(raw, ros_types[conn.msgtype])
            seen.add(conn.msgtype)
            if conn.msgtype == "sensor_msgs/msg/Image":
                i = list(seq.stamps_ns).index(bag_time)
                assert (msg.height, msg.width, msg.encoding, msg.step) == (25, 33, "rgb8", 33 * 3)
                assert msg.header.frame_id == "camera_optical_frame"
                assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == seq.stamps_ns[i]
                img = np.frombuffer(bytes(msg.data), np.uint8).reshape(25, 33, 3)
                assert np.array_equal(img, seq.images[i])
            elif conn.msgtype == "sensor_msgs/msg/CameraInfo":
                np.testing.assert_array_equal(np.array(msg.k).reshape(3, 3), seq.K)
                assert msg.p[0] == seq.K[0, 0] and msg.p[3] == 0.0
            else:
                (t,) = msg.transforms
                assert (t.header.frame_id, t.child_frame_id) == ("base_link", "camera_optical_frame")
                assert (t.transform.translation.x, t.transform.translation.z) == pytest.approx((0.10, 0.25))
                q = t.transform.rotation
                rotation = quat_xyzw_to_matrix([q.x, q.y, q.z, q.w])
                np.testing.assert_allclose(rotation, seq.base_to_camera[:3, :3], atol=1e-12)
                np.testing.assert_allclose(rotation @ [0, 0, 1], [1, 0, 0], atol=1e-12)  # optical z = base x
    assert seen == set(ros_types)


def test_compressed_topic_name_and_format(tmp_path, seq):
    path = write_sequence_bag(seq, tmp_path / "bag", compressed=True)
    with Reader(path) as reader:
        conns = {c.topic: c.msgtype for c in reader.connections}
        assert conns["/camera/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
        conn = next(c for c in reader.connections if c.topic == "/camera/image_raw/compressed")
        _, _, raw = next(reader.messages(connections=[conn]))
        msg = TYPESTORE.deserialize_cdr(raw, conn.msgtype)
        assert msg.format == "rgb8; jpeg compressed bgr8" and bytes(msg.data[:2]) == b"\xff\xd8"


def test_custom_topics_frames_and_no_tf(tmp_path, seq):
    path = write_sequence_bag(seq, tmp_path / "bag", image_topic="/cam0/image", camera_info_topic="/cam0/info",
                              camera_frame="cam0_optical", write_tf_static=False)
    assert read_bag_tf_static(path) == {}
    assert read_bag_camera_info(path, topic="/cam0/info").frame_id == "cam0_optical"
    assert [f[2] for f in iter_bag_images(path, topic="/cam0/image")] == ["cam0_optical"] * 4


def test_existing_path_needs_overwrite(tmp_path, seq):
    write_sequence_bag(seq, tmp_path / "bag")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_sequence_bag(seq, tmp_path / "bag")
    short = render_sequence(num_frames=2, height=8, width=10, seed=1)
    write_sequence_bag(short, tmp_path / "bag", storage="sqlite3", overwrite=True)
    assert len(list(iter_bag_images(tmp_path / "bag"))) == 2
    assert os.listdir(tmp_path) == ["bag"]  # no staging leftovers


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"storage": "rosbag1"}, "storage"),
        ({"encoding": "rgb16"}, "encoding"),
        ({"compressed": True, "compressed_format": "webp"}, "compressed_format"),
        ({"image_topic": "camera/image"}, "absolute ROS topic"),
        ({"camera_info_topic": "/camera/image_raw"}, "must differ"),
        ({"camera_frame": "/camera"}, "camera_frame"),
    ],
)
def test_writer_argument_errors(tmp_path, seq, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_sequence_bag(seq, tmp_path / "bag", **kwargs)
    assert not os.listdir(tmp_path)


def test_writer_rejects_bad_sequences(tmp_path, seq):
    class Bad:
        images, K, base_to_camera = seq.images, seq.K, seq.base_to_camera
        stamps_ns = seq.stamps_ns.astype(np.float64)

    with pytest.raises(ValueError, match="integer nanoseconds"):
        write_sequence_bag(Bad(), tmp_path / "bag")
    Bad.stamps_ns = seq.stamps_ns[::-1].copy()
    with pytest.raises(ValueError, match="strictly increasing"):
        write_sequence_bag(Bad(), tmp_path / "bag")
    Bad.stamps_ns = seq.stamps_ns
    Bad.base_to_camera = 2 * np.eye(4)
    with pytest.raises(ValueError, match="base_to_camera"):
        write_sequence_bag(Bad(), tmp_path / "bag")
    assert not os.listdir(tmp_path)


def _write_raw_bag(path, topics: dict[str, str]) -> None:
    """A bag with one tiny message per topic, written with rosbags directly."""
    t = TYPESTORE.types
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="f")
    messages = {
        "sensor_msgs/msg/Image": t["sensor_msgs/msg/Image"](
            header=header, height=1, width=2, encoding="mono8", is_bigendian=0, step=2,
            data=np.array([10, 20], np.uint8)),
        "sensor_msgs/msg/CompressedImage": t["sensor_msgs/msg/CompressedImage"](
            header=header, format="png", data=np.frombuffer(encode_compressed_image(np.zeros((1, 2, 3), np.uint8), "png")[0], np.uint8)),
        "std_msgs/msg/String": t["std_msgs/msg/String"](data="hi"),
    }
    writer = Writer(path, version=9)
    writer.open()
    for topic, msgtype in topics.items():
        conn = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
        writer.write(conn, 5, TYPESTORE.serialize_cdr(messages[msgtype], msgtype))
    writer.close()


def test_topic_auto_detection(tmp_path):
    _write_raw_bag(tmp_path / "both", {"/cam/image_raw": "sensor_msgs/msg/Image",
                                       "/cam/image_raw/compressed": "sensor_msgs/msg/CompressedImage"})
    (stamp, rgb, frame), = iter_bag_images(tmp_path / "both")
    assert stamp == 1_000_000_002 and frame == "f" and rgb.tolist() == [[[10] * 3, [20] * 3]]
    (_, rgb, _), = iter_bag_images(tmp_path / "both", topic="/cam/image_raw/compressed")
    assert rgb.tolist() == [[[0] * 3, [0] * 3]]
    assert read_bag_camera_info(tmp_path / "both") is None
    _write_raw_bag(tmp_path / "two", {"/a": "sensor_msgs/msg/Image", "/b": "sensor_msgs/msg/Image"})
    with pytest.raises(ValueError, match=r"several image topics \['/a', '/b'\]; pass topic="):
        iter_bag_images(tmp_path / "two")
    _write_raw_bag(tmp_path / "none", {"/chatter": "std_msgs/msg/String"})
    with pytest.raises(ValueError, match=r"no sensor_msgs/Image or CompressedImage topic \(topics: \['/chatter'\]\)"):
        iter_bag_images(tmp_path / "none")
    with pytest.raises(ValueError, match="has type std_msgs/msg/String"):
        iter_bag_images(tmp_path / "none", topic="/chatter")


def test_reader_errors(tmp_path, seq):
    path = write_sequence_bag(seq, tmp_path / "bag")
    with pytest.raises(ValueError, match=r"topic '/nope' is not in bag .*\['/camera/image_raw'\]"):
        iter_bag_images(path, topic="/nope")  # raised by the call itself, before iterating
    with pytest.raises(ValueError, match="'/nope' is not in bag"):
        read_bag_camera_info(path, topic="/nope")
    with pytest.raises(FileNotFoundError):
        iter_bag_images(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not a readable rosbag2 bag"):
        iter_bag_images(tmp_path / "empty_dir")
    (tmp_path / "junk.mcap").write_bytes(b"this is not an mcap file at all")
    with pytest.raises(ValueError, match="not a readable rosbag2 bag"):
        read_bag_tf_static(tmp_path / "junk.mcap")
    with pytest.raises(ValueError, match="has type sensor_msgs/msg/Image"):
        read_bag_camera_info(path, topic="/camera/image_raw")


# ---------------------------------------------------------------------------------------------- codec


def test_raw_decoding_handles_padding_alpha_and_yuv():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    bgra = np.concatenate([rgb[..., ::-1], np.full((2, 3, 1), 255, np.uint8)], axis=2)
    padded = np.zeros((2, 16), np.uint8)
    padded[:, :12] = bgra.reshape(2, 12)
    assert np.array_equal(decode_raw_image(padded.reshape(-1).tobytes(), 2, 3, "bgra8", step=16), rgb)
    yuyv = np.array([[128, 128, 128, 128]], np.uint8)  # two grey pixels: Y=128, U=V=128
    assert np.abs(decode_raw_image(yuyv.tobytes(), 1, 2, "yuyv").astype(int) - 128).max() <= 2
    for encoding in ("rgb8", "bgr8"):
        payload, step = encode_raw_image(rgb, encoding)
        assert step == 9 and np.array_equal(decode_raw_image(payload, 2, 3, encoding, step), rgb)
    payload, step = encode_raw_image(rgb, "mono8")
    grey = decode_raw_image(payload, 2, 3, "mono8", step)
    assert step == 3 and np.array_equal(grey[..., 0], grey[..., 1])


def test_compressed_png_is_lossless_and_jpeg_close():
    rgb = render_sequence(num_frames=1, height=20, width=24, seed=1).images[0]
    data, fmt = encode_compressed_image(rgb, "png")
    assert fmt == "rgb8; png compressed bgr8" and np.array_equal(decode_compressed_image(data, fmt), rgb)
    data, fmt = encode_compressed_image(rgb, "jpeg", jpeg_quality=90)
    assert np.abs(decode_compressed_image(data, fmt).astype(int) - rgb).mean() < 8


def test_codec_errors():
    with pytest.raises(ValueError, match="32FC1 is not a colour image"):
        decode_raw_image(b"\0" * 16, 2, 2, "32FC1")
    with pytest.raises(ValueError, match="mono16 is not a colour image"):
        decode_raw_image(b"\0" * 8, 2, 2, "mono16")
    with pytest.raises(ValueError, match="unsupported image encoding 'bayer_rggb8'"):
        decode_raw_image(b"\0" * 4, 2, 2, "bayer_rggb8")
    with pytest.raises(ValueError, match="expected step\\*height = 6\\*2 = 12"):
        decode_raw_image(b"\0" * 10, 2, 2, "rgb8")
    with pytest.raises(ValueError, match="step 5 is smaller"):
        decode_raw_image(b"\0" * 12, 2, 2, "rgb8", step=5)
    with pytest.raises(ValueError, match="could not decode"):
        decode_compressed_image(b"garbage", "jpeg")
    with pytest.raises(ValueError, match="compressedDepth"):
        decode_compressed_image(b"garbage", "16UC1; compressedDepth png")
    with pytest.raises(ValueError, match="uint8 RGB"):
        encode_raw_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="cannot encode RGB as 'rgba8'"):
        encode_raw_image(np.zeros((2, 2, 3), np.uint8), "rgba8")
    with pytest.raises(ValueError, match="unsupported compressed format"):
        encode_compressed_image(np.zeros((2, 2, 3), np.uint8), "webp")
