"""Two camera pairs, two fusion nodes: ``ros2 launch ivf_ros two_cameras.launch.py``.

Each node runs in its own namespace (``front``, ``rear``), reads that namespace's ``ir/image``, ``visible/image`` and
``visible/camera_info`` and publishes ``/<namespace>/fusion_node/fused``, ``.../labels``, ``.../camera_info``; one
parameters file serves both (``/**``). Remap a namespace's inputs to your drivers' topics with ``front_ir`` etc.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

NAMESPACES = ("front", "rear")


def generate_launch_description():
    share = get_package_share_directory("ivf_ros")
    actions = [DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "fusion.yaml"),
                                     description="parameters file of both nodes")]
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):  # the large-image profile, as fusion.launch.py
        actions.append(SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE",
                                              os.path.join(share, "config", "fastdds.xml")))
    for ns in NAMESPACES:
        actions += [DeclareLaunchArgument(f"{ns}_ir", default_value=f"/{ns}/ir/image", description=f"{ns} IR topic"),
                    DeclareLaunchArgument(f"{ns}_visible", default_value=f"/{ns}/visible/image",
                                          description=f"{ns} visible topic")]
        actions.append(Node(
            package="ivf_ros", executable="fusion_node", name="fusion_node", namespace=ns,
            parameters=[LaunchConfiguration("params_file")],
            remappings=[("ir/image", LaunchConfiguration(f"{ns}_ir")),
                        ("visible/image", LaunchConfiguration(f"{ns}_visible"))],
            output="screen"))
    return LaunchDescription(actions)
