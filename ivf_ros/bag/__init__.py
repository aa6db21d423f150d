"""rosbag2 tools: write camera bags from image folders, evaluate the fusion pipeline on any bag, replay bags over ROS.

- ``files``: constants, message builders, writing camera bags and reading bags with the pure-Python ``rosbags``
  library (mcap and sqlite3 storage, no ROS needed), and the helpers both evaluations share.
- ``evaluate``: offline evaluation: sync + the node's pipeline on each pair, output bag, report, plots (no ROS).
- ``live``: replay a bag over ROS 2, and evaluate the real ``fusion_node`` by replaying a bag into it.
"""
from .evaluate import evaluate_bag
from .files import (COMPRESSED_TYPE, IMAGE_TYPE, IR_TOPIC, START_NS, STORAGES, VIS_TOPIC, BagError, CameraStream,
                    folder_streams, frame_names, header_seconds, image_message, open_bag, output_topics, pick_topics,
                    typestore, write_camera_bag)
from .live import evaluate_live, replay

__all__ = ["BagError", "COMPRESSED_TYPE", "CameraStream", "IMAGE_TYPE", "IR_TOPIC", "START_NS", "STORAGES", "VIS_TOPIC",
           "evaluate_bag", "evaluate_live", "folder_streams", "frame_names", "header_seconds", "image_message",
           "open_bag", "output_topics", "pick_topics", "replay", "typestore", "write_camera_bag"]
