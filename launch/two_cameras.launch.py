"""Two camera pairs, two fusion nodes: ``ros2 launch ivf_ros two_cameras.launch.py``.

Includes fusion.launch.py once per namespace (``front``, ``rear``), so each node starts as a single one does: the
same parameters file (``/**`` serves both), remaps (raw and compressed image topics, camera info) and Fast DDS
profile. Each reads its namespace's ``ir/image``, ``visible/image`` and ``visible/camera_info`` and publishes
``/<namespace>/fusion_node/fused``, ``.../labels``, ``.../camera_info``. Remap a namespace's inputs to your drivers'
topics with ``front_ir``, ``front_visible``, ``front_visible_info`` (``rear_...`` likewise); fusion.launch.py's
other arguments (``params_file``, ``transport``, ``checkpoint``, ``device``, ``backend``) apply to both nodes.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, GroupAction, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

NAMESPACES = ("front", "rear")
INPUTS = {"ir": ("ir_topic", "ir/image"), "visible": ("visible_topic", "visible/image"),
          "visible_info": ("visible_info_topic", "visible/camera_info")}  # suffix: fusion.launch.py's argument, topic


def generate_launch_description():
    fusion = PythonLaunchDescriptionSource(
        os.path.join(get_package_share_directory("ivf_ros"), "launch", "fusion.launch.py"))
    actions = []
    for ns in NAMESPACES:
        arguments = {"namespace": ns}
        for suffix, (argument, topic) in INPUTS.items():
            actions.append(DeclareLaunchArgument(f"{ns}_{suffix}", default_value=f"/{ns}/{topic}",
                                                 description=f"{ns} {topic} topic"))
            arguments[argument] = LaunchConfiguration(f"{ns}_{suffix}")
        # scoped: one camera pair's topics and namespace do not reach the other's include
        actions.append(GroupAction([IncludeLaunchDescription(fusion, launch_arguments=arguments.items())]))
    return LaunchDescription(actions)
