"""Helpers of the node tests: a harness node that plays the cameras and records what fusion_node sends back,
and a factory that starts a fresh fusion_node (own namespace, own parameters) per test or small group."""
import os
import random
import threading
import time

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Log
from rcl_interfaces.srv import SetParameters
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from ivf_ros import ros_image
from ivf_ros.dds import latched_qos, use_fastdds_profile

# ROS_DOMAIN_ID when set (helpers running tests side by side each have their own), else a random one
DOMAIN = int(os.environ.get("ROS_DOMAIN_ID") or random.randint(101, 199))
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
RNG = np.random.default_rng(0)
OUTPUTS = ("fused", "labels", "labels_color", "camera_info")
DEFAULTS = {"silence_timeout": 0.6, "publish_labels_color": True, "sync.slop": 0.03, "diagnostics_period": 0.5,
            "device": "cpu"}


def ir16(h, w):
    return RNG.integers(6000, 9000, (h, w), dtype=np.uint16)


def bgr(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def image(array, array_encoding, stamp_ns, frame_id="", **override):
    """An Image of ``array``; ``override`` then sets fields (encoding, step, data, ...) to make it bad."""
    msg = ros_image.fill_image(Image(), array, array_encoding)
    msg.header.stamp = Time(nanoseconds=stamp_ns).to_msg()
    msg.header.frame_id = frame_id
    for name, value in override.items():
        setattr(msg, name, value)
    return msg


def compressed(array, stamp_ns, frame_id="", fmt=None, data=None):
    """A CompressedImage as image_transport writes it: PNG for gray (16-bit kept), JPEG for colour."""
    png = array.ndim == 2
    ok, buf = cv2.imencode(".png" if png else ".jpg", array)
    assert ok
    msg = CompressedImage(format=fmt or ("mono16; png compressed mono16" if array.dtype == np.uint16 else
                                         "mono8; png compressed mono8" if png else "bgr8; jpeg compressed bgr8"))
    msg.data = bytes(buf) if data is None else data
    msg.header.stamp = Time(nanoseconds=stamp_ns).to_msg()
    msg.header.frame_id = frame_id
    return msg


def stamp_ns(msg):
    return Time.from_msg(msg.header.stamp).nanoseconds


def value(status, key):
    return float(next(kv.value for kv in status.values if kv.key == key))


class Harness:
    """A plain test node: publishes camera images, records what fusion_node sends back."""

    def __init__(self, context, namespace="/", outputs=OUTPUTS, image_type=Image, ir_qos=qos_profile_sensor_data):
        self.node = Node("harness", namespace=namespace, context=context)
        self.lock = threading.Lock()
        self.got = {name: [] for name in (*OUTPUTS, "class_names", "rosout", "diagnostics")}
        for name in outputs:
            self.subscribe(name)
        self.node.create_subscription(String, "fusion_node/class_names", self._recorder("class_names"), latched_qos())
        self.node.create_subscription(Log, "/rosout", self._recorder("rosout"), RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._recorder("diagnostics"), RELIABLE)
        suffix = "/compressed" if image_type is CompressedImage else ""
        self.ir = self.node.create_publisher(image_type, f"ir/image{suffix}", ir_qos)
        self.vis = self.node.create_publisher(image_type, f"visible/image{suffix}", qos_profile_sensor_data)
        self.info = self.node.create_publisher(CameraInfo, "visible/camera_info", RELIABLE)
        self.prefix = namespace.strip("/").replace("/", ".")

    def subscribe(self, name):
        kind = CameraInfo if name == "camera_info" else Image
        return self.node.create_subscription(kind, f"fusion_node/{name}", self._recorder(name), RELIABLE)

    def _recorder(self, name):
        def record(msg):
            with self.lock:
                self.got[name].append(msg)
        return record

    def now_ns(self):
        return self.node.get_clock().now().nanoseconds

    def pair(self, ir, ir_encoding, vis, vis_encoding, stamp=None, jitter_s=0.0, **ir_override):
        """Publish one raw pair; returns the visible stamp (ns)."""
        stamp = self.now_ns() if stamp is None else stamp
        self.ir.publish(image(ir, ir_encoding, stamp + int(jitter_s * 1e9), "ir", **ir_override))
        self.vis.publish(image(vis, vis_encoding, stamp, "camera"))
        return stamp

    def good_pair(self):
        return self.pair(ir16(120, 160), "mono16", bgr(120, 160), "bgr8")

    def count(self, name):
        with self.lock:
            return len(self.got[name])

    def since(self, name, start):
        with self.lock:
            return list(self.got[name][start:])

    def logs(self, start, text):
        name = f"{self.prefix}.fusion_node" if self.prefix else "fusion_node"
        return [m.msg for m in self.since("rosout", start) if m.name == name and text in m.msg]

    def fused_stamp(self, stamp, start=0, topic="fused"):
        """The message on ``topic`` (from the ``start``-th on) with ``stamp``, waited for; None if none came."""
        def found():
            return next((m for m in self.since(topic, start) if stamp_ns(m) == stamp), None)

        self.wait(lambda: found() is not None)
        return found()

    def wait(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def set_remote(self, name, val):
        """Set one fusion_node parameter through its service, as ``ros2 param set`` does; returns the result."""
        client = self.node.create_client(SetParameters, "fusion_node/set_parameters")
        try:
            assert client.wait_for_service(timeout_sec=5.0)
            request = SetParameters.Request(parameters=[Parameter(name, value=val).to_parameter_msg()])
            future = client.call_async(request)
            assert self.wait(future.done, timeout=5.0), "no answer from fusion_node/set_parameters (node dead?)"
            return future.result().results[0]
        finally:
            self.node.destroy_client(client)


class Ros:
    """One rclpy context for a test module; ``spin(*nodes)`` spins nodes on their own executor until ``stop``."""

    def __init__(self):
        use_fastdds_profile()
        self.context = Context()
        rclpy.init(context=self.context, domain_id=DOMAIN)
        self.count = 0
        self.spinning = {}  # node -> executor

    def namespace(self):
        self.count += 1
        return f"/t{os.getpid()}_{self.count}"

    def add(self, *nodes):
        executor = SingleThreadedExecutor(context=self.context)
        for node in nodes:
            executor.add_node(node)
            self.spinning[node] = executor
        threading.Thread(target=executor.spin, daemon=True).start()

    def remove(self, *nodes):
        """Stop spinning ``nodes`` (their executor ends first: destroying a spinning node races) and destroy them."""
        for executor in {self.spinning.pop(node) for node in nodes}:
            executor.shutdown()
        for node in nodes:
            if hasattr(node, "_stop"):
                node._stop()
            node.destroy_node()

    @classmethod
    def shared(cls):
        """The process's one test context: shutting a context down ends rclpy's logging to /rosout for later ones,
        so the node test modules share it (and it ends with the process)."""
        if not hasattr(cls, "_shared"):
            cls._shared = cls()
        return cls._shared


def warm_up(harness, topic="fused", publish=None):
    """Discovery completes on both sides at different moments: publish until a pair gets through."""
    publish = publish or harness.good_pair
    start = harness.count(topic)

    def one():
        publish()
        return harness.wait(lambda: harness.count(topic) > start, timeout=0.3)

    assert harness.wait(one, timeout=20.0), "no output within 20 s"
    settled = [harness.count(topic), time.monotonic()]

    def quiet():  # earlier warm-up pairs may still be on their way
        if harness.count(topic) != settled[0]:
            settled[:] = [harness.count(topic), time.monotonic()]
        return time.monotonic() - settled[1] > 0.5

    harness.wait(quiet)
