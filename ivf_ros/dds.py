"""DDS set-up shared by fusion_node and the tools that talk to it: the Fast DDS profile and the QoS defaults.

QoS of every subscription and publisher can be changed with ROS 2's standard ``qos_overrides`` parameters
(``QoSOverridingOptions``), e.g. ``qos_overrides./ir/image.subscription.reliability: reliable``.
"""
from __future__ import annotations

import os
from pathlib import Path

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions, QoSPolicyKind

PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"


# Functions, not constants: rclpy writes qos_overrides into the profile it is given.
def input_qos() -> QoSProfile:
    """SensorData: best effort, volatile, depth 5; matches any camera driver."""
    return QoSProfile(history=qos_profile_sensor_data.history, depth=qos_profile_sensor_data.depth,
                      reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)


def output_qos() -> QoSProfile:
    return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


def latched_qos() -> QoSProfile:
    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def overridable() -> QoSOverridingOptions:
    """History, depth, reliability and durability settable by ``qos_overrides`` parameters."""
    return QoSOverridingOptions([QoSPolicyKind.HISTORY, QoSPolicyKind.DEPTH, QoSPolicyKind.RELIABILITY,
                                 QoSPolicyKind.DURABILITY])


def share_file(*parts: str) -> Path:
    """A file shipped with the package: source tree first, then the ament share directory."""
    source = Path(__file__).resolve().parent.parent.joinpath(*parts)
    if source.exists():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("ivf_ros")).joinpath(*parts)
    except Exception:  # noqa: BLE001 - not installed by colcon: keep the source path
        return source


def use_fastdds_profile(environ=os.environ) -> str:
    """Point Fast DDS at the shipped profile unless the user chose one; call before ``rclpy.init``."""
    profile = share_file("config", "fastdds.xml")
    if not environ.get(PROFILE_ENV) and profile.is_file():
        environ[PROFILE_ENV] = str(profile)
    return environ.get(PROFILE_ENV, "")
