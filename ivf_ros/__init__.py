"""ivf_ros: infrared + visible image fusion and segmentation (ROS-free core and a thin ROS 2 node)."""

__version__ = "0.1.0"
