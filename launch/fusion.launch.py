"""Launch fusion_node: ``ros2 launch ivf_ros fusion.launch.py ir_topic:=/thermal/image_raw device:=cuda``
(add ``backend:=onnxruntime`` or ``backend:=tensorrt`` to change the inference backend, ``transport:=compressed`` to
read ``<topic>/compressed``; the visible camera's CameraInfo is read from ``visible_info_topic``).

Sets FASTDDS_DEFAULT_PROFILES_FILE to the shipped large-image profile unless it is already set, so the node (and
anything else started from this launch) can move full-size images over best-effort QoS. ``checkpoint``,
``device``, ``backend`` and ``transport`` override the parameters file only when given.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _node(context):
    overrides = {name: LaunchConfiguration(name).perform(context)
                 for name in ("checkpoint", "device", "backend", "transport")}
    topics = {name: LaunchConfiguration(name).perform(context) for name in ("ir_topic", "visible_topic")}
    return [Node(
        package="ivf_ros",
        executable="fusion_node",
        name="fusion_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file"), {k: v for k, v in overrides.items() if v}],
        remappings=[("ir/image", topics["ir_topic"]), ("visible/image", topics["visible_topic"]),
                    ("ir/image/compressed", topics["ir_topic"] + "/compressed"),
                    ("visible/image/compressed", topics["visible_topic"] + "/compressed"),
                    ("visible/camera_info", LaunchConfiguration("visible_info_topic"))],
        output="screen",
    )]


def generate_launch_description():
    share = get_package_share_directory("ivf_ros")
    arguments = {
        "ir_topic": ("ir/image", "IR sensor_msgs/Image topic"),
        "visible_topic": ("visible/image", "visible sensor_msgs/Image topic"),
        "visible_info_topic": ("visible/camera_info", "visible sensor_msgs/CameraInfo topic"),
        "transport": ("", "raw or compressed (<topic>/compressed); empty = as in params_file"),
        "checkpoint": ("", "fusion checkpoint (.safetensors); empty = as in params_file"),
        "device": ("", "auto, cpu, cuda or cuda:N; empty = as in params_file"),
        "backend": ("", "torch, compile, onnxruntime or tensorrt; empty = as in params_file"),
        "params_file": (os.path.join(share, "config", "fusion.yaml"), "node parameters file"),
        "namespace": ("", "namespace of the node"),
    }
    actions = [DeclareLaunchArgument(name, default_value=default, description=text)
               for name, (default, text) in arguments.items()]
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        actions.append(SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE",
                                              os.path.join(share, "config", "fastdds.xml")))
    actions.append(OpaqueFunction(function=_node))
    return LaunchDescription(actions)
