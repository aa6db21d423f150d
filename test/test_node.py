"""fusion_node over real DDS: each test starts its own node (own namespace, own parameters) in this process, or as a
subprocess, and talks to it through topics, /rosout, /diagnostics and the parameter and lifecycle services."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lifecycle_msgs.srv import GetState
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

import ivf_ros.node as node_module
from ivf_ros.backends import native_bf16
from helpers import corrupt_checkpoint
from ivf_ros import ros_image
from ivf_ros.checkpoint import default_checkpoint
from ivf_ros.node import FusionNode
from node_harness import (DEFAULTS, DOMAIN, OUTPUTS, RELIABLE, RNG, Harness, Ros, bgr, compressed, image, ir16,
                          stamp_ns, value, warm_up)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ros():
    return Ros.shared()


@pytest.fixture
def launch(ros):
    """``launch(**parameters)`` starts a fresh fusion_node and its harness in a new namespace; both end with the
    test."""
    started = []

    def start(outputs=OUTPUTS, image_type=None, warm=True, ir_qos=None, **params):
        namespace = ros.namespace()
        values = dict(DEFAULTS, **params)
        node = FusionNode(context=ros.context, namespace=namespace,
                          parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        h = Harness(ros.context, namespace, outputs, image_type or Image, ir_qos or qos_profile_sensor_data)
        ros.add(node, h.node)
        started.append((node, h))
        assert node.start(), node.failure
        assert h.wait(lambda: h.ir.get_subscription_count() and h.vis.get_subscription_count())
        if warm:
            warm_up(h)
        return node, h

    yield start
    for node, h in started:
        ros.remove(node, h.node)


def _start_subprocess(*ros_args, env_extra=None):
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "ivf_ros.node", "--ros-args", *ros_args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_fuses_jittered_pairs(launch):
    node, h = launch()
    start = {name: h.count(name) for name in h.got}
    sent = []
    for _ in range(6):
        sent.append(h.pair(ir16(120, 160), "mono16", bgr(120, 160), "bgr8", jitter_s=RNG.uniform(-0.01, 0.01)))
        time.sleep(0.1)
    assert h.wait(lambda: h.count("labels") - start["labels"] >= 6 and h.count("fused") - start["fused"] >= 6)
    fused, labels = h.since("fused", start["fused"]), h.since("labels", start["labels"])
    assert [stamp_ns(m) for m in fused] == sent and [stamp_ns(m) for m in labels] == sent
    for msg in fused:
        assert (msg.encoding, msg.width, msg.height, msg.header.frame_id) == ("bgr8", 160, 120, "camera")
    for msg in labels:
        assert (msg.encoding, msg.width, msg.height, msg.step) == ("mono8", 160, 120, 160)
        assert ros_image.image_to_array(msg).max() < len(node.pipeline.classes)
    colour = h.since("labels_color", start["labels_color"])[0]
    assert (colour.encoding, colour.width, colour.height) == ("bgr8", 160, 120)
    assert h.wait(lambda: h.count("class_names"))
    assert json.loads(h.got["class_names"][-1].data)["classes"] == node.pipeline.classes
    assert h.count("camera_info") == 0  # no camera info was published
    assert "none received on" in {kv.key: kv.value for kv in node.diagnostics().values}["camera info"]


def test_camera_info_is_republished_with_each_output_header(launch):
    node, h = launch()
    info = CameraInfo(width=160, height=120, distortion_model="plumb_bob", d=[0.1, 0.0, 0.0, 0.0, 0.0],
                      k=[150.0, 0.0, 79.5, 0.0, 150.0, 59.5, 0.0, 0.0, 1.0])
    info.header.frame_id = "camera"
    assert h.wait(lambda: h.info.get_subscription_count() > 0)

    def info_arrived():
        h.info.publish(info)
        return h.wait(lambda: "from" in {kv.key: kv.value for kv in node.diagnostics().values}["camera info"], 0.3)

    assert h.wait(info_arrived)
    start = h.count("camera_info")
    sent = [h.good_pair()]
    time.sleep(0.15)
    sent.append(h.good_pair())
    assert h.wait(lambda: h.count("camera_info") - start >= 2)
    got = h.since("camera_info", start)
    assert [stamp_ns(m) for m in got] == sent
    assert all(m.header.frame_id == "camera" and list(m.k) == list(info.k) and m.width == 160 for m in got)
    assert {kv.key: kv.value for kv in node.diagnostics().values}["camera info"].startswith("160x120 from")


def test_compressed_transport_jpeg_visible_and_16bit_png_ir(launch):
    def publish():
        stamp = h.now_ns()
        h.ir.publish(compressed(ir16(120, 160), stamp, "ir"))
        h.vis.publish(compressed(bgr(120, 160), stamp, "camera"))
        return stamp

    node, h = launch(transport="compressed", image_type=CompressedImage, warm=False)
    assert [s.topic_name for s in node._inputs[:2]] == [f"/{h.prefix}/ir/image/compressed",
                                                        f"/{h.prefix}/visible/image/compressed"]
    warm_up(h, publish=publish)
    start = {name: h.count(name) for name in ("fused", "labels")}
    sent = [publish()]
    fused = h.fused_stamp(sent[0], start["fused"])
    assert fused and h.wait(lambda: h.count("labels") > start["labels"])
    assert (fused.encoding, fused.width, fused.height, fused.header.frame_id) == ("bgr8", 160, 120, "camera")
    assert stamp_ns(h.since("labels", start["labels"])[-1]) == sent[0]


def test_full_size_visible_with_smaller_ir(launch):
    node, h = launch()
    start = h.count("fused")
    stamp = h.pair(ir16(256, 320), "mono16", bgr(480, 640), "bgr8")
    msg = h.fused_stamp(stamp, start)
    assert msg, "no fused image with the pair's stamp"
    assert (msg.width, msg.height, msg.encoding) == (640, 480, "bgr8")
    assert ros_image.image_to_array(msg).shape == (480, 640, 3)


def test_gray_visible_and_float_ir_with_nan(launch):
    node, h = launch()
    start, logs = h.count("fused"), h.count("rosout")
    ir = RNG.uniform(280.0, 310.0, (60, 80)).astype(np.float32)
    ir[:5, :5] = np.nan
    ir[10, 10] = np.inf
    stamp = h.pair(ir, "32FC1", RNG.integers(0, 256, (120, 160), dtype=np.uint8), "mono8")
    msg = h.fused_stamp(stamp, start)
    assert msg, "no fused image with the pair's stamp"
    assert (msg.encoding, msg.width, msg.height) == ("mono8", 160, 120)
    assert h.wait(lambda: h.logs(logs, "26 NaN/inf pixels"))


def test_false_colour_ir_and_bgra_visible(launch):
    node, h = launch()
    start = h.count("fused")
    stamp = h.pair(bgr(120, 160), "rgb8", RNG.integers(0, 256, (120, 160, 4), dtype=np.uint8), "bgra8")
    msg = h.fused_stamp(stamp, start)
    assert msg, "no fused image with the pair's stamp"
    assert (msg.encoding, msg.width, msg.height) == ("bgr8", 160, 120)


@pytest.mark.parametrize("channel", ["ir", "visible"])
def test_negative_stamp_does_not_kill_the_node(launch, channel):
    node, h = launch()
    logs, before = h.count("rosout"), node.diagnostics()
    bad = image(ir16(120, 160) if channel == "ir" else bgr(120, 160), "mono16" if channel == "ir" else "bgr8", 0)
    bad.header.stamp.sec = -5
    (h.ir if channel == "ir" else h.vis).publish(bad)
    assert h.wait(lambda: h.logs(logs, "image ignored: header stamp is negative (-5 s)"))
    start = h.count("fused")
    assert h.fused_stamp(h.good_pair(), start), "the node stopped fusing after a negative stamp"
    key = "bad IR images" if channel == "ir" else "bad visible images"
    assert value(node.diagnostics(), key) == value(before, key) + 1
    assert value(node.diagnostics(), "callback errors") == 0


def test_oversized_frame_is_rejected_by_the_default_max_pixels(launch):
    node, h = launch()
    assert node.get_parameter("max_pixels").value == 4_194_304
    logs, start = h.count("rosout"), h.count("fused")
    stamp = h.now_ns()
    h.ir.publish(image(ir16(120, 160), "mono16", stamp))
    h.vis.publish(image(np.zeros((3072, 4096), np.uint8), "mono8", stamp))
    assert h.wait(lambda: h.logs(logs, "4096x3072 image has 12582912 pixels, more than max_pixels 4194304"))
    assert value(node.diagnostics(), "bad visible images") == 1
    assert h.fused_stamp(h.good_pair(), start)
    assert not any(m.width == 4096 for m in h.since("fused", start))


def test_sizes_changing_mid_stream(launch):
    node, h = launch()
    logs, start = h.count("rosout"), h.count("fused")
    stamp = h.pair(ir16(50, 100), "mono16", bgr(100, 200), "bgr8")
    assert h.fused_stamp(stamp, start)
    assert [(m.width, m.height) for m in h.since("fused", start) if stamp_ns(m) == stamp] == [(200, 100)]
    assert h.wait(lambda: h.logs(logs, "IR image size changed mid-stream: 160x120 -> 100x50"))
    assert h.wait(lambda: h.logs(logs, "visible image size changed mid-stream: 160x120 -> 200x100"))


def test_camera_going_silent_and_coming_back(launch):
    node, h = launch()
    logs = h.count("rosout")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # visible only
        h.vis.publish(image(bgr(120, 160), "bgr8", h.now_ns()))
        time.sleep(0.1)
    assert h.wait(lambda: h.logs(logs, f"IR input /{h.prefix}/ir/image: no images for"), timeout=2.0)
    status = node.diagnostics()
    assert status.level == status.WARN and status.message == "IR input silent"
    start = h.count("fused")
    for _ in range(3):
        h.good_pair()
        time.sleep(0.1)
    assert h.wait(lambda: h.count("fused") > start)
    assert h.wait(lambda: h.logs(logs, "IR images are back after"))
    assert "silent" not in node.diagnostics().message


def test_bag_loop_resets_the_synchroniser_and_the_latency_window(launch):
    node, h = launch()
    logs, start = h.count("rosout"), h.count("fused")
    assert "latency p99 (ms)" in {kv.key for kv in node.diagnostics().values}
    looped = h.pair(ir16(120, 160), "mono16", bgr(120, 160), "bgr8", stamp=h.now_ns() - 30 * 10**9)
    assert h.fused_stamp(looped, start)
    assert h.wait(lambda: h.logs(logs, "time went back"))
    status = node.diagnostics()
    assert value(status, "synchroniser resets") == 1
    # 30 s old is no latency of a live pipeline: ignored, and the window restarted with the synchroniser
    assert value(status, "latency samples ignored (implausible stamps)") == 1
    assert "latency p99 (ms)" not in {kv.key for kv in status.values}
    assert h.fused_stamp(h.good_pair(), start)
    assert h.wait(lambda: "latency p99 (ms)" in {kv.key for kv in node.diagnostics().values})


def test_a_stamp_from_the_future_cannot_poison_the_latency(launch):
    node, h = launch()
    start = h.count("fused")
    for _ in range(3):
        h.good_pair()
        time.sleep(0.1)
    future = h.pair(ir16(120, 160), "mono16", bgr(120, 160), "bgr8", stamp=h.now_ns() + 3600 * 10**9)
    assert h.fused_stamp(future, start)
    status = node.diagnostics()
    assert value(status, "latency samples ignored (implausible stamps)") == 1
    assert value(status, "latency p99 (ms)") < 10_000  # 3.6e6 ms if the future stamp were counted


def test_diagnostics_on_the_topic(launch):
    node, h = launch()
    for _ in range(5):
        h.good_pair()
        time.sleep(0.05)
    start = h.count("diagnostics")
    assert h.wait(lambda: h.count("diagnostics") > start, timeout=3.0)
    status = [s for m in h.since("diagnostics", start) for s in m.status if s.name == "fusion_node: fusion"][-1]
    keys = {kv.key for kv in status.values}
    assert status.hardware_id == ("cpu bfloat16 head" if native_bf16() else "cpu")  # head_precision auto
    assert {"IR rate (Hz)", "visible rate (Hz)", "pairs made", "pairs skipped (busy)", "IR dropped unpaired",
            "pairs not processed (no subscribers)", "camera info", "latency p50 (ms)", "latency p99 (ms)",
            "device"} <= keys
    assert value(status, "pairs made") >= 1


def test_no_processing_without_subscribers_and_resumption_with_one(launch):
    node, h = launch(outputs=(), warm=False)
    for _ in range(4):
        h.good_pair()
        time.sleep(0.1)
    assert h.wait(lambda: value(node.diagnostics(), "pairs not processed (no subscribers)") >= 2)
    status = node.diagnostics()
    assert value(status, "pairs fused") == 0 and status.message == "idle: no subscribers to the outputs"
    h.subscribe("labels")
    warm_up(h, topic="labels")
    assert value(node.diagnostics(), "pairs fused") >= 1


@pytest.fixture(scope="module")
def rejecting(ros):
    """One node for the rejected-value cases: a rejected value changes nothing, so they cannot leak."""
    namespace = ros.namespace()
    node = FusionNode(context=ros.context, namespace=namespace, parameter_overrides=[Parameter("device", value="cpu")])
    h = Harness(ros.context, namespace)
    ros.add(node, h.node)
    assert node.start(), node.failure
    yield node, h
    ros.remove(node, h.node)


@pytest.fixture(scope="module")
def bad_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("yaml")
    files = {"scalar_size": "homography: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]\nir_size: 640\n",
             "text_size": "homography: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]\nvis_size: [wide, tall]\n",
             "scalar": "42\n"}
    for name, text in files.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "folder.yaml").mkdir()
    return root


@pytest.mark.parametrize("name, value_, reason", [
    ("ir.normalization", "linear", "ir.normalization must be one of auto, fixed, percentile"),
    ("ir.percentiles", [99.0, 1.0], "ir.percentiles: IR normalisation needs low < high"),
    ("ir.percentiles", [1.0, 120.0], "ir.percentiles: percentiles must lie in [0, 100]"),
    ("ir.fixed_range", [1.0, 2.0, 3.0], "ir.fixed_range must be [low, high]"),
    ("ir.fixed_range", [0.0, float("inf")], "ir.fixed_range: IR normalisation needs low < high, both finite"),
    ("ir.fixed_range", [float("nan"), 1.0], "ir.fixed_range: IR normalisation needs low < high, both finite"),
    ("registration.homography", [1.0] * 8, "homography needs 9 numbers"),
    ("registration.homography", [0.0] * 9, "singular"),
    ("registration.file", "/nonexistent/h.yaml", "no such homography file"),
    ("sync.slop", 5.0, "out of range"),
    ("max_pixels", 0, "out of range"),
    ("transport", "theora", "transport must be one of raw, compressed"),
    ("transport", "compressed", "transport can only change while the node is inactive"),
    ("device", "cpu", "device can only change while the node is inactive"),
    ("backend", "onnxruntime", "backend can only change while the node is inactive"),
    ("backend", "tflite", "backend must be one of torch, compile, onnxruntime, tensorrt, not 'tflite'"),
    ("onnx_path", "/nonexistent/model.onnx", "onnx_path: /nonexistent/model.onnx: no such ONNX file"),
    ("threads", 65, "out of range"),
    ("head_precision", "fp8", "head_precision must be one of auto, float32, bfloat16, not 'fp8'"),
    ("head_precision", "float32", "head_precision can only change while the node is inactive"),
])
def test_bad_parameters_are_rejected_with_a_reason(rejecting, name, value_, reason):
    node, _ = rejecting
    before = node.get_parameter(name).value
    [result] = node.set_parameters([Parameter(name, value=value_)])
    assert not result.successful and reason in result.reason
    assert node.get_parameter(name).value == before


@pytest.mark.parametrize("name", ["scalar_size", "text_size", "scalar", "folder", "/dev/zero"])
def test_bad_registration_file_at_run_time_is_rejected_and_the_node_lives(rejecting, bad_yaml, name):
    node, h = rejecting
    path = name if name.startswith("/") else str(bad_yaml / f"{name}.yaml")
    result = h.set_remote("registration.file", path)
    assert not result.successful and result.reason.startswith("registration: ") and path in result.reason
    assert node.get_parameter("registration.file").value == ""
    assert h.set_remote("sync.slop", 0.05).successful  # the node still answers


def test_parameters_over_the_service_apply_live(launch, tmp_path):
    node, h = launch()
    result = h.set_remote("sync.queue_size", 0)
    assert not result.successful and "out of range" in result.reason
    shift = [1.0, 0.0, 12.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert h.set_remote("registration.homography", shift).successful
    assert node.pipeline.registration.matrix[0, 2] == 12.0
    (tmp_path / "h.yaml").write_text("homography: [[1, 0, 0], [0, 1, -4], [0, 0, 1]]\nir_size: [160, 120]\n")
    assert h.set_remote("registration.file", str(tmp_path / "h.yaml")).successful
    assert node.pipeline.registration.ir_size == (160, 120)
    assert h.set_remote("registration.file", "").successful and node.pipeline.registration.matrix[0, 2] == 12.0
    assert h.set_remote("sync.slop", 0.04).successful and node.sync.slop == 0.04
    assert h.set_remote("max_pixels", 10_000).successful
    logs = h.count("rosout")
    h.good_pair()
    assert h.wait(lambda: h.logs(logs, "160x120 image has 19200 pixels, more than max_pixels 10000"))


def test_a_live_change_reads_only_the_files_of_the_parameters_it_changes(launch, tmp_path):
    checkpoint, homography = tmp_path / "model.safetensors", tmp_path / "h.yaml"
    shutil.copy(default_checkpoint(), checkpoint)
    homography.write_text("homography: [[1, 0, 3], [0, 1, 0], [0, 0, 1]]\n")
    node, h = launch(checkpoint=str(checkpoint), **{"registration.file": str(homography)})
    registration, normalizer = node.pipeline.registration, node.pipeline.ir_normalizer
    checkpoint.unlink()  # neither file could be read any more
    homography.write_text("42\n")
    for name, val in (("sync.slop", 0.04), ("max_pixels", 1_000_000), ("publish_labels_color", False)):
        result = h.set_remote(name, val)
        assert result.successful, f"{name}: {result.reason}"
    assert node.pipeline.registration is registration and node.pipeline.ir_normalizer is normalizer
    assert h.set_remote("ir.smoothing", 0.5).successful and node.pipeline.ir_normalizer is not normalizer
    assert node.pipeline.registration is registration
    start = h.count("fused")
    assert h.fused_stamp(h.good_pair(), start)
    result = h.set_remote("registration.homography", [1.0, 0.0, 5.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    assert not result.successful and result.reason.startswith(f"registration: {homography}")  # read again


def test_invalid_backend_is_rejected_at_run_time_and_the_node_keeps_running(launch):
    node, h = launch()
    result = h.set_remote("backend", "tflite")
    assert not result.successful and "backend must be one of torch, compile, onnxruntime, tensorrt" in result.reason
    assert node.get_parameter("backend").value == "torch" and node.pipeline is not None
    start = h.count("fused")
    assert h.fused_stamp(h.good_pair(), start)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_onnxruntime_backend_fuses_over_dds(launch, monkeypatch):
    calls = []
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    torch.set_num_threads(2)  # restored to the session's 1 by the node's threads:=1
    try:
        node, h = launch(backend="onnxruntime", threads=1, warm=False)
        assert calls[-1] == 1 and torch.get_num_threads() == 1
        assert type(node.pipeline.backend).__name__ == "OnnxRuntimeBackend"
        sent = []

        def fused_one():  # the first pair of a size exports the graph (seconds); later ones reuse it
            sent.append(h.pair(ir16(48, 64), "mono16", bgr(96, 128), "bgr8"))
            return h.wait(lambda: h.count("fused") > 0 and h.count("labels") > 0, timeout=1.0)

        assert h.wait(fused_one, timeout=25.0)
        fused, labels = h.got["fused"][0], h.got["labels"][0]
        assert (fused.encoding, fused.width, fused.height) == ("bgr8", 128, 96) and stamp_ns(fused) in sent
        assert (labels.encoding, labels.width, labels.height) == ("mono8", 128, 96)
        assert ros_image.image_to_array(labels).max() < len(node.pipeline.classes)
        assert {kv.key: kv.value for kv in node.diagnostics().values}["backend"] == "onnxruntime"
    finally:
        set_threads(threads)


def test_deactivate_releases_the_model_and_activate_resumes(launch):
    node, h = launch()
    client = h.node.create_client(GetState, f"/{h.prefix}/fusion_node/get_state")
    assert client.wait_for_service(timeout_sec=5.0)

    def remote_state():
        future = client.call_async(GetState.Request())
        assert h.wait(future.done, timeout=5.0)
        return future.result().current_state.label

    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.pipeline is None and remote_state() == "inactive"
    start = h.count("fused")
    h.good_pair()
    time.sleep(0.5)
    assert h.count("fused") == start
    assert node.set_parameters([Parameter("device", value="cpu")])[0].successful
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS and remote_state() == "active"
    assert h.wait(lambda: h.ir.get_subscription_count() and h.vis.get_subscription_count())
    warm_up(h)


def test_checkpoint_set_while_inactive_is_checked_at_set_time(launch, tmp_path):
    node, h = launch(warm=False)
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    corrupt = corrupt_checkpoint(tmp_path / "corrupt.safetensors")
    for path, reason in ((tmp_path / "missing.safetensors", "no such checkpoint file"),
                         (corrupt, "not a readable safetensors file"), (tmp_path, "")):
        result = h.set_remote("checkpoint", str(path))
        assert not result.successful and result.reason.startswith(f"checkpoint: {path}") and reason in result.reason
        assert node.get_parameter("checkpoint").value == ""
    assert h.set_remote("checkpoint", str(default_checkpoint())).successful
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    warm_up(h)


def test_deactivate_during_a_slow_pair_never_leaves_two_workers(launch, monkeypatch):
    monkeypatch.setattr(node_module, "WORKER_JOIN_S", 0.05)
    node, h = launch()

    def workers():
        name = f"fusion_worker {node.get_fully_qualified_name()}"
        return sum(t.name == name and t.is_alive() for t in threading.enumerate())

    start, pairs = h.count("fused"), value(node.diagnostics(), "pairs made")
    stamp = h.now_ns()  # a 4 MP pair takes seconds on a CPU
    h.ir.publish(image(ir16(1024, 1024), "mono16", stamp))
    h.vis.publish(image(RNG.integers(0, 256, (2048, 2048), dtype=np.uint8), "mono8", stamp))
    assert h.wait(lambda: value(node.diagnostics(), "pairs made") > pairs)
    time.sleep(0.1)  # the worker takes the pair; processing it takes far longer than this and the 0.05 s wait
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert workers() == 1, "the slow pair finished before deactivation: this test needs a slower pair"
    assert node.trigger_activate() == TransitionCallbackReturn.FAILURE
    assert "still finishing a pair" in node.failure and workers() == 1
    assert h.wait(lambda: workers() == 0, timeout=60.0)
    assert not any(stamp_ns(m) == stamp for m in h.since("fused", start))  # the late result was dropped
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS and workers() == 1
    warm_up(h)


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Nodes that must refuse to start, started together (each takes seconds to import torch here)."""
    corrupt = corrupt_checkpoint(tmp_path_factory.mktemp("ckpt") / "corrupt.safetensors")
    procs = {
        "missing": _start_subprocess("-p", "checkpoint:=/nonexistent/model.safetensors", "-r", "__ns:=/missing"),
        "corrupt": _start_subprocess("-p", f"checkpoint:={corrupt}", "-r", "__ns:=/corrupt"),
        "bad_param": _start_subprocess("-p", "sync.slop:=5.0", "-r", "__ns:=/bad"),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def test_ctrl_c_during_activation_exits_cleanly():
    """rclpy's SIGINT handler shuts the context down; landing between on_activate and the end of the transition, it
    fails the transition (seen under load): that is a Ctrl-C, not a failed start, so the exit status is 0."""
    script = ("import sys, rclpy\n"
              "from ivf_ros import node\n"
              "activate = node.FusionNode.on_activate\n"
              "def on_activate(self, state):\n"
              "    result = activate(self, state)\n"
              "    rclpy.try_shutdown()  # what the SIGINT handler does, mid-transition\n"
              "    return result\n"
              "node.FusionNode.on_activate = on_activate\n"
              "sys.exit(node.main(['--ros-args', '-r', '__ns:=/ctrl_c', '-p', 'device:=cpu']))\n")
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN))
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    out = run.stdout + run.stderr
    assert "fusing on cpu" in out and "Failed to complete transition" in out, out
    assert run.returncode == 0, out


def test_plain_executable_from_the_yaml_with_a_qos_override(ros, tmp_path):
    namespace = ros.namespace()
    override = tmp_path / "qos.yaml"
    override.write_text("/**:\n  ros__parameters:\n    qos_overrides:\n"
                        f"      {namespace}/ir/image:\n        subscription:\n          reliability: reliable\n")
    proc = _start_subprocess("--params-file", "config/fusion.yaml", "--params-file", str(override),
                             "-r", f"__ns:={namespace}")
    plain = Harness(ros.context, namespace, ir_qos=RELIABLE)  # a reliable-only IR camera
    ros.add(plain.node)
    try:
        assert plain.wait(lambda: plain.vis.get_subscription_count() > 0 or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, proc.communicate()[0]
        policies = {t: [i.qos_profile.reliability for i in plain.node.get_subscriptions_info_by_topic(t)]
                    for t in (f"{namespace}/ir/image", f"{namespace}/visible/image")}
        assert policies == {f"{namespace}/ir/image": [ReliabilityPolicy.RELIABLE],
                            f"{namespace}/visible/image": [ReliabilityPolicy.BEST_EFFORT]}
        warm_up(plain)
        msg = plain.got["fused"][0]
        assert (msg.encoding, msg.width, msg.height) == ("bgr8", 160, 120)
        assert plain.count("labels_color") == 0  # publish_labels_color: false in the yaml
    finally:
        ros.remove(plain.node)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
