"""fusion_node over real DDS: the node runs in this process (and as subprocesses), the test talks to it through
topics, /rosout, /diagnostics and the parameter and lifecycle services. Random domain id per run."""
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.srv import GetState
from rcl_interfaces.msg import Log
from rcl_interfaces.srv import SetParameters
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import Image
from std_msgs.msg import String

from ivf_ros import ros_image
from ivf_ros.node import FusionNode, use_fastdds_profile

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = random.randint(101, 199)
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
RNG = np.random.default_rng(0)


def _ir16(h, w):
    return RNG.integers(6000, 9000, (h, w), dtype=np.uint16)


def _bgr(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _image(array, array_encoding, stamp_ns, frame_id="", **override):
    """An Image of ``array``; ``override`` then sets fields (encoding, step, data, ...) to make it bad."""
    msg = ros_image.fill_image(Image(), array, array_encoding)
    msg.header.stamp = Time(nanoseconds=stamp_ns).to_msg()
    msg.header.frame_id = frame_id
    for name, value in override.items():
        setattr(msg, name, value)
    return msg


class Harness:
    """A plain test node: publishes camera images, records what fusion_node sends back."""

    def __init__(self, context, namespace="/"):
        self.node = Node("harness", namespace=namespace, context=context)
        self.lock = threading.Lock()
        self.got = {name: [] for name in ("fused", "labels", "labels_color", "class_names", "rosout", "diagnostics")}
        for name in ("fused", "labels", "labels_color"):
            self.node.create_subscription(Image, f"fusion_node/{name}", self._recorder(name), RELIABLE)
        self.node.create_subscription(String, "fusion_node/class_names", self._recorder("class_names"), LATCHED)
        self.node.create_subscription(Log, "/rosout", self._recorder("rosout"), RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._recorder("diagnostics"), RELIABLE)
        self.ir = self.node.create_publisher(Image, "ir/image", qos_profile_sensor_data)
        self.vis = self.node.create_publisher(Image, "visible/image", qos_profile_sensor_data)

    def _recorder(self, name):
        def record(msg):
            with self.lock:
                self.got[name].append(msg)
        return record

    def now_ns(self):
        return self.node.get_clock().now().nanoseconds

    def pair(self, ir, ir_encoding, vis, vis_encoding, stamp_ns=None, jitter_s=0.0, **ir_override):
        """Publish one pair; returns the visible stamp (ns)."""
        stamp_ns = self.now_ns() if stamp_ns is None else stamp_ns
        self.ir.publish(_image(ir, ir_encoding, stamp_ns + int(jitter_s * 1e9), "ir", **ir_override))
        self.vis.publish(_image(vis, vis_encoding, stamp_ns, "camera"))
        return stamp_ns

    def count(self, name):
        with self.lock:
            return len(self.got[name])

    def since(self, name, start):
        with self.lock:
            return list(self.got[name][start:])

    def logs(self, start, text):
        return [m.msg for m in self.since("rosout", start) if m.name == "fusion_node" and text in m.msg]

    def wait(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()


def _stamp_ns(msg):
    return Time.from_msg(msg.header.stamp).nanoseconds


def _start_subprocess(*ros_args, env_extra=None):
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "ivf_ros.node", "--ros-args", *ros_args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    return path


@pytest.fixture(scope="module")
def refused(corrupt_checkpoint):
    """Nodes that must refuse to start, started together (each takes seconds to import torch here)."""
    procs = {
        "missing": _start_subprocess("-p", "checkpoint:=/nonexistent/model.safetensors", "-r", "__ns:=/missing"),
        "corrupt": _start_subprocess("-p", f"checkpoint:={corrupt_checkpoint}", "-r", "__ns:=/corrupt"),
        "bad_param": _start_subprocess("-p", "sync.slop:=5.0", "-r", "__ns:=/bad"),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ros():
    use_fastdds_profile()
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    node = FusionNode(context=context, parameter_overrides=[
        Parameter("silence_timeout", value=0.6), Parameter("publish_labels_color", value=True),
        Parameter("sync.slop", value=0.03), Parameter("diagnostics_period", value=0.5)])
    assert node.start(), node.failure
    harness = Harness(context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(harness.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    assert harness.wait(lambda: harness.ir.get_subscription_count() and harness.vis.get_subscription_count())

    def warm_up():  # discovery completes on both sides at different moments: publish until a pair gets through
        harness.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
        return harness.wait(lambda: harness.count("fused") > 0, timeout=0.3)

    assert harness.wait(warm_up, timeout=20.0)
    yield node, harness
    executor.shutdown()
    node._stop()
    node.destroy_node()
    harness.node.destroy_node()
    rclpy.shutdown(context=context)


def test_fuses_jittered_pairs(ros):
    node, h = ros
    start = {name: h.count(name) for name in h.got}
    sent = []
    for _ in range(6):
        sent.append(h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8", jitter_s=random.uniform(-0.01, 0.01)))
        time.sleep(0.1)
    assert h.wait(lambda: h.count("labels") - start["labels"] >= 6 and h.count("fused") - start["fused"] >= 6)
    fused, labels = h.since("fused", start["fused"]), h.since("labels", start["labels"])
    assert [_stamp_ns(m) for m in fused] == sent and [_stamp_ns(m) for m in labels] == sent
    for msg in fused:
        assert (msg.encoding, msg.width, msg.height, msg.header.frame_id) == ("bgr8", 160, 120, "camera")
    for msg in labels:
        assert (msg.encoding, msg.width, msg.height, msg.step) == ("mono8", 160, 120, 160)
        assert ros_image.image_to_array(msg).max() < len(node.pipeline.classes)
    colour = h.since("labels_color", start["labels_color"])[0]
    assert (colour.encoding, colour.width, colour.height) == ("bgr8", 160, 120)
    assert h.wait(lambda: h.count("class_names"))
    assert json.loads(h.got["class_names"][-1].data)["classes"] == node.pipeline.classes


def test_full_size_visible_with_smaller_ir(ros):
    node, h = ros
    start = h.count("fused")
    stamp = h.pair(_ir16(256, 320), "mono16", _bgr(480, 640), "bgr8")
    assert h.wait(lambda: h.count("fused") > start)
    msg = h.since("fused", start)[0]
    assert (msg.width, msg.height, msg.encoding, _stamp_ns(msg)) == (640, 480, "bgr8", stamp)
    assert ros_image.image_to_array(msg).shape == (480, 640, 3)


def test_gray_visible_and_float_ir_with_nan(ros):
    node, h = ros
    start, logs = h.count("fused"), h.count("rosout")
    ir = RNG.uniform(280.0, 310.0, (60, 80)).astype(np.float32)
    ir[:5, :5] = np.nan
    ir[10, 10] = np.inf
    stamp = h.pair(ir, "32FC1", RNG.integers(0, 256, (120, 160), dtype=np.uint8), "mono8")
    assert h.wait(lambda: h.count("fused") > start)
    msg = h.since("fused", start)[0]
    assert (msg.encoding, msg.width, msg.height, _stamp_ns(msg)) == ("mono8", 160, 120, stamp)
    assert h.wait(lambda: h.logs(logs, "26 NaN/inf pixels"))


def test_false_colour_ir_and_bgra_visible(ros):
    node, h = ros
    start = h.count("fused")
    stamp = h.pair(_bgr(120, 160), "rgb8", RNG.integers(0, 256, (120, 160, 4), dtype=np.uint8), "bgra8")
    assert h.wait(lambda: any(_stamp_ns(m) == stamp for m in h.since("fused", start)))
    msg = [m for m in h.since("fused", start) if _stamp_ns(m) == stamp][0]
    assert (msg.encoding, msg.width, msg.height) == ("bgr8", 160, 120)


@pytest.mark.parametrize("channel, override, text", [
    ("ir", {"encoding": "yuv422"}, "IR image ignored: unsupported encoding 'yuv422'"),
    ("ir", {"height": 0, "width": 0, "step": 0, "data": b""}, "IR image ignored: empty image"),
    ("ir", {"data": bytes(1000)}, "IR image ignored: data truncated: 1000 bytes"),
    ("ir", {"step": 100}, "IR image ignored: step 100 is shorter than one mono16 row"),
    ("ir", {"data": bytes(320 * 121)}, "IR image ignored: data too long"),
    ("vis", {}, "visible image ignored: unsupported encoding 'mono16'"),
])
def test_bad_input_warns_once_and_the_next_pair_is_fused(ros, channel, override, text):
    node, h = ros
    before = node.diagnostics()
    logs = h.count("rosout")
    for _ in range(3):
        ir, vis = _ir16(120, 160), _bgr(120, 160)
        if channel == "ir":
            h.pair(ir, "mono16", vis, "bgr8", **override)
        else:
            stamp = h.now_ns()
            h.ir.publish(_image(ir, "mono16", stamp))
            h.vis.publish(_image(_ir16(120, 160), "mono16", stamp))
        time.sleep(0.05)
    assert h.wait(lambda: h.logs(logs, text))
    start = h.count("fused")
    good = h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
    assert h.wait(lambda: any(_stamp_ns(m) == good for m in h.since("fused", start)))
    assert len(h.logs(logs, text)) == 1  # rate-limited
    key = "bad IR images" if channel == "ir" else "bad visible images"
    assert _value(node.diagnostics(), key) >= _value(before, key) + 1


def test_sizes_changing_mid_stream(ros):
    node, h = ros
    logs, start = h.count("rosout"), h.count("fused")
    h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
    time.sleep(0.2)
    stamp = h.pair(_ir16(50, 100), "mono16", _bgr(100, 200), "bgr8")
    assert h.wait(lambda: any(_stamp_ns(m) == stamp for m in h.since("fused", start)))
    assert [(m.width, m.height) for m in h.since("fused", start) if _stamp_ns(m) == stamp] == [(200, 100)]
    text = "image sizes changed mid-stream: IR 160x120 -> 100x50, visible 160x120 -> 200x100"
    assert h.wait(lambda: h.logs(logs, text))


def test_camera_going_silent_and_coming_back(ros):
    node, h = ros
    logs = h.count("rosout")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # visible only
        h.vis.publish(_image(_bgr(120, 160), "bgr8", h.now_ns()))
        time.sleep(0.1)
    assert h.wait(lambda: h.logs(logs, "IR input /ir/image: no images for"), timeout=2.0)
    status = node.diagnostics()
    assert status.level == status.WARN and status.message == "IR input silent"
    start = h.count("fused")
    for _ in range(3):
        h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
        time.sleep(0.1)
    assert h.wait(lambda: h.count("fused") > start)
    assert h.wait(lambda: h.logs(logs, "IR images are back after"))
    assert "silent" not in node.diagnostics().message


def test_time_jumping_back_resets_the_synchroniser(ros):
    node, h = ros
    logs, start = h.count("rosout"), h.count("fused")
    resets = _value(node.diagnostics(), "synchroniser resets")
    h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
    time.sleep(0.1)
    looped = h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8", stamp_ns=h.now_ns() - 30 * 10**9)
    assert h.wait(lambda: any(_stamp_ns(m) == looped for m in h.since("fused", start)))
    assert h.wait(lambda: h.logs(logs, "time went back"))
    assert _value(node.diagnostics(), "synchroniser resets") == resets + 1


def test_diagnostics_on_the_topic(ros):
    node, h = ros
    start = h.count("diagnostics")
    assert h.wait(lambda: h.count("diagnostics") > start, timeout=3.0)
    status = h.since("diagnostics", start)[-1].status[0]
    keys = {kv.key for kv in status.values}
    assert status.name == "fusion_node: fusion" and status.hardware_id == "cpu"
    assert {"IR rate (Hz)", "visible rate (Hz)", "pairs made", "pairs skipped (busy)", "IR dropped unpaired",
            "latency p50 (ms)", "latency p99 (ms)", "device"} <= keys
    assert _value(status, "pairs made") >= 6


@pytest.mark.parametrize("name, value, reason", [
    ("ir.normalization", "linear", "ir.normalization must be one of auto, fixed, percentile"),
    ("ir.percentiles", [99.0, 1.0], "ir.percentiles: IR normalisation needs low < high"),
    ("ir.percentiles", [1.0, 120.0], "ir.percentiles: percentiles must lie in [0, 100]"),
    ("ir.fixed_range", [1.0, 2.0, 3.0], "ir.fixed_range must be [low, high]"),
    ("registration.homography", [1.0] * 8, "homography needs 9 numbers"),
    ("registration.homography", [0.0] * 9, "singular"),
    ("registration.file", "/nonexistent/h.yaml", "no such homography file"),
    ("sync.slop", 5.0, "out of range"),
    ("device", "cpu", "device can only change while the node is inactive"),
    ("backend", "onnxruntime", "backend can only change while the node is inactive"),
    ("backend", "tflite", "backend must be one of torch, compile, onnxruntime, tensorrt, not 'tflite'"),
    ("onnx_path", "/nonexistent/model.onnx", "onnx_path: /nonexistent/model.onnx: no such ONNX file"),
    ("threads", 65, "out of range"),
])
def test_bad_parameters_are_rejected_with_a_reason(ros, name, value, reason):
    node, _ = ros
    [result] = node.set_parameters([Parameter(name, value=value)])
    assert not result.successful and reason in result.reason
    assert node.get_parameter(name).value != value


def test_parameters_over_the_service_apply_live(ros, tmp_path):
    node, h = ros

    def set_remote(name, value):
        return _set_remote(h, name, value)

    result = set_remote("sync.queue_size", 0)
    assert not result.successful and "out of range" in result.reason
    shift = [1.0, 0.0, 12.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert set_remote("registration.homography", shift).successful
    assert node.pipeline.registration.matrix[0, 2] == 12.0
    (tmp_path / "h.yaml").write_text("homography: [[1, 0, 0], [0, 1, -4], [0, 0, 1]]\nir_size: [160, 120]\n")
    assert set_remote("registration.file", str(tmp_path / "h.yaml")).successful
    assert node.pipeline.registration.ir_size == (160, 120)
    assert set_remote("registration.file", "").successful and node.pipeline.registration.matrix[0, 2] == 12.0
    assert set_remote("sync.slop", 0.04).successful and node.sync.slop == 0.04


def _set_remote(h, name, value):
    """Set one fusion_node parameter through its service, as ``ros2 param set`` does; returns the result."""
    client = h.node.create_client(SetParameters, "fusion_node/set_parameters")
    try:
        assert client.wait_for_service(timeout_sec=5.0)
        future = client.call_async(SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()]))
        assert h.wait(future.done, timeout=5.0)
        return future.result().results[0]
    finally:
        h.node.destroy_client(client)


def test_invalid_backend_is_rejected_at_run_time_and_the_node_keeps_running(ros):
    node, h = ros
    result = _set_remote(h, "backend", "tflite")
    assert not result.successful and "backend must be one of torch, compile, onnxruntime, tensorrt" in result.reason
    assert node.get_parameter("backend").value == "torch" and node.pipeline is not None
    start = h.count("fused")
    stamp = h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
    assert h.wait(lambda: any(_stamp_ns(m) == stamp for m in h.since("fused", start)))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_onnxruntime_backend_fuses_over_dds(ros, monkeypatch):
    context = ros[0].context
    calls = []
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    torch.set_num_threads(2)  # restored to the session's 1 by the node's threads:=1
    node = FusionNode(context=context, namespace="/ort", parameter_overrides=[
        Parameter("backend", value="onnxruntime"), Parameter("threads", value=1), Parameter("device", value="cpu")])
    h = Harness(context, namespace="/ort")
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(h.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert node.start(), node.failure
        assert calls[-1] == 1 and torch.get_num_threads() == 1
        assert type(node.pipeline.backend).__name__ == "OnnxRuntimeBackend"
        assert h.wait(lambda: h.ir.get_subscription_count() and h.vis.get_subscription_count())
        sent = []

        def fused_one():  # the first pair of a size exports the graph (seconds); later ones reuse it
            sent.append(h.pair(_ir16(48, 64), "mono16", _bgr(96, 128), "bgr8"))
            return h.wait(lambda: h.count("fused") > 0 and h.count("labels") > 0, timeout=1.0)

        assert h.wait(fused_one, timeout=25.0)
        fused, labels = h.got["fused"][0], h.got["labels"][0]
        assert (fused.encoding, fused.width, fused.height) == ("bgr8", 128, 96) and _stamp_ns(fused) in sent
        assert (labels.encoding, labels.width, labels.height) == ("mono8", 128, 96)
        assert ros_image.image_to_array(labels).max() < len(node.pipeline.classes)
        assert _value(node.diagnostics(), "pairs fused") >= 1
        assert {kv.key: kv.value for kv in node.diagnostics().values}["backend"] == "onnxruntime"
    finally:
        executor.shutdown()
        node._stop()
        node.destroy_node()
        h.node.destroy_node()
        set_threads(threads)


def test_deactivate_releases_the_model_and_activate_resumes(ros):
    node, h = ros
    client = h.node.create_client(GetState, "/fusion_node/get_state")
    assert client.wait_for_service(timeout_sec=5.0)

    def remote_state():
        future = client.call_async(GetState.Request())
        assert h.wait(future.done, timeout=5.0)
        return future.result().current_state.label

    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.pipeline is None and remote_state() == "inactive"
    start = h.count("fused")
    h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
    time.sleep(0.5)
    assert h.count("fused") == start
    assert node.set_parameters([Parameter("device", value="cpu")])[0].successful
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS and remote_state() == "active"
    assert h.wait(lambda: h.ir.get_subscription_count() and h.vis.get_subscription_count())
    time.sleep(0.3)
    stamp = h.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8")
    assert h.wait(lambda: any(_stamp_ns(m) == stamp for m in h.since("fused", start)))


@pytest.mark.parametrize("name, returncode, text", [
    ("missing", 1, "/nonexistent/model.safetensors: no such checkpoint file"),
    ("corrupt", 1, "corrupt.safetensors: not a readable safetensors file"),
    ("bad_param", 2, "sync.slop out of range"),
])
def test_refuses_to_start_with_one_line(refused, name, returncode, text):
    out, _ = refused[name].communicate(timeout=90)
    lines = [line for line in out.splitlines() if line.strip()]
    assert refused[name].returncode == returncode
    assert len(lines) == 1 and text in lines[0], out


def test_plain_executable_from_the_yaml(ros):
    _, h = ros
    proc = _start_subprocess("--params-file", "config/fusion.yaml", "-r", "__ns:=/plain")
    plain = Harness(h.node.context, namespace="/plain")
    executor = SingleThreadedExecutor(context=h.node.context)
    executor.add_node(plain.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert plain.wait(lambda: plain.vis.get_subscription_count() > 0 or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, proc.communicate()[0]
        sent = []

        def fused_one():
            sent.append(plain.pair(_ir16(120, 160), "mono16", _bgr(120, 160), "bgr8"))
            return plain.wait(lambda: plain.count("fused") > 0, timeout=0.5)

        assert plain.wait(fused_one, timeout=30)
        msg = plain.got["fused"][0]
        assert (msg.encoding, msg.width, msg.height) == ("bgr8", 160, 120) and _stamp_ns(msg) in sent
        assert plain.count("labels_color") == 0  # publish_labels_color: false in the yaml
    finally:
        executor.shutdown()
        plain.node.destroy_node()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def _value(status, key):
    return float(next(kv.value for kv in status.values if kv.key == key))
