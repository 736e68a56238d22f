"""Inputs of ``spark3r map``: a rosbag2 bag, a TUM RGB-D folder, a folder of images or a video.

:func:`open_input` detects the kind, checks what can be checked up front (bag readable, topic
present, calibration) and returns an :class:`OfflineInput` whose ``frames()`` yields
:class:`InputFrame` lazily. A frame that cannot be decoded is skipped and counted in
``corrupt_frames`` (one bad JPEG must not end a long recording); a frame whose size differs from
the first frame's raises ValueError, because the mapper's windows need one image size.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from spark3r.mapping.tf_tree import TransformTree

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
BAG_SUFFIXES = (".mcap", ".db3")
INPUT_KINDS = ("bag", "tum", "images", "video")
_NS_PER_S = 10**9


@dataclass
class InputFrame:
    stamp_ns: int
    image: np.ndarray  # uint8 [H, W, 3] RGB


@dataclass
class OfflineInput:
    """One opened input. ``K``: pinhole intrinsics of the images if known. ``base_to_camera``:
    pose of the camera optical frame in ``base_frame`` (from /tf_static) if known."""

    kind: str
    path: Path
    read: Callable[[], Iterator[tuple[int, Optional[np.ndarray]]]]  # (stamp, rgb or None if corrupt)
    K: Optional[np.ndarray] = None
    base_to_camera: Optional[np.ndarray] = None
    base_frame: str = "base_link"
    camera_frame: str = "camera_optical_frame"
    topic: Optional[str] = None
    expected_frames: Optional[int] = None
    notes: list = field(default_factory=list)
    frames_read: int = 0
    corrupt_frames: int = 0
    image_size: Optional[tuple[int, int]] = None  # (height, width) of the first frame
    calibrated_size: Optional[tuple[int, int]] = None  # (height, width) the intrinsics are for

    def frames(self) -> Iterator[InputFrame]:
        for stamp_ns, image in self.read():
            if image is None:
                self.corrupt_frames += 1
                log.warning("%s: skipping an undecodable frame at stamp %d ns", self.path, stamp_ns)
                continue
            size = tuple(image.shape[:2])
            if self.image_size is None:
                self.image_size = size
                if self.K is not None and self.calibrated_size not in (None, size):
                    self.notes.append(f"intrinsics are for {self.calibrated_size[1]}x{self.calibrated_size[0]} "
                                      f"but the images are {size[1]}x{size[0]}; using the backbone's intrinsics")
                    self.K = None
            elif size != self.image_size:
                raise ValueError(
                    f"{self.path}: frame {self.frames_read} (stamp {stamp_ns} ns) is {size[1]}x{size[0]} but the "
                    f"sequence started at {self.image_size[1]}x{self.image_size[0]}; offline mapping needs one image "
                    "size per run (split the input or resize it)")
            self.frames_read += 1
            yield InputFrame(int(stamp_ns), image)

    def summary(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "topic": self.topic, "frames_read": self.frames_read,
                "corrupt_frames": self.corrupt_frames, "expected_frames": self.expected_frames,
                "image_size_hw": list(self.image_size) if self.image_size else None,
                "intrinsics": "given" if self.K is not None else "backbone",
                "extrinsic": f"{self.base_frame} -> {self.camera_frame}" if self.base_to_camera is not None else "none",
                "notes": list(self.notes)}


def detect_kind(path) -> str:
    """Which reader ``path`` needs; ValueError if none fits."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in BAG_SUFFIXES:
            return "bag"
        if suffix in VIDEO_SUFFIXES:
            return "video"
        raise ValueError(f"input file {path} is neither a bag ({', '.join(BAG_SUFFIXES)}) nor a video "
                         f"({', '.join(VIDEO_SUFFIXES)})")
    if (path / "metadata.yaml").is_file() or any(p.suffix in BAG_SUFFIXES for p in path.iterdir()):
        return "bag"
    if (path / "rgb.txt").is_file():
        return "tum"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        return "images"
    raise ValueError(f"input folder {path} is not a rosbag2 bag (metadata.yaml), a TUM RGB-D folder (rgb.txt) "
                     f"or a folder of images ({', '.join(IMAGE_SUFFIXES)})")


def open_input(path, kind: Optional[str] = None, topic: Optional[str] = None, fps: float = 10.0,
               camera_info_topic: Optional[str] = None) -> OfflineInput:
    """Open ``path`` (``kind`` None = detect). ``topic``: image topic of a bag (None = detect).
    ``fps``: frame rate for stamps of image folders without numeric names and of videos without
    timestamps."""
    if kind is None:
        kind = detect_kind(path)
    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {kind!r}")
    if not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")
    if topic is not None and kind != "bag":
        raise ValueError(f"--topic only applies to bags, but {path} is a {kind} input")
    opener = {"bag": _open_bag, "tum": _open_tum, "images": _open_image_folder, "video": _open_video}[kind]
    return opener(Path(path), topic=topic, fps=float(fps), camera_info_topic=camera_info_topic)


# -- bags -------------------------------------------------------------------------------------


def _open_bag(path: Path, topic: Optional[str], fps: float, camera_info_topic: Optional[str]) -> OfflineInput:
    from spark3r.data import bag_io
    from spark3r.data.image_codec import decode_compressed_image, decode_raw_image

    reader = bag_io.open_reader(path)
    try:
        chosen = bag_io.pick_topic(reader, path, topic, (bag_io.IMAGE_TYPE, bag_io.COMPRESSED_TYPE), "image")
        if chosen is None:
            topics = sorted(f"{c.topic} ({c.msgtype})" for c in reader.connections)
            raise ValueError(f"bag {path} has no sensor_msgs/Image or CompressedImage topic; topics: {topics or 'none'}")
        connections = [c for c in reader.connections if c.topic == chosen]
        count = sum(c.msgcount for c in connections)
    finally:
        reader.close()
    if count == 0:
        raise ValueError(f"image topic {chosen} in bag {path} has no messages")
    source = OfflineInput("bag", path, read=lambda: _bag_messages(path, chosen, decode_raw_image, decode_compressed_image),
                          topic=chosen, expected_frames=count)
    info = bag_io.read_bag_camera_info(path, camera_info_topic)
    if info is not None:
        if info.distortion_model not in ("", "none") and np.any(np.abs(info.D) > 1e-9):
            source.notes.append(f"CameraInfo has {info.distortion_model} distortion; images are used as if rectified")
        source.K = info.K
        source.camera_frame = info.frame_id or source.camera_frame
        source.notes.append(f"intrinsics from CameraInfo ({info.width}x{info.height})")
        source.calibrated_size = (info.height, info.width)
    static = bag_io.read_bag_tf_static(path)
    tree = TransformTree()
    for (parent, child), T in static.items():
        tree.set(parent, child, T)
    chain = tree.root_of(source.camera_frame) if static else None
    if chain is not None:
        source.base_frame, source.base_to_camera = chain
        source.notes.append(f"extrinsic {source.base_frame} -> {source.camera_frame} from /tf_static")
    elif static:
        source.notes.append(f"/tf_static has no transform to camera frame {source.camera_frame!r}; no extrinsic used")
    return source


def _bag_messages(path: Path, topic: str, decode_raw, decode_compressed) -> Iterator[tuple[int, Optional[np.ndarray]]]:
    from spark3r.data import bag_io

    reader = bag_io.open_reader(path)
    try:
        ts = bag_io.typestore()
        connections = [c for c in reader.connections if c.topic == topic]
        for conn, bag_time, raw in reader.messages(connections=connections):
            try:
                msg = ts.deserialize_cdr(raw, conn.msgtype)
            except Exception:  # a truncated or garbled message
                yield int(bag_time), None
                continue
            stamp = bag_io.header_stamp_ns(msg.header)
            try:
                if conn.msgtype == bag_io.IMAGE_TYPE:
                    rgb = decode_raw(msg.data, msg.height, msg.width, msg.encoding, msg.step)
                else:
                    rgb = decode_compressed(msg.data, msg.format)
            except (ValueError, TypeError):
                rgb = None
            yield stamp, rgb
    finally:
        reader.close()


# -- TUM RGB-D folders ------------------------------------------------------------------------


def _read_rgb(file: Path) -> Optional[np.ndarray]:
    import cv2

    bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _open_tum(path: Path, topic, fps: float, camera_info_topic) -> OfflineInput:
    from spark3r.data.io import read_file_list, read_tum_intrinsics

    entries = read_file_list(path / "rgb.txt")
    if not entries:
        raise ValueError(f"{path / 'rgb.txt'} lists no images")
    source = OfflineInput("tum", path, read=lambda: ((s, _read_rgb(path / n)) for s, n in entries),
                          expected_frames=len(entries))
    intrinsics = read_tum_intrinsics(path)
    if intrinsics is not None:
        source.K, source.calibrated_size = intrinsics[0], (intrinsics[2], intrinsics[1])
        source.notes.append("intrinsics from intrinsics.txt")
    return source


# -- image folders and videos ----------------------------------------------------------------

_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def _stamp_from_name(stem: str) -> Optional[int]:
    """Nanoseconds encoded in a file name: decimal seconds (``1305031102.175304``, TUM style) or an
    integer of at least 18 digits (nanoseconds since the epoch). Short integers are frame counters."""
    from spark3r.data.io import parse_stamp_s

    if not _NUMBER.match(stem):
        return None
    if "." in stem:
        return parse_stamp_s(stem)
    return int(stem) if len(stem.lstrip("0")) >= 18 else None


def _folder_stamps(files: list[Path], fps: float) -> tuple[list[int], str]:
    """Stamps from the file names when they all carry increasing stamps, else frame index / fps."""
    stamps = [_stamp_from_name(f.stem) for f in files]
    if all(s is not None for s in stamps) and all(b > a for a, b in zip(stamps, stamps[1:])):
        return stamps, "file names"
    step = _NS_PER_S / fps
    return [int(round(i * step)) for i in range(len(files))], f"frame index at {fps:g} fps"


def _open_image_folder(path: Path, topic, fps: float, camera_info_topic) -> OfflineInput:
    files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    numeric = all(_NUMBER.match(p.stem) for p in files)
    files.sort(key=(lambda p: float(p.stem)) if numeric else (lambda p: p.name))
    if not files:
        raise ValueError(f"{path} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    stamps, how = _folder_stamps(files, fps)
    source = OfflineInput("images", path, read=lambda: ((s, _read_rgb(f)) for s, f in zip(stamps, files)),
                          expected_frames=len(files))
    source.notes.append(f"stamps from {how}")
    return source


def _open_video(path: Path, topic, fps: float, camera_info_topic) -> OfflineInput:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise ValueError(f"OpenCV cannot open video {path} (unsupported codec or not a video)")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        video_fps = capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    rate = video_fps if np.isfinite(video_fps) and video_fps > 0 else fps
    source = OfflineInput("video", path, read=lambda: _video_frames(path, rate), expected_frames=count if count > 0 else None)
    source.notes.append(f"stamps from frame index at {rate:g} fps")
    return source


def _video_frames(path: Path, rate: float) -> Iterator[tuple[int, Optional[np.ndarray]]]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            yield int(round(index * _NS_PER_S / rate)), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
