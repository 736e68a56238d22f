"""One name per parameter: config/mapping.yaml <-> the node's declared parameters <-> the launch file.

The launch file cannot be imported here (no `launch` package), so it is read with `ast`.
"""
from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")

from rclpy.parameter import Parameter  # noqa: E402

from spark3r_ros.mapping_node import NODE_NAME, MappingNode, all_parameter_docs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YAML_PATH = REPO / "config" / "mapping.yaml"
LAUNCH_PATH = REPO / "launch" / "mapping.launch.py"
RVIZ_PATH = REPO / "config" / "mapping.rviz"


class NeverCalledBackbone:
    def predict(self, window):
        raise AssertionError("no image is sent in these tests")


def yaml_parameters() -> dict:
    doc = yaml.safe_load(YAML_PATH.read_text())
    assert list(doc) == [NODE_NAME], "the YAML must configure exactly the node of the launch file"
    return doc[NODE_NAME]["ros__parameters"]


def make_node(context, **overrides):
    params = [Parameter(name, value=value) for name, value in overrides.items()]
    return MappingNode(backbone_factory=lambda b, m: NeverCalledBackbone(), context=context,
                       parameter_overrides=params, use_global_arguments=False)


def destroy(node) -> None:
    node.stop()
    node.destroy_node()


def declared(node) -> set[str]:
    """Parameters the mapping node declares on top of those every rclpy node has."""
    plain = rclpy.create_node("plain_node_for_builtin_parameters", context=node.context)
    try:
        builtin = set(plain._parameters)
    finally:
        plain.destroy_node()
    return set(node._parameters) - builtin


def test_yaml_and_declared_parameters_are_the_same_set(ros_context):
    values = yaml_parameters()
    node = make_node(ros_context, **values)  # the node accepts every YAML value as it is
    try:
        assert declared(node) == set(values) == set(all_parameter_docs())
        # The names issue 13 gives the back end and sessions (ROS and --param alike).
        assert {"pose_graph", "loop_closure", "loop_min_score", "loop_min_keyframe_gap", "loop_min_inlier_fraction",
                "load_directory", "localization_only", "save_directory"} <= declared(node)
        for name, value in values.items():
            assert node.get_parameter(name).value == value, name
            descriptor = node.describe_parameter(name)
            assert descriptor.description and descriptor.read_only, name
    finally:
        destroy(node)


def test_descriptors_carry_ranges_and_out_of_range_values_are_refused(ros_context):
    node = make_node(ros_context)
    try:
        pct = node.describe_parameter("conf_percentile").floating_point_range[0]
        assert (pct.from_value, pct.to_value) == (0.0, 100.0)
        width = node.describe_parameter("image_width").integer_range[0]
        assert width.step == 14 and width.from_value == 0  # 0 = the preset's native width
        assert node.describe_parameter("queue_depth").integer_range[0].from_value == 1
    finally:
        destroy(node)
    with pytest.raises(rclpy.exceptions.InvalidParameterValueException):
        make_node(ros_context, conf_percentile=150.0)


@pytest.mark.parametrize("overrides, message", [
    (dict(window_size=4, window_stride=4), "window_stride"),
    (dict(image_transport="theora"), "image_transport"),
    (dict(map_frame="odom"), "three different frames"),
    (dict(reduction="dense", reduction_schedule="/tmp/schedule.json"), "reduction_schedule"),
])
def test_invalid_values_are_refused_with_the_parameter_name(ros_context, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_node(ros_context, **overrides)


def test_the_process_exits_with_code_2_and_says_which_parameter(ros_context):
    from ros_helpers import ros_process

    with ros_process("spark3r_ros.mapping_node", "--ros-args", "-p", "window_size:=4", "-p", "window_stride:=9") as proc:
        deadline = time.monotonic() + 60
        while proc.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.popen.returncode == 2, proc.log_text()
        assert "invalid parameters" in proc.log_text() and "window_stride" in proc.log_text()


def _launch_tree():
    return ast.parse(LAUNCH_PATH.read_text())


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _kwarg(call, name):
    return next(k.value for k in call.keywords if k.arg == name)


def test_launch_file_matches_the_node(ros_context):
    tree = _launch_tree()
    arguments = {ast.literal_eval(c.args[0]) for c in _calls(tree, "DeclareLaunchArgument")}
    assert {"use_sim_time", "image", "camera_info", "params_file", "checkpoint", "backbone", "threads"} <= arguments
    (node_call,) = [c for c in _calls(tree, "Node") if ast.literal_eval(_kwarg(c, "executable")) == "mapping_node"]
    assert ast.literal_eval(_kwarg(node_call, "name")) == NODE_NAME
    remapped = {ast.literal_eval(pair.elts[0]) for pair in _kwarg(node_call, "remappings").elts}
    # Launch arguments that override parameters must be parameters of the node.
    overridden = set()
    for loop in (n for n in ast.walk(tree) if isinstance(n, ast.For)):
        if isinstance(loop.iter, ast.Tuple):
            overridden |= {ast.literal_eval(e) for e in loop.iter.elts}
    assert overridden == {"checkpoint", "backbone", "threads", "load_directory", "localization_only"}
    node_raw = make_node(ros_context)
    node_compressed = make_node(ros_context, image_transport="compressed")
    try:
        assert overridden <= declared(node_raw)
        topics = {s.topic_name for n in (node_raw, node_compressed) for s in n.subscriptions}
        # The node subscribes to exactly the relative names the launch file remaps.
        assert {"/image", "/image/compressed", "/camera_info"} <= topics
        assert {t.lstrip("/") for t in topics if t in ("/image", "/image/compressed", "/camera_info")} == remapped
    finally:
        destroy(node_raw)
        destroy(node_compressed)
    # Files the launch file refers to are installed by setup.py (config/*, launch/*.launch.py).
    source = LAUNCH_PATH.read_text()
    assert '"mapping.yaml"' in source and '"mapping.rviz"' in source
    assert YAML_PATH.is_file() and RVIZ_PATH.is_file()


def test_rviz_config_shows_the_node_topics_in_the_map_frame():
    rviz = yaml.safe_load(RVIZ_PATH.read_text())
    manager = rviz["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "map"
    topics = {}
    for display in manager["Displays"]:
        topic = display.get("Topic", {}).get("Value") if isinstance(display.get("Topic"), dict) else None
        if topic:
            topics[topic] = display["Class"]
    assert topics == {
        f"/{NODE_NAME}/map": "rviz_default_plugins/PointCloud2",
        f"/{NODE_NAME}/cloud": "rviz_default_plugins/PointCloud2",
        f"/{NODE_NAME}/path": "rviz_default_plugins/Path",
        f"/{NODE_NAME}/odometry": "rviz_default_plugins/Odometry",
    }
    assert any(d["Class"] == "rviz_default_plugins/TF" for d in manager["Displays"])


def test_reduction_schedule_file_reaches_the_model(ros_context, tmp_path):
    pytest.importorskip("torch")
    from spark3r.accel.schedule import KVSchedule, save_schedule

    base = dict(backbone="vggt-tiny", checkpoint="seeded", image_width=56, reduction="spark3r")
    node = MappingNode(context=ros_context, use_global_arguments=False,
                       parameter_overrides=[Parameter(k, value=v) for k, v in base.items()])
    try:
        assert node.backbone_error == ""
        layers = node.mapper.backbone.model.accel_handle.op.schedule.num_layers
    finally:
        destroy(node)
    schedule = KVSchedule(kv_keep=tuple(0.25 + 0.5 * (i % 2) for i in range(layers)), note="test")
    path = save_schedule(schedule, tmp_path / "schedule.json")
    node = MappingNode(context=ros_context, use_global_arguments=False, parameter_overrides=[
        Parameter(k, value=v) for k, v in dict(base, reduction_schedule=str(path)).items()])
    try:
        assert node.mapper.backbone.model.accel_handle.op.schedule.kv_keep == schedule.kv_keep
    finally:
        destroy(node)
    # A missing file is a backbone problem: the node stays up and says so.
    node = MappingNode(context=ros_context, use_global_arguments=False, parameter_overrides=[
        Parameter(k, value=v) for k, v in dict(base, reduction_schedule=str(tmp_path / "missing.json")).items()])
    try:
        assert node.mapper is None and "missing.json" in node.backbone_error
        assert node.diagnostics_values()["backbone_error"] == node.backbone_error
    finally:
        destroy(node)


def test_frame_queue_is_bounded_and_drops_the_oldest():
    from spark3r_ros.mapping_node import FrameQueue

    q = FrameQueue(2)
    assert [q.put(i) for i in range(4)] == [False, False, True, True]
    assert q.dropped == 2 and len(q) == 2
    assert [q.get(0.01), q.get(0.01), q.get(0.01)] == [2, 3, None]
    with pytest.raises(ValueError, match="depth"):
        FrameQueue(0)


def test_readme_parameter_table_lists_every_parameter():
    import re

    readme = (REPO / "README.md").read_text()
    section = readme.split("### Parameters", 1)[1].split("\n### ", 1)[0]
    names = re.findall(r"^\| `([a-z_0-9.]+)` \|", section, flags=re.MULTILINE)
    assert len(names) == len(set(names)) and set(names) == set(all_parameter_docs())


def test_reduction_parameters_are_declared_and_reach_the_model(ros_context):
    """reduction.<name> parameters come from the method's config dataclass and reach accel.apply."""
    pytest.importorskip("torch")
    node = make_node(ros_context)
    try:
        descriptor = node.describe_parameter("reduction.query_keep")
        assert descriptor.description and descriptor.read_only
        assert node.get_parameter("reduction.query_group").value == [2, 2]
        assert node.backbone_config.reduction_params == {}
    finally:
        destroy(node)
    base = dict(backbone="vggt-tiny", checkpoint="seeded", image_width=56, reduction="spark3r")
    node = MappingNode(context=ros_context, use_global_arguments=False, parameter_overrides=[
        Parameter(k, value=v) for k, v in dict(base, **{"reduction.query_keep": 1}).items()])
    try:
        assert node.backbone_error == ""
        assert node.mapper.backbone.model.accel_handle.op.config.query_keep == 1
    finally:
        destroy(node)
    with pytest.raises(ValueError, match="reduction.query_keep=1 is set but reduction='dense'"):
        make_node(ros_context, **{"reduction.query_keep": 1})


def test_yaml_and_readme_table_are_generated_from_the_config_dataclasses():
    from spark3r_ros.parameters import mapping_yaml, readme_table

    assert YAML_PATH.read_text() == mapping_yaml(NODE_NAME), "regenerate: python -m spark3r_ros.parameters yaml"
    assert readme_table() in (REPO / "README.md").read_text(), "regenerate: python -m spark3r_ros.parameters table"
