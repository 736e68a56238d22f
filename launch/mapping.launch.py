"""Start the spark3r mapping node with parameters from config/mapping.yaml.

    ros2 launch spark3r_ros mapping.launch.py image:=/camera/image_raw \
        camera_info:=/camera/camera_info checkpoint:=/data/VGGT-1B/model.pt [threads:=3]
    ros2 launch spark3r_ros mapping.launch.py load_directory:=~/.ros/spark3r_maps localization_only:=true

Launch arguments override the parameters file only when they are given (non-empty).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _nodes(context):
    share = get_package_share_directory("spark3r_ros")
    use_sim_time = LaunchConfiguration("use_sim_time").perform(context).lower() in ("1", "true", "yes")
    overrides = {"use_sim_time": use_sim_time}
    for name in ("checkpoint", "backbone", "threads", "load_directory", "localization_only"):
        value = LaunchConfiguration(name).perform(context)
        if value:
            if name == "threads":
                value = int(value)
            elif name == "localization_only":
                value = value.lower() in ("1", "true", "yes")
            overrides[name] = value
    image = LaunchConfiguration("image").perform(context)
    mapping = Node(
        package="spark3r_ros",
        executable="mapping_node",
        name="spark3r_mapping",
        output="screen",
        parameters=[LaunchConfiguration("params_file").perform(context), overrides],
        remappings=[
            ("image", image),
            ("image/compressed", image.rstrip("/") + "/compressed"),
            ("camera_info", LaunchConfiguration("camera_info").perform(context)),
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", os.path.join(share, "config", "mapping.rviz")],
        parameters=[{"use_sim_time": use_sim_time}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return [mapping, rviz]


def generate_launch_description():
    share = get_package_share_directory("spark3r_ros")
    return LaunchDescription([
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="Use /clock (bag replay with `ros2 bag play --clock`)."),
        DeclareLaunchArgument("image", default_value="/camera/image_raw",
                              description="sensor_msgs/Image topic; <image>/compressed is the CompressedImage input."),
        DeclareLaunchArgument("camera_info", default_value="/camera/camera_info",
                              description="sensor_msgs/CameraInfo topic."),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "mapping.yaml"),
                              description="Node parameters (YAML)."),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="Checkpoint file, Hugging Face directory or hub id (empty: from params_file)."),
        DeclareLaunchArgument("backbone", default_value="",
                              description="Backbone preset, e.g. vggt-1b (empty: from params_file)."),
        DeclareLaunchArgument("threads", default_value="",
                              description="CPU threads for inference; 0 = usable cores - 1 (empty: from params_file)."),
        DeclareLaunchArgument("load_directory", default_value="",
                              description="A map saved by ~/save_map to load at start-up (empty: from params_file)."),
        DeclareLaunchArgument("localization_only", default_value="",
                              description="true: only relocalize in the loaded map, never extend it (empty: from params_file)."),
        DeclareLaunchArgument("rviz", default_value="false", description="Also start RViz with config/mapping.rviz."),
        OpaqueFunction(function=_nodes),
    ])
