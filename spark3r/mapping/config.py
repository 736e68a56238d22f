"""Mapper configuration: plain dataclasses whose field names are the ROS parameter names.

Every field carries a one-line description in ``metadata["doc"]`` so the ROS node (or a CLI) can
declare parameters straight from these classes (:func:`parameter_docs`). Values are validated in
``__post_init__`` with a message that names the parameter and the accepted range.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def param(default: Any, doc: str) -> Any:
    """A dataclass field with its parameter description."""
    return field(default=default, metadata={"doc": doc})


def parameter_docs(config_cls_or_obj) -> dict[str, tuple[Any, str]]:
    """``{name: (default, doc)}`` for every field of a config dataclass (class or instance)."""
    out = {}
    for f in fields(config_cls_or_obj):
        default = f.default if f.default is not MISSING else None
        out[f.name] = (default, f.metadata.get("doc", ""))
    return out


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class KeyframeConfig:
    min_parallax_px: float = param(
        20.0, "median sparse optical flow (input-image pixels) since the last keyframe that makes a new keyframe")
    max_time_gap_s: float = param(
        2.0, "a frame this long after the last keyframe becomes a keyframe even without parallax (0 = off)")
    min_time_gap_s: float = param(
        0.05, "frames closer than this to the last keyframe are never keyframes")
    blur_threshold: float = param(
        5.0, "frames whose variance of the Laplacian (on the downscaled grey image) is below this are rejected as blurred (0 = off)")
    flow_image_width: int = param(
        320, "width in pixels the image is downscaled to for the parallax and blur checks")
    flow_max_corners: int = param(
        200, "number of corners tracked from the last keyframe for the parallax check")
    min_tracked_fraction: float = param(
        0.3, "if fewer of the corners than this fraction can be tracked, the view changed enough: accept as keyframe")

    def __post_init__(self) -> None:
        _check(_finite(self.min_parallax_px) and self.min_parallax_px >= 0, "min_parallax_px", self.min_parallax_px, "a finite number >= 0")
        _check(_finite(self.max_time_gap_s) and self.max_time_gap_s >= 0, "max_time_gap_s", self.max_time_gap_s, "a finite number >= 0 (0 disables)")
        _check(_finite(self.min_time_gap_s) and self.min_time_gap_s >= 0, "min_time_gap_s", self.min_time_gap_s, "a finite number >= 0")
        if self.max_time_gap_s > 0:
            _check(self.min_time_gap_s <= self.max_time_gap_s, "min_time_gap_s", self.min_time_gap_s,
                   f"<= max_time_gap_s ({self.max_time_gap_s})")
        _check(_finite(self.blur_threshold) and self.blur_threshold >= 0, "blur_threshold", self.blur_threshold, "a finite number >= 0 (0 disables)")
        _check(isinstance(self.flow_image_width, int) and self.flow_image_width >= 32, "flow_image_width", self.flow_image_width, "an integer >= 32")
        _check(isinstance(self.flow_max_corners, int) and self.flow_max_corners >= 8, "flow_max_corners", self.flow_max_corners, "an integer >= 8")
        _check(_finite(self.min_tracked_fraction) and 0 <= self.min_tracked_fraction <= 1, "min_tracked_fraction", self.min_tracked_fraction, "a number in [0, 1]")


@dataclass
class WindowConfig:
    window_size: int = param(16, "keyframes per backbone window")
    window_stride: int = param(8, "new keyframes between two backbone runs (consecutive windows share window_size - window_stride keyframes)")
    max_pending_keyframes: int = param(64, "keyframes waiting for the backbone beyond this are dropped (oldest first) and counted")
    min_shared_keyframes: int = param(1, "a window is aligned only if at least this many of its keyframes are already in the map")
    camera_center_weight: float = param(0.1, "share of the total alignment weight given to the shared camera centres (the rest goes to depth points)")
    alignment_points_per_frame: int = param(2000, "depth points sampled per shared keyframe for the window-to-map alignment")
    max_alignment_residual: float = param(0.05, "windows whose robust alignment residual (RMS of inliers / median depth) exceeds this are rejected")
    min_inlier_fraction: float = param(0.3, "windows whose alignment inlier fraction is below this are rejected")

    def __post_init__(self) -> None:
        _check(isinstance(self.window_size, int) and self.window_size >= 2, "window_size", self.window_size, "an integer >= 2")
        _check(isinstance(self.window_stride, int) and 1 <= self.window_stride < self.window_size, "window_stride", self.window_stride,
               f"an integer in [1, window_size - 1] = [1, {self.window_size - 1}] so that windows overlap")
        _check(isinstance(self.max_pending_keyframes, int) and self.max_pending_keyframes >= self.window_size, "max_pending_keyframes",
               self.max_pending_keyframes, f"an integer >= window_size ({self.window_size})")
        _check(isinstance(self.min_shared_keyframes, int) and 1 <= self.min_shared_keyframes <= self.window_size - self.window_stride,
               "min_shared_keyframes", self.min_shared_keyframes, f"an integer in [1, window_size - window_stride] = [1, {self.window_size - self.window_stride}]")
        _check(_finite(self.camera_center_weight) and 0 <= self.camera_center_weight < 1, "camera_center_weight", self.camera_center_weight, "a number in [0, 1)")
        _check(isinstance(self.alignment_points_per_frame, int) and self.alignment_points_per_frame >= 0, "alignment_points_per_frame",
               self.alignment_points_per_frame, "an integer >= 0")
        _check(_finite(self.max_alignment_residual) and self.max_alignment_residual > 0, "max_alignment_residual", self.max_alignment_residual, "a finite number > 0")
        _check(_finite(self.min_inlier_fraction) and 0 <= self.min_inlier_fraction <= 1, "min_inlier_fraction", self.min_inlier_fraction, "a number in [0, 1]")


@dataclass
class MapConfig:
    conf_percentile: float = param(25.0, "per keyframe, depth pixels below this percentile of the confidence are not mapped")
    conf_min: float = param(1.0, "depth pixels with confidence below this absolute value are not mapped")
    max_points_per_keyframe: int = param(20000, "at most this many points are unprojected per keyframe (evenly subsampled)")
    voxel_size: float = param(0.02, "edge of a map voxel, in map units (metres only if the backbone is metric)")
    max_map_points: int = param(2_000_000, "voxel map capacity; the least recently updated voxels are evicted beyond it")
    use_camera_info_intrinsics: bool = param(True, "unproject with the frame's camera_info K when it has one; otherwise use the backbone's intrinsics")
    max_trajectory_length: int = param(100_000, "keyframe poses kept in the trajectory; the oldest are forgotten beyond it")

    def __post_init__(self) -> None:
        _check(_finite(self.conf_percentile) and 0 <= self.conf_percentile < 100, "conf_percentile", self.conf_percentile, "a number in [0, 100)")
        _check(_finite(self.conf_min) and self.conf_min >= 0, "conf_min", self.conf_min, "a finite number >= 0")
        _check(isinstance(self.max_points_per_keyframe, int) and self.max_points_per_keyframe >= 1, "max_points_per_keyframe",
               self.max_points_per_keyframe, "an integer >= 1")
        _check(_finite(self.voxel_size) and self.voxel_size > 0, "voxel_size", self.voxel_size, "a finite number > 0")
        _check(isinstance(self.max_map_points, int) and self.max_map_points >= 1, "max_map_points", self.max_map_points, "an integer >= 1")
        _check(isinstance(self.use_camera_info_intrinsics, bool), "use_camera_info_intrinsics", self.use_camera_info_intrinsics, "a bool")
        _check(isinstance(self.max_trajectory_length, int) and self.max_trajectory_length >= 1, "max_trajectory_length",
               self.max_trajectory_length, "an integer >= 1")


@dataclass
class BackendConfig:
    pose_graph: bool = param(
        True, "optimise keyframe poses in a Sim(3) pose graph (gtsam iSAM2) fed by every window; false = plain sliding-window odometry (a keyframe's pose is frozen when mapped, tracking loss restarts the map)")
    graph_rotation_sigma_deg: float = param(
        1.0, "standard deviation (degrees) of a window's relative rotation between two keyframes at zero alignment residual; inflated by the window's residual and inlier fraction")
    graph_translation_sigma: float = param(
        0.02, "standard deviation of a window's relative translation as a fraction of the keyframe's median depth; inflated like graph_rotation_sigma_deg")
    graph_scale_sigma: float = param(
        0.02, "standard deviation of a window's relative log-scale between two keyframes; inflated like graph_rotation_sigma_deg")
    keyframe_points: int = param(
        4000, "confident points kept per keyframe in its own camera frame (the map cache is rebuilt from them when poses change)")
    map_update_threshold: float = param(
        0.5, "a keyframe's points are moved in the map cache when an optimisation moves them by more than this many voxels")
    map_updates_per_window: int = param(
        32, "keyframes re-inserted in the map cache per window after an optimisation moved them; the others follow in later windows (flush, save and save_session move all)")
    store_keyframes_in_memory: int = param(
        500, "keyframes whose image and points stay in memory; older ones are spilled to a temporary directory and read back on demand (0 = never spill)")
    loop_closure: bool = param(
        True, "search earlier keyframes for the current place (descriptors from the backbone's own tokens), verify candidates with the backbone and add loop constraints; needs pose_graph and a backbone that returns descriptors")
    loop_min_score: float = param(
        0.85, "cosine similarity of place descriptors above which an earlier keyframe becomes a loop candidate")
    loop_min_keyframe_gap: int = param(
        20, "a loop candidate must be at least this many keyframes older than the current keyframe (recent keyframes are already linked by the windows)")
    loop_min_inlier_fraction: float = param(
        0.4, "a loop candidate is accepted only if at least this share of the current keyframe's points lands on the candidate's surfaces (and its depth scale agrees) in the verification window")
    loop_max_drift: float = param(
        0.5, "a verified loop is accepted only if it moves the current keyframe relative to the candidate by at most this fraction of the path length between them (rotation: this many radians per path length, at least 0.3 rad)")
    loop_cooldown_keyframes: int = param(
        3, "after an accepted loop, no new loop search for this many keyframes")

    def __post_init__(self) -> None:
        for name in ("pose_graph", "loop_closure"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        for name in ("graph_rotation_sigma_deg", "graph_translation_sigma", "graph_scale_sigma", "map_update_threshold", "loop_max_drift"):
            value = getattr(self, name)
            _check(_finite(value) and value > 0, name, value, "a finite number > 0")
        _check(isinstance(self.keyframe_points, int) and self.keyframe_points >= 16, "keyframe_points", self.keyframe_points, "an integer >= 16")
        _check(isinstance(self.map_updates_per_window, int) and self.map_updates_per_window >= 1, "map_updates_per_window",
               self.map_updates_per_window, "an integer >= 1")
        _check(isinstance(self.store_keyframes_in_memory, int) and self.store_keyframes_in_memory >= 0, "store_keyframes_in_memory",
               self.store_keyframes_in_memory, "an integer >= 0 (0 = never spill)")
        _check(_finite(self.loop_min_score) and -1 <= self.loop_min_score <= 1, "loop_min_score", self.loop_min_score, "a number in [-1, 1] (cosine similarity)")
        _check(isinstance(self.loop_min_keyframe_gap, int) and self.loop_min_keyframe_gap >= 1, "loop_min_keyframe_gap", self.loop_min_keyframe_gap, "an integer >= 1")
        _check(_finite(self.loop_min_inlier_fraction) and 0 < self.loop_min_inlier_fraction <= 1, "loop_min_inlier_fraction",
               self.loop_min_inlier_fraction, "a number in (0, 1]")
        _check(isinstance(self.loop_cooldown_keyframes, int) and self.loop_cooldown_keyframes >= 0, "loop_cooldown_keyframes",
               self.loop_cooldown_keyframes, "an integer >= 0")


@dataclass
class BackboneConfig:
    backbone: str = param("vggt-1b", "model preset: vggt-1b, pi3, da3-small, da3-base, da3-large, da3-giant (vggt-tiny, pi3-tiny for tests)")
    checkpoint: str = param("", "weights: a file / directory / hub id, or 'seeded' for deterministic test weights; empty = none (refused)")
    device: str = param("cpu", "torch device, e.g. cpu or cuda:0")
    dtype: str = param("float32", "compute dtype: float32, bfloat16 or float16 (half types only on CUDA)")
    reduction: str = param("dense", "global-attention token reduction method registered in spark3r.accel (dense, uniform, spark3r, ...)")
    reduction_params: dict = field(default_factory=dict, metadata={"doc": "keyword parameters of the reduction method"})
    image_width: int = param(518, "network input width in pixels (multiple of 14); height follows the aspect ratio")
    cache_max_frames: int = param(0, "patch-embedding cache capacity in keyframes (0 = window_size + window_stride)")

    def __post_init__(self) -> None:
        _check(isinstance(self.backbone, str) and self.backbone != "", "backbone", self.backbone, "a non-empty preset name")
        _check(isinstance(self.checkpoint, str), "checkpoint", self.checkpoint, "a string")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "dtype", self.dtype, "one of float32, bfloat16, float16")
        # The method name is checked against spark3r.accel's registry when the backbone is built
        # (importing it here would pull torch into the configuration layer).
        _check(isinstance(self.reduction, str) and self.reduction != "", "reduction", self.reduction, "a method name such as dense")
        _check(isinstance(self.reduction_params, dict), "reduction_params", self.reduction_params, "a dict")
        _check(isinstance(self.image_width, int) and self.image_width >= 28 and self.image_width % 14 == 0, "image_width",
               self.image_width, "an integer >= 28 and a multiple of 14")
        _check(isinstance(self.cache_max_frames, int) and self.cache_max_frames >= 0, "cache_max_frames", self.cache_max_frames, "an integer >= 0")


@dataclass
class MapperConfig:
    keyframe: KeyframeConfig = field(default_factory=KeyframeConfig, metadata={"doc": "keyframe gate"})
    window: WindowConfig = field(default_factory=WindowConfig, metadata={"doc": "sliding window and alignment"})
    map: MapConfig = field(default_factory=MapConfig, metadata={"doc": "point extraction and voxel map"})
    backend: BackendConfig = field(default_factory=BackendConfig, metadata={"doc": "keyframe store, pose graph, loop closure"})

    def __post_init__(self) -> None:
        for name, cls in (("keyframe", KeyframeConfig), ("window", WindowConfig), ("map", MapConfig), ("backend", BackendConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise TypeError(f"MapperConfig.{name} must be a {cls.__name__}, got {type(value).__name__}")

    @classmethod
    def from_flat(cls, values: dict[str, Any], strict: bool = True) -> "MapperConfig":
        """Build from flat ``{parameter_name: value}`` (how ROS parameters arrive); names are
        unique across the sections. Unknown names raise ValueError when ``strict``."""
        sections = {"keyframe": KeyframeConfig, "window": WindowConfig, "map": MapConfig, "backend": BackendConfig}
        owner = {f.name: s for s, c in sections.items() for f in fields(c)}
        kwargs: dict[str, dict[str, Any]] = {s: {} for s in sections}
        unknown = []
        for name, value in values.items():
            if name in owner:
                kwargs[owner[name]][name] = value
            else:
                unknown.append(name)
        if unknown and strict:
            raise ValueError(f"unknown mapper parameters {sorted(unknown)}; known: {sorted(owner)}")
        return cls(**{s: c(**kwargs[s]) for s, c in sections.items()})
