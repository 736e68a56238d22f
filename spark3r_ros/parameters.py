"""The mapping node's ROS parameters, declared from the config dataclasses' metadata.

Every parameter's default, description, range and step live in one place, the field of its
config dataclass (:mod:`spark3r.mapping.config`); this module only turns those
:class:`~spark3r.mapping.config.ParamSpec` s into ROS ``ParameterDescriptor`` s and the declared
values back into the configs. Sections, in declaration order: backbone (``BackboneConfig`` and
the reduction method's ``reduction.<name>``), keyframe gate, window, map, back end, outputs
(``OutputConfig``) and the node's own (:class:`NodeConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

from spark3r.mapping.config import (BackboneConfig, BackendConfig, KeyframeConfig, MapConfig, MapperConfig, OutputConfig,
                                    ParamSpec, WindowConfig, check_fields, param, parameter_specs, reduction_parameter_specs)


@dataclass
class NodeConfig:
    """Parameters of the node itself: input transport, queue, map rate, save/load folders, localization mode."""

    image_transport: str = param("raw", "'raw' subscribes sensor_msgs/Image on 'image', 'compressed' CompressedImage on "
                                        "'image/compressed'", choices=("raw", "compressed"))
    queue_depth: int = param(4, "images waiting for the intake thread (decoding, keyframe gate); when full the oldest "
                                "is dropped (counted)", range=(1, 1000))
    map_publish_period: float = param(2.0, "minimum seconds between two ~/map publications (0 = after every window)",
                                      range=(0.0, 3600.0))
    save_directory: str = param("~/.ros/spark3r_maps", "where ~/save_map writes map.ply, trajectory.tum and (with "
                                                      "pose_graph) the loadable session in <save_directory>/session",
                                non_empty=True)
    load_directory: str = param("", "a map saved by ~/save_map (its folder or its session/ folder) that ~/load_map "
                                    "loads; when set, also loaded at start-up (empty = start with an empty map)")
    localization_only: bool = param(False, "with a loaded map: only relocalize in it and publish map -> odom, never "
                                           "extend it (new keyframes are tracked but not added)")

    def __post_init__(self) -> None:
        check_fields(self)


def all_parameter_specs() -> dict[str, ParamSpec]:
    """Every parameter the node declares, in declaration order: ``{name: ParamSpec}``."""
    specs: dict[str, ParamSpec] = {}
    sections = (parameter_specs(BackboneConfig), reduction_parameter_specs(), parameter_specs(KeyframeConfig),
                parameter_specs(WindowConfig), parameter_specs(MapConfig), parameter_specs(BackendConfig),
                parameter_specs(OutputConfig),
                parameter_specs(NodeConfig))
    for section in sections:
        overlap = set(section) & set(specs)
        if overlap:  # one name per thing
            raise RuntimeError(f"parameters declared twice: {sorted(overlap)}")
        specs.update(section)
    return specs


def all_parameter_docs() -> dict[str, tuple[object, str]]:
    """Every parameter the node declares: ``{name: (default, description)}``."""
    return {name: (spec.default, spec.doc) for name, spec in all_parameter_specs().items()}


def parameter_descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """Read-only descriptor with the description, the range (ROS ranges are inclusive; an
    excluded bound is checked by the config) and the accepted values in words."""
    desc = ParameterDescriptor(name=spec.name, description=spec.doc, read_only=True,
                               additional_constraints=f"expected {spec.expected()}")
    if spec.range is not None and not isinstance(spec.default, bool):
        lo, hi = spec.range
        if isinstance(spec.default, int):
            desc.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=int(spec.step or 1))]
        elif isinstance(spec.default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
    return desc


@dataclass
class NodeSettings:
    """The declared values as the configs the node's parts take."""

    backbone: BackboneConfig
    mapper: MapperConfig
    outputs: OutputConfig
    node: NodeConfig

    @classmethod
    def from_values(cls, values: dict) -> "NodeSettings":
        """ValueError naming the parameter for a value (or combination) the configs refuse."""
        def section(config_cls):
            return {n: values[n] for n in parameter_specs(config_cls)}

        node = NodeConfig(**section(NodeConfig))
        outputs = OutputConfig(**section(OutputConfig))
        mapper = MapperConfig.from_flat({n: values[n] for n in MapperConfig.parameter_names()})
        backbone_values = section(BackboneConfig)
        backbone_values.update({n: v for n, v in values.items() if n.startswith("reduction.")})
        return cls(BackboneConfig.from_flat(backbone_values), mapper, outputs, node)


# -- the documentation views of the same specs (config/mapping.yaml, the README table) ----------

_SECTIONS = (
    ("backbone", lambda: parameter_specs(BackboneConfig)),
    ("reduction method parameters (reduction.<name>; only the chosen method's may differ from their default)",
     reduction_parameter_specs),
    ("keyframe gate", lambda: parameter_specs(KeyframeConfig)),
    ("sliding window and alignment", lambda: parameter_specs(WindowConfig)),
    ("point extraction and voxel map", lambda: parameter_specs(MapConfig)),
    ("SLAM back end: keyframe store, pose graph, loop closure", lambda: parameter_specs(BackendConfig)),
    ("frames, TF (REP-105) and path", lambda: parameter_specs(OutputConfig)),
    ("input, map rate, services", lambda: parameter_specs(NodeConfig)),
)


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return repr(value)


def range_text(spec: ParamSpec) -> str:
    """The README's range column: ``low–high`` with its step and excluded bounds, or the choices."""
    if spec.choices:
        return ", ".join(str(c) for c in spec.choices)
    if spec.range is None:
        return ""
    lo, hi = spec.range
    text = f"{lo}–{hi}"
    if spec.step not in (None, 1):
        text += f", step {spec.step}"
    excluded = [str(b) for b, side in ((lo, "low"), (hi, "high")) if side in spec.exclusive]
    return text + (f" (not {' or '.join(excluded)})" if excluded else "")


def mapping_yaml(node_name: str, width: int = 100) -> str:
    """``config/mapping.yaml``: every declared parameter at its default, with its description."""
    import textwrap

    lines = [f"# Parameters of the spark3r mapping node (node name {node_name}, see launch/mapping.launch.py).",
             "# Every parameter the node declares is here; names are the same in the mapper's config dataclasses,",
             "# on the command line (--ros-args -p name:=value) and in the README. Read once at start-up.",
             "# Generated from the config dataclasses: python -m spark3r_ros.parameters yaml",
             f"{node_name}:", "  ros__parameters:"]
    for title, specs in _SECTIONS:
        lines.append(f"    # --- {title}")
        for spec in specs().values():
            lines += textwrap.wrap(spec.doc, width, initial_indent="    # ", subsequent_indent="    # ")
            lines.append(f"    {spec.name}: {_yaml_value(spec.default)}")
    return "\n".join(lines) + "\n"


def readme_table() -> str:
    """The README's parameter table."""
    rows = ["| parameter | default | range | meaning |", "|---|---|---|---|"]
    for _, specs in _SECTIONS:
        for spec in specs().values():
            rows.append(f"| `{spec.name}` | `{_yaml_value(spec.default)}` | {range_text(spec)} | {spec.doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    from spark3r_ros.mapping_node import NODE_NAME

    sys.stdout.write(mapping_yaml(NODE_NAME) if sys.argv[1:] == ["yaml"] else readme_table())
