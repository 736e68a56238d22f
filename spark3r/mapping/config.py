"""Mapper configuration: plain dataclasses whose field names are the parameter names.

One source for every parameter: each field carries its description, accepted range, step and
choices in its metadata (:func:`param`). Values are validated from that metadata in
``__post_init__`` (:func:`check_fields`), with a message that names the parameter and the
accepted range; the ROS node declares its parameters (descriptions, ranges) from the same
metadata (:func:`parameter_specs`) and ``spark3r map`` checks its flags against it.

Constraints between fields (``window_stride < window_size`` ...) are :class:`Relation` s: a
violated one blames the field the caller changed from its default (``window_size=5000`` is
blamed on ``window_size``, not on the untouched ``max_pending_keyframes``).

The reduction method's own parameters (``Spark3RConfig.query_keep`` ...) are flat parameters
``reduction.<field>`` (:func:`reduction_parameter_specs`, :meth:`BackboneConfig.from_flat`).
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Optional

REDUCTION_PREFIX = "reduction."


def param(default: Any, doc: str, *, range: Optional[tuple] = None, step: Optional[int] = None,
          choices: Optional[tuple] = None, exclusive: tuple[str, ...] = (), non_empty: bool = False) -> Any:
    """A dataclass field with its parameter description and constraints: ``range`` (inclusive
    ``(low, high)``; a bound named in ``exclusive`` ("low"/"high") is excluded), ``step`` (integers:
    ``low + n * step``), ``choices`` (allowed values), ``non_empty`` (strings)."""
    metadata = {"doc": doc, "range": range, "step": step, "choices": choices, "exclusive": tuple(exclusive),
                "non_empty": non_empty}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ParamSpec:
    """Everything known about one flat parameter: what the ROS node declares and what a CLI checks."""

    name: str
    default: Any
    doc: str
    range: Optional[tuple] = None
    step: Optional[int] = None
    choices: Optional[tuple] = None
    exclusive: tuple[str, ...] = ()
    non_empty: bool = False

    def expected(self) -> str:
        """The accepted values, in words (used in error messages and docs)."""
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(type(self.default), "")
        if isinstance(self.default, (tuple, list)):
            kind = "a list of integers" if all(isinstance(v, int) for v in self.default) else "a list of numbers"
        parts = [kind]
        if self.range is not None:
            lo, hi = self.range
            parts.append(f"in {'(' if 'low' in self.exclusive else '['}{lo:g}, {hi:g}{')' if 'high' in self.exclusive else ']'}")
        if self.step not in (None, 1):
            parts.append(f"in steps of {self.step} from {self.range[0]:g}" if self.range else f"a multiple of {self.step}")
        if self.choices:
            parts.append("one of " + ", ".join(str(c) for c in self.choices))
        if self.non_empty:
            parts.append("not empty")
        return " ".join(p for p in parts if p)

    def check(self, value: Any, name: Optional[str] = None) -> None:
        """ValueError naming the parameter when ``value`` is not accepted."""
        if not self.accepts(value):
            raise ValueError(f"{name or self.name}={value!r} is invalid: expected {self.expected()}")

    def accepts(self, value: Any) -> bool:
        default = self.default
        if isinstance(default, bool):
            return isinstance(value, bool)
        if isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str):
            ok = isinstance(value, str) and (not self.non_empty or value != "")
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(
                isinstance(v, type(d)) and not isinstance(v, bool) for v, d in zip(value, default))
            return ok
        else:
            return True
        if not ok:
            return False
        if self.choices is not None and value not in self.choices:
            return False
        if self.range is not None:
            lo, hi = self.range
            if value < lo or value > hi or ("low" in self.exclusive and value == lo) or ("high" in self.exclusive and value == hi):
                return False
            if self.step not in (None, 1) and (value - lo) % self.step != 0:
                return False
        return True


def parameter_specs(config_cls_or_obj) -> dict[str, ParamSpec]:
    """``{name: ParamSpec}`` of the flat parameters of a config dataclass (class or instance);
    fields without a plain default (dicts, nested configs) are not flat parameters."""
    out = {}
    for f in fields(config_cls_or_obj):
        if f.default is MISSING or "doc" not in f.metadata:
            continue
        m = f.metadata
        out[f.name] = ParamSpec(f.name, f.default, m["doc"], m.get("range"), m.get("step"), m.get("choices"),
                                m.get("exclusive", ()), m.get("non_empty", False))
    return out


def parameter_docs(config_cls_or_obj) -> dict[str, tuple[Any, str]]:
    """``{name: (default, doc)}`` for every field of a config dataclass (class or instance)."""
    out = {}
    for f in fields(config_cls_or_obj):
        default = f.default if f.default is not MISSING else None
        out[f.name] = (default, f.metadata.get("doc", ""))
    return out


@dataclass(frozen=True)
class Relation:
    """``left <op> right`` between fields of one config (``right`` is an expression of fields
    named in ``right_fields``), checked only when ``applies`` holds."""

    left: str
    op: str  # "<", "<=", ">="
    right: str  # label, e.g. "window_size - window_stride"
    right_value: Callable[[Any], Any]
    right_fields: tuple[str, ...]
    applies: Callable[[Any], bool] = lambda config: True

    def holds(self, config) -> bool:
        lv, rv = getattr(config, self.left), self.right_value(config)
        return {"<": lv < rv, "<=": lv <= rv, ">=": lv >= rv}[self.op]

    def message(self, config, blamed: str) -> str:
        lv, rv = getattr(config, self.left), self.right_value(config)
        value = getattr(config, blamed)
        if blamed == self.left:
            return f"{blamed}={value!r} is invalid: expected {self.op} {self.right} ({rv!r})"
        others = sorted({self.left, *self.right_fields} - {blamed})
        return (f"{blamed}={value!r} is invalid: it needs {self.left} ({lv!r}) {self.op} {self.right} ({rv!r}); "
                f"change {' and '.join(others)} as well or choose another {blamed}")


def check_fields(config) -> None:
    """Check every field of ``config`` against its metadata, then its class's ``RELATIONS``."""
    for name, spec in parameter_specs(config).items():
        spec.check(getattr(config, name))
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    for relation in getattr(config, "RELATIONS", ()):
        if not relation.applies(config) or relation.holds(config):
            continue
        involved = (relation.left, *relation.right_fields)
        # Blame what the caller set: the first involved field that differs from its default.
        changed = [n for n in involved if getattr(config, n) != defaults.get(n)]
        raise ValueError(relation.message(config, changed[0] if changed else relation.left))


@dataclass
class KeyframeConfig:
    min_parallax_px: float = param(
        20.0, "median sparse optical flow (input-image pixels) since the last keyframe that makes a new keyframe",
        range=(0.0, 10000.0))
    max_time_gap_s: float = param(
        2.0, "a frame this long after the last keyframe becomes a keyframe even without parallax (0 = off)",
        range=(0.0, 3600.0))
    min_time_gap_s: float = param(
        0.05, "frames closer than this to the last keyframe are never keyframes (<= max_time_gap_s)", range=(0.0, 3600.0))
    blur_threshold: float = param(
        5.0, "frames whose variance of the Laplacian (on the downscaled grey image) is below this are rejected as blurred (0 = off)",
        range=(0.0, 1e6))
    flow_image_width: int = param(
        320, "width in pixels the image is downscaled to for the parallax and blur checks", range=(32, 8192))
    flow_max_corners: int = param(
        200, "number of corners tracked from the last keyframe for the parallax check", range=(8, 100000))
    min_tracked_fraction: float = param(
        0.3, "if fewer of the corners than this fraction can be tracked, the view changed enough: accept as keyframe",
        range=(0.0, 1.0))

    RELATIONS = (Relation("min_time_gap_s", "<=", "max_time_gap_s", lambda c: c.max_time_gap_s, ("max_time_gap_s",),
                          applies=lambda c: c.max_time_gap_s > 0),)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class WindowConfig:
    window_size: int = param(16, "keyframes per backbone window", range=(2, 1024))
    window_stride: int = param(8, "new keyframes between two backbone runs (consecutive windows share window_size - "
                                  "window_stride keyframes; < window_size)", range=(1, 1023))
    max_pending_keyframes: int = param(64, "keyframes waiting for the backbone beyond this are dropped (oldest first) "
                                           "and counted (>= window_size)", range=(2, 100000))
    min_shared_keyframes: int = param(1, "a window is aligned only if at least this many of its keyframes are already "
                                         "in the map (<= window_size - window_stride)", range=(1, 1023))
    camera_center_weight: float = param(0.1, "share of the total alignment weight given to the shared camera centres "
                                              "(the rest goes to depth points)", range=(0.0, 1.0), exclusive=("high",))
    alignment_points_per_frame: int = param(2000, "depth points sampled per shared keyframe for the window-to-map "
                                                  "alignment", range=(0, 1000000))
    max_alignment_residual: float = param(0.05, "windows whose robust alignment residual (RMS of inliers / median depth) "
                                                "exceeds this are rejected", range=(0.0, 1000.0), exclusive=("low",))
    min_inlier_fraction: float = param(0.3, "windows whose alignment inlier fraction is below this are rejected",
                                       range=(0.0, 1.0))

    RELATIONS = (
        Relation("window_stride", "<", "window_size", lambda c: c.window_size, ("window_size",)),
        Relation("max_pending_keyframes", ">=", "window_size", lambda c: c.window_size, ("window_size",)),
        Relation("min_shared_keyframes", "<=", "window_size - window_stride", lambda c: c.window_size - c.window_stride,
                 ("window_size", "window_stride")),
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class MapConfig:
    conf_percentile: float = param(25.0, "per keyframe, depth pixels below this percentile of the confidence are not mapped",
                                   range=(0.0, 100.0), exclusive=("high",))
    conf_min: float = param(1.0, "depth pixels with confidence below this absolute value are not mapped", range=(0.0, 1e6))
    max_points_per_keyframe: int = param(20000, "at most this many points are unprojected per keyframe (evenly subsampled)",
                                         range=(1, 10000000))
    voxel_size: float = param(0.02, "edge of a map voxel, in map units (metres only if the backbone is metric)",
                              range=(1e-6, 100.0))
    max_map_points: int = param(2_000_000, "voxel map capacity; the least recently updated voxels are evicted beyond it",
                                range=(1, 1000000000))
    use_camera_info_intrinsics: bool = param(True, "unproject with the frame's camera_info K when it has one; otherwise "
                                                   "use the backbone's intrinsics")
    max_trajectory_length: int = param(100_000, "keyframe poses kept in the trajectory; the oldest are forgotten beyond it",
                                       range=(1, 100000000))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class OutputConfig:
    """Frames and TF policy of the published outputs (REP-105), shared by the live node and the
    offline bag (:mod:`spark3r.mapping.outputs`)."""

    map_frame: str = param("map", "world-fixed frame of the map, path and clouds (REP-105 map)", non_empty=True)
    odom_frame: str = param("odom", "continuous odometry frame (REP-105 odom)", non_empty=True)
    base_frame: str = param("base_link", "robot body frame; the camera extrinsic base_frame -> image frame_id comes from "
                                         "/tf_static", non_empty=True)
    publish_map_to_odom_tf: bool = param(True, "publish map -> odom on /tf (future-dated by transform_tolerance)")
    publish_odom_to_base_tf: bool = param(True, "publish odom -> base_link on /tf (the node owns odometry); false when "
                                                "another node does")
    transform_tolerance: float = param(0.1, "seconds map -> odom is future-dated so that TF lookups at 'now' succeed",
                                       range=(0.0, 10.0))
    path_max_size: int = param(10000, "poses kept in ~/path; the oldest are dropped beyond it", range=(1, 10000000))

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("map_frame", "odom_frame", "base_frame"):
            if getattr(self, name).startswith("/"):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected a frame id without a leading '/'")
        if len({self.map_frame, self.odom_frame, self.base_frame}) != 3:
            raise ValueError("map_frame, odom_frame and base_frame must be three different frames, got "
                             f"{self.map_frame!r}, {self.odom_frame!r}, {self.base_frame!r}")

    @property
    def transform_tolerance_ns(self) -> int:
        return int(round(self.transform_tolerance * 1e9))


@dataclass
class BackendConfig:
    """The SLAM back end: keyframe store, Sim(3) pose graph, loop closure (README "SLAM back end")."""

    pose_graph: bool = param(
        True, "optimise keyframe poses in a Sim(3) pose graph (gtsam, windowed Levenberg-Marquardt) fed by every window; false = plain "
              "sliding-window odometry (a keyframe's pose is frozen when mapped, tracking loss restarts the map)")
    graph_rotation_sigma_deg: float = param(
        1.0, "standard deviation (degrees) of a window's relative rotation between two keyframes at zero alignment "
             "residual; inflated by the window's residual and inlier fraction", range=(1e-6, 180.0))
    graph_translation_sigma: float = param(
        0.02, "standard deviation of a window's relative translation as a fraction of the keyframe's median depth; "
              "inflated like graph_rotation_sigma_deg", range=(1e-9, 100.0))
    graph_scale_sigma: float = param(
        0.02, "standard deviation of a window's relative log-scale between two keyframes; inflated like "
              "graph_rotation_sigma_deg", range=(1e-9, 10.0))
    keyframe_points: int = param(
        4000, "confident points kept per keyframe in its own camera frame (the map cache is rebuilt from them when "
              "poses change; at most max_points_per_keyframe)", range=(16, 10000000))
    map_update_threshold: float = param(
        0.5, "a keyframe's points are moved in the map cache when an optimisation moves them by more than this many "
             "voxels", range=(1e-3, 1e6))
    map_updates_per_window: int = param(
        32, "keyframes re-inserted in the map cache per window after an optimisation moved them; the others follow in "
            "later windows (flush, save and save_session move all)", range=(1, 10000000))
    store_keyframes_in_memory: int = param(
        500, "keyframes whose image and points stay in memory; older ones are spilled to a temporary directory and read "
             "back on demand (0 = never spill)", range=(0, 100000000))
    loop_closure: bool = param(
        True, "search earlier keyframes for the current place (descriptors from the backbone's own tokens), verify "
              "candidates with the backbone and add loop constraints; needs pose_graph and a backbone that returns "
              "descriptors")
    loop_min_score: float = param(
        0.85, "cosine similarity of place descriptors above which an earlier keyframe becomes a loop candidate",
        range=(-1.0, 1.0))
    loop_min_keyframe_gap: int = param(
        20, "a loop candidate must be at least this many keyframes older than the current keyframe (recent keyframes "
            "are already linked by the windows)", range=(1, 100000000))
    loop_min_inlier_fraction: float = param(
        0.4, "a loop candidate is accepted only if at least this share of the current keyframe's points lands on the "
             "candidate's surfaces (and its depth scale agrees) in the verification window", range=(0.0, 1.0),
        exclusive=("low",))
    loop_max_drift: float = param(
        0.5, "a verified loop is accepted only if it moves the current keyframe relative to the candidate by at most "
             "this fraction of the path length between them (rotation: this many radians per median scene depth of "
             "path, at least 0.3 rad)", range=(1e-6, 100.0))
    loop_cooldown_keyframes: int = param(
        10, "after an accepted loop, no new loop search for this many keyframes (localization-only: relocalize every "
           "this many keyframes)", range=(0, 100000000))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class BackboneConfig:
    backbone: str = param("vggt-1b", "model preset: vggt-1b, pi3, pi3-speed3r, da3-small, da3-base, da3-large, "
                                     "da3-giant, vggt-nano (built in); vggt-tiny, pi3-tiny, pi3-speed3r-tiny for tests",
                          non_empty=True)
    checkpoint: str = param("", "weights: a file / directory / hub id, 'builtin' for a checkpoint shipped in the package "
                                "(vggt-nano), or 'seeded' for deterministic test weights; empty = none (refused)")
    device: str = param("cpu", "torch device, e.g. cpu or cuda:0", non_empty=True)
    dtype: str = param("float32", "compute dtype: float32, bfloat16 or float16 (half types only on CUDA)",
                       choices=("float32", "bfloat16", "float16"))
    # The method name is checked against spark3r.accel's registry when the backbone is built
    # (importing it here would pull torch into the configuration layer).
    reduction: str = param("dense", "global-attention token reduction method registered in spark3r.accel (dense, "
                                    "uniform, spark3r, speed3r, ...); its parameters are reduction.<name>", non_empty=True)
    reduction_schedule: str = param("", "Spark3R key/value schedule JSON file for reduction 'spark3r' (with "
                                        "reduction.recipe 'paper': a layer-tiers file from `spark3r calibrate --recipe "
                                        "paper`; '' = the backbone's default)")
    reduction_params: dict = field(default_factory=dict, metadata={
        "doc": "keyword parameters of the reduction method (flat: reduction.<name>); reduction_schedule is added as "
               "'schedule'"})
    image_width: int = param(0, "network input width in pixels (multiple of 14, >= 28; rounded down to a multiple of 56 "
                                "for pi3-speed3r; 0 = the preset's native width: 518 for the released models, 140 for "
                                "vggt-nano); height follows the aspect ratio",
                             range=(0, 4088), step=14)
    cache_max_frames: int = param(0, "patch-embedding cache capacity in keyframes (0 = window_size + window_stride)",
                                  range=(0, 100000))
    threads: int = param(0, "CPU threads for inference (torch intra-op), set in the thread that runs the backbone before "
                            "every window; 0 = auto: usable cores - 1 (one is left to the ROS executor, image decoding "
                            "and other processes), at least 1", range=(0, 1024))

    def __post_init__(self) -> None:
        check_fields(self)
        if 0 < self.image_width < 28:  # the range admits 0 (native width); a real width needs 2 patches
            raise ValueError(f"image_width={self.image_width!r} is invalid: expected 0 (the preset's native width) or an "
                             "integer in [28, 4088] in steps of 14")
        if not isinstance(self.reduction_params, dict):
            raise ValueError(f"reduction_params={self.reduction_params!r} is invalid: expected a dict")
        if self.reduction_schedule:
            schedule = os.path.expanduser(self.reduction_schedule)
            given = self.reduction_params.get("schedule")
            if given is not None and given != schedule:
                raise ValueError(f"reduction_schedule={self.reduction_schedule!r} conflicts with reduction_params "
                                 f"schedule={given!r}: give the schedule once")
            self.reduction_params = {**self.reduction_params, "schedule": schedule}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "BackboneConfig":
        """The one way to build a BackboneConfig from flat parameters (the ROS node's, ``spark3r
        map``'s flags and ``--param``): field names plus ``reduction.<name>`` for the method's
        parameters. A ``reduction.<name>`` left at its default is not passed (the method's own
        default applies); one the chosen method does not take is refused with its name."""
        names = set(parameter_specs(cls))
        unknown = sorted(n for n in values if n not in names and not n.startswith(REDUCTION_PREFIX))
        if unknown:
            raise ValueError(f"unknown backbone parameters {unknown}; known: {sorted(names)} and reduction.<name>")
        kwargs = {n: v for n, v in values.items() if n in names}
        method = kwargs.get("reduction", cls.reduction)
        reduction = {n[len(REDUCTION_PREFIX):]: v for n, v in values.items() if n.startswith(REDUCTION_PREFIX)}
        if reduction or kwargs.get("reduction_schedule"):
            kwargs["reduction_params"] = reduction_params_for(method, reduction, kwargs.get("reduction_schedule", ""))
        return cls(**kwargs)


def reduction_parameter_specs() -> dict[str, ParamSpec]:
    """``{"reduction.<name>": ParamSpec}`` over every registered reduction method (imports
    spark3r.accel, hence torch). A method parameter is a flat parameter when its default is a
    bool, int, float, str or a tuple of numbers (the schedule is ``reduction_schedule``); its
    doc/range come from the field's metadata when the method's config has them. Two methods
    may share a name only with the same default."""
    from dataclasses import fields as dc_fields

    from spark3r.accel import METHODS

    specs: dict[str, ParamSpec] = {}
    owners: dict[str, list[str]] = {}
    for method, spec in sorted(METHODS.items()):
        for f in dc_fields(spec.config_cls):
            if f.default is MISSING or not _flat_value(f.default):
                continue
            name = REDUCTION_PREFIX + f.name
            m = f.metadata
            doc = m.get("doc") or f"parameter {f.name} of reduction method {{methods}} (spark3r/accel/README.md)"
            new = ParamSpec(name, list(f.default) if isinstance(f.default, tuple) else f.default, doc, m.get("range"),
                            m.get("step"), m.get("choices"), tuple(m.get("exclusive", ())))
            old = specs.get(name)
            if old is not None and (old.default != new.default or type(old.default) is not type(new.default)):
                raise RuntimeError(f"reduction methods {owners[name]} and {method!r} both have parameter {f.name!r} with "
                                   f"different defaults ({old.default!r}, {new.default!r}): one flat parameter "
                                   f"{name} cannot serve both; rename one")
            specs.setdefault(name, new)
            owners.setdefault(name, []).append(method)
    return {n: ParamSpec(s.name, s.default, s.doc.replace("{methods}", " / ".join(owners[n])), s.range, s.step, s.choices,
                         s.exclusive) for n, s in specs.items()}


def reduction_params_for(method: str, values: dict[str, Any], schedule: str = "") -> dict[str, Any]:
    """The method's keyword parameters from ``{name: value}`` (without the ``reduction.``
    prefix): values at the flat default are dropped, others are checked against the spec and
    against the method's own fields; the error names the flat parameter the caller set."""
    from dataclasses import fields as dc_fields

    from spark3r.accel import METHODS

    specs = reduction_parameter_specs()
    method_fields = {f.name for f in dc_fields(METHODS[method].config_cls)} if method in METHODS else None
    out = {}
    for name, value in values.items():
        flat = REDUCTION_PREFIX + name
        spec = specs.get(flat)
        if spec is None:
            raise ValueError(f"unknown parameter {flat}; reduction parameters: {sorted(specs)}")
        if isinstance(value, (tuple, list)) or type(value).__name__ == "array":
            value = list(value)
        spec.check(value, flat)
        if value == spec.default:
            continue
        if method_fields is None:
            raise ValueError(f"{flat}={value!r} is set but reduction={method!r} is not a registered method "
                             f"(known: {sorted(METHODS)})")
        if name not in method_fields:
            raise ValueError(f"{flat}={value!r} is set but reduction={method!r} has no parameter {name!r} "
                             f"(it takes {sorted(method_fields) or 'none'})")
        out[name] = tuple(value) if isinstance(value, list) else value
    if schedule and method_fields is not None and "schedule" not in method_fields:
        raise ValueError(f"reduction_schedule={schedule!r} is set but reduction={method!r} takes no schedule; a schedule "
                         "is only used by reduction 'spark3r' (or leave reduction_schedule empty)")
    if method_fields is not None:
        from spark3r.accel import make_config

        try:  # combinations the method refuses (e.g. reduction.recipe 'paper' with reduction.query_keep)
            make_config(method, **out)
        except ValueError as e:
            raise ValueError(f"reduction={method!r} with {', '.join(f'{REDUCTION_PREFIX}{k}={v!r}' for k, v in out.items())}: "
                             f"{e}") from None
    return out


def _flat_value(default: Any) -> bool:
    if isinstance(default, (bool, int, float, str)):
        return True
    return isinstance(default, tuple) and len(default) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in default)


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

    SECTIONS = {"keyframe": KeyframeConfig, "window": WindowConfig, "map": MapConfig, "backend": BackendConfig}

    @classmethod
    def parameter_names(cls) -> set[str]:
        return {n for c in cls.SECTIONS.values() for n in parameter_specs(c)}

    @classmethod
    def from_flat(cls, values: dict[str, Any], strict: bool = True) -> "MapperConfig":
        """Build from flat ``{parameter_name: value}`` (how ROS parameters arrive); names are
        unique across the sections. Unknown names raise ValueError when ``strict``."""
        owner = {f.name: s for s, c in cls.SECTIONS.items() for f in fields(c)}
        kwargs: dict[str, dict[str, Any]] = {s: {} for s in cls.SECTIONS}
        unknown = []
        for name, value in values.items():
            if name in owner:
                kwargs[owner[name]][name] = value
            else:
                unknown.append(name)
        if unknown and strict:
            raise ValueError(f"unknown mapper parameters {sorted(unknown)}; known: {sorted(owner)}")
        return cls(**{s: c(**kwargs[s]) for s, c in cls.SECTIONS.items()})
