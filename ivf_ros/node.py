"""ROS 2 node ``fusion_node``: time-synced IR + visible images in, fused image and class-id map out.

A thin lifecycle shell over ``FusionPipeline``: parameters, QoS, pairing, conversion, publishing, diagnostics.
The model is loaded on ``activate`` and released on ``deactivate``; by default the node configures and activates
itself (parameter ``autostart``).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import ParameterException
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from . import ros_image
from .backends import BACKENDS, ONNX_BACKENDS
from .checkpoint import default_checkpoint, read_metadata
from .imageops import IRNormalizer
from .pipeline import FusionPipeline, resolve_device
from .registration import Registration
from .sync import ApproximateTimeSynchronizer

try:
    import message_filters
except ImportError:
    message_filters = None
try:
    from cv_bridge import CvBridge
except ImportError:
    CvBridge = None

RCLError = _rclpy.RCLError
IR, VIS = 0, 1
CHANNEL_NAMES = ("IR", "visible")
IR_ENCODINGS = ("mono8", "mono16", "16UC1", "32FC1", "rgb8", "bgr8")
VIS_ENCODINGS = ("mono8", "rgb8", "bgr8", "bgra8")
PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
WARN_PERIOD_S = 5.0  # the same problem is reported at most once per period
RESET_AFTER_S = 1.0  # a stamp going back more than this (bag loop) resets the synchroniser
IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
OUTPUT_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def _share_file(*parts: str) -> Path:
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
    profile = _share_file("config", "fastdds.xml")
    if not environ.get(PROFILE_ENV) and profile.is_file():
        environ[PROFILE_ENV] = str(profile)
    return environ.get(PROFILE_ENV, "")


@dataclass
class _Param:
    default: object
    description: str
    choices: tuple = ()
    int_range: tuple | None = None
    float_range: tuple | None = None
    live: bool = True  # changeable while active; otherwise only while the node is not active
    read_only: bool = False


PARAMETERS = {
    "checkpoint": _Param("", "fusion checkpoint (.safetensors); empty = the shipped model", live=False),
    "device": _Param("auto", "auto, cpu, cuda or cuda:N", live=False),
    "half": _Param(False, "float16 inference (CUDA only; ignored on CPU)", live=False),
    "backend": _Param("torch", "inference backend: torch (eager), compile (torch.compile), onnxruntime, "
                      "tensorrt (ONNX Runtime's TensorRT provider, CUDA only)", choices=BACKENDS, live=False),
    "onnx_path": _Param("", "ONNX file from 'ivf export' for the onnxruntime and tensorrt backends; empty = export "
                        "the checkpoint in memory once per input size", live=False),
    "threads": _Param(0, "torch CPU threads, set at configure (also ONNX Runtime's pool); 0 = torch's default",
                      int_range=(0, 64), live=False),
    "autostart": _Param(True, "configure and activate at start-up", read_only=True),
    "input.reliability": _Param("best_effort", "input QoS: best_effort (SensorData) or reliable",
                                choices=("best_effort", "reliable"), live=False),
    "input.depth": _Param(5, "input QoS history depth", int_range=(1, 100), live=False),
    "sync.queue_size": _Param(10, "messages kept per input while waiting for a partner", int_range=(1, 100)),
    "sync.slop": _Param(0.05, "largest stamp difference (s) within a pair", float_range=(0.001, 1.0)),
    "ir.normalization": _Param("auto", "fixed: map ir.fixed_range; percentile: map ir.percentiles of each frame, "
                               "smoothed; auto: full scale for 8-bit IR, percentile otherwise",
                               choices=("auto", "fixed", "percentile")),
    "ir.fixed_range": _Param([0.0, 65535.0], "[low, high] raw IR values mapped to black and white (fixed mode)"),
    "ir.percentiles": _Param([1.0, 99.0], "[low, high] percentiles mapped to black and white (percentile mode)"),
    "ir.smoothing": _Param(0.8, "temporal smoothing of the percentile range (0 = none)", float_range=(0.0, 0.99)),
    "registration.homography": _Param(IDENTITY, "row-major 3x3 homography from IR to visible pixels"),
    "registration.file": _Param("", "YAML file with the homography (overrides registration.homography)"),
    "publish_labels_color": _Param(False, "also publish ~/labels_color (bgr8 overlay)"),
    "silence_timeout": _Param(1.0, "seconds without images before an input is reported silent",
                              float_range=(0.1, 60.0)),
    "diagnostics_period": _Param(1.0, "seconds between /diagnostics messages", float_range=(0.1, 60.0),
                                 read_only=True),
}


def _descriptor(name: str, spec: _Param) -> ParameterDescriptor:
    text = spec.description + ("" if spec.live or spec.read_only else " (change only while inactive)")
    d = ParameterDescriptor(name=name, description=text, read_only=spec.read_only)
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.int_range:
        d.integer_range = [IntegerRange(from_value=spec.int_range[0], to_value=spec.int_range[1], step=1)]
    if spec.float_range:
        d.floating_point_range = [FloatingPointRange(from_value=spec.float_range[0], to_value=spec.float_range[1])]
    return d


@dataclass
class Settings:
    """Validated parameter values turned into the objects the pipeline uses."""

    normalizer: IRNormalizer
    registration: Registration
    values: dict


def build_settings(values: dict) -> Settings:
    """Check parameter values together; raises ``ValueError`` with the reason."""
    for name, spec in PARAMETERS.items():
        if spec.choices and values[name] not in spec.choices:
            raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, not '{values[name]}'")
    resolve_device(values["device"])
    if values["backend"] in ONNX_BACKENDS and importlib.util.find_spec("onnxruntime") is None:
        raise ValueError(f"backend '{values['backend']}' needs the onnxruntime package, which is not installed")
    if values["onnx_path"] and not Path(values["onnx_path"]).expanduser().is_file():
        raise ValueError(f"onnx_path: {values['onnx_path']}: no such ONNX file")
    for key, field in (("ir.fixed_range", "fixed_range"), ("ir.percentiles", "percentiles")):
        if len(values[key]) != 2:
            raise ValueError(f"{key} must be [low, high], got {len(values[key])} numbers")
        try:
            IRNormalizer(**{field: values[key]}, smoothing=float(values["ir.smoothing"]))
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    normalizer = IRNormalizer(values["ir.normalization"], values["ir.fixed_range"], values["ir.percentiles"],
                              float(values["ir.smoothing"]))
    if values["registration.file"]:
        registration = Registration.load(values["registration.file"])
    else:
        registration = Registration.from_flat(values["registration.homography"])
    return Settings(normalizer, registration, dict(values))


class MessageFiltersSynchronizer:
    """``message_filters.ApproximateTimeSynchronizer`` behind the ``ivf_ros.sync`` API (push, counters, reset)."""

    def __init__(self, queue_size: int = 10, slop: float = 0.05, reset_after: float = RESET_AFTER_S):
        self.reset_after = reset_after
        self.pairs, self.dropped, self.resets = 0, [0, 0], 0
        self._queue_size, self._slop = int(queue_size), float(slop)
        self._lock = threading.Lock()
        self._build()

    def _build(self) -> None:
        self._filters = [message_filters.SimpleFilter(), message_filters.SimpleFilter()]
        self._sync = message_filters.ApproximateTimeSynchronizer(self._filters, self._queue_size, self._slop)
        self._sync.registerCallback(lambda ir, vis: self._made.append((ir, vis)))
        self._last_stamp = [None, None]
        self._made = []

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @queue_size.setter
    def queue_size(self, value: int) -> None:
        self._queue_size = self._sync.queue_size = int(value)

    @property
    def slop(self) -> float:
        return self._slop

    @slop.setter
    def slop(self, value: float) -> None:
        from rclpy.duration import Duration

        self._slop = float(value)
        self._sync.slop = Duration(seconds=self._slop)

    def push(self, channel: int, stamp: float, item) -> list[tuple]:
        with self._lock:
            last = self._last_stamp[channel]
            if last is not None and stamp < last - self.reset_after:
                self._reset()
            self._last_stamp[channel] = stamp
            before = [set(q) for q in self._sync.queues]
            self._made = []
            sec = int(stamp // 1)
            nanosec = min(int(round((stamp - sec) * 1e9)), 999_999_999)
            stamped = _Stamped(Header(stamp=Time(seconds=sec, nanoseconds=nanosec).to_msg()), item)
            self._filters[channel].signalMessage(stamped)
            emitted = [{Time.from_msg(p[ch].header.stamp).nanoseconds for p in self._made} for ch in (IR, VIS)]
            for ch in (IR, VIS):
                self.dropped[ch] += len(before[ch] - set(self._sync.queues[ch]) - emitted[ch])
            self.pairs += len(self._made)
            return [(ir.item, vis.item) for ir, vis in self._made]

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        for ch in (IR, VIS):
            self.dropped[ch] += len(self._sync.queues[ch])
        self.resets += 1
        self._build()


@dataclass
class _Stamped:
    header: Header
    item: object


def make_synchronizer(queue_size: int, slop: float):
    """message_filters' synchroniser when installed, else the built-in one (same contract)."""
    cls = MessageFiltersSynchronizer if message_filters is not None else ApproximateTimeSynchronizer
    return cls(queue_size=queue_size, slop=slop, reset_after=RESET_AFTER_S)


def _transition(callback):
    """Run a lifecycle callback; any error fails the transition with a one-line reason in ``node.failure``."""

    @functools.wraps(callback)
    def run(node: "FusionNode", state: LifecycleState) -> TransitionCallbackReturn:
        try:
            return callback(node, state)
        except Exception as exc:  # noqa: BLE001 - rclpy would swallow it silently
            node._stop()
            if callback.__name__ == "on_configure":
                node._release_outputs()
            node.failure = " ".join(str(exc).split()) or type(exc).__name__
            node.get_logger().error(node.failure)
            return TransitionCallbackReturn.FAILURE

    return run


class FusionNode(LifecycleNode):
    """Subscribes ``ir/image`` + ``visible/image``; publishes ``~/fused``, ``~/labels`` (+ ``~/labels_color``)."""

    def __init__(self, node_name: str = "fusion_node", **kwargs):
        super().__init__(node_name, **kwargs)
        for name, spec in PARAMETERS.items():
            self.declare_parameter(name, spec.default, _descriptor(name, spec))
        self.settings: Settings | None = None
        self.pipeline: FusionPipeline | None = None
        self.failure = ""  # why the last transition failed
        self.sync = None
        self.bridge = CvBridge() if CvBridge is not None else None
        self._active = False
        self._outputs = {}
        self._inputs = []
        self._housekeeping = []
        self._worker: threading.Thread | None = None
        self._wake = threading.Condition()
        self._pending = None  # the newest pair waiting for the worker
        self._warned: dict[str, float] = {}
        self._reset_stats()
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> bool:
        """Configure and activate (what ``autostart`` does); False with ``self.failure`` set when either fails."""
        return (self.trigger_configure() == TransitionCallbackReturn.SUCCESS
                and self.trigger_activate() == TransitionCallbackReturn.SUCCESS)

    @_transition
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.settings = build_settings(self._values())
        self._set_threads()
        read_metadata(self.settings.values["checkpoint"] or default_checkpoint())
        for name, kind, qos in (("~/fused", Image, OUTPUT_QOS), ("~/labels", Image, OUTPUT_QOS),
                                ("~/labels_color", Image, OUTPUT_QOS), ("~/class_names", String, LATCHED_QOS)):
            self._outputs[name] = self.create_publisher(kind, name, qos)
        self._outputs["diagnostics"] = self.create_publisher(DiagnosticArray, "/diagnostics", OUTPUT_QOS)
        self._housekeeping = [self.create_timer(self.settings.values["diagnostics_period"], self._publish_diagnostics),
                              self.create_timer(0.25, self._watch_inputs)]
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.settings = build_settings(self._values())
        values = self.settings.values
        self._set_threads()  # threads may have changed while inactive
        onnx_path = Path(values["onnx_path"]).expanduser() if values["onnx_path"] else None
        if onnx_path and values["backend"] not in ONNX_BACKENDS:
            self.get_logger().warning(f"onnx_path is ignored by backend '{values['backend']}'")
        self.pipeline = FusionPipeline(values["checkpoint"] or None, values["device"], values["half"],
                                       self.settings.normalizer, self.settings.registration,
                                       backend=values["backend"], onnx_path=onnx_path)
        names = {"classes": self.pipeline.classes, "palette": self.pipeline.palette}
        self._outputs["~/class_names"].publish(String(data=json.dumps(names)))
        reliability = ReliabilityPolicy.RELIABLE if values["input.reliability"] == "reliable" \
            else ReliabilityPolicy.BEST_EFFORT  # best effort + volatile = SensorData QoS
        qos = QoSProfile(depth=values["input.depth"], reliability=reliability)
        self._reset_stats()
        self.sync = make_synchronizer(values["sync.queue_size"], values["sync.slop"])
        self._active = True
        self._worker = threading.Thread(target=self._work, name="fusion_worker", daemon=True)
        self._worker.start()
        self._inputs = [
            self.create_subscription(Image, "ir/image", lambda m: self._on_image(IR, m), qos),
            self.create_subscription(Image, "visible/image", lambda m: self._on_image(VIS, m), qos),
        ]
        self.get_logger().info(f"fusing on {self.pipeline.device}{' (half)' if self.pipeline.half else ''}: "
                               f"{self._inputs[0].topic_name} + {self._inputs[1].topic_name}")
        return super().on_activate(state)

    @_transition
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop()
        return super().on_deactivate(state)

    @_transition
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop()
        self._release_outputs()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self.on_cleanup(state)

    def _set_threads(self) -> None:
        threads = self.settings.values["threads"]
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _stop(self) -> None:
        """Stop taking images and release the model (and its GPU memory)."""
        for sub in self._inputs:
            self.destroy_subscription(sub)
        self._inputs = []
        with self._wake:
            self._active = False
            self._pending = None
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=10.0)
            self._worker = None
        on_gpu = self.pipeline is not None and self.pipeline.device.type == "cuda"
        self.pipeline = None
        if on_gpu:
            torch.cuda.empty_cache()

    def _release_outputs(self) -> None:
        for timer in self._housekeeping:
            self.destroy_timer(timer)
        for pub in self._outputs.values():
            self.destroy_publisher(pub)
        self._housekeeping, self._outputs = [], {}

    # ---------------------------------------------------------------- parameters
    def _values(self, changes=()) -> dict:
        values = {name: self.get_parameter(name).value for name in PARAMETERS}
        values.update({p.name: p.value for p in changes})
        return values

    def _on_set_parameters(self, params) -> SetParametersResult:
        try:
            settings = build_settings(self._values(params))
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=" ".join(str(exc).split()))
        if self._active:
            frozen = [p.name for p in params if p.name in PARAMETERS and not PARAMETERS[p.name].live]
            if frozen:
                return SetParametersResult(
                    successful=False, reason=f"{', '.join(frozen)} can only change while the node is inactive")
        if self.settings is not None:
            self._apply(settings)
        return SetParametersResult(successful=True)

    def _apply(self, settings: Settings) -> None:
        old, new = self.settings.values, settings.values
        self.settings = settings
        if self.sync is not None:
            self.sync.queue_size, self.sync.slop = new["sync.queue_size"], new["sync.slop"]
        if self.pipeline is not None:
            if any(old[k] != new[k] for k in PARAMETERS if k.startswith("ir.")):
                self.pipeline.ir_normalizer = settings.normalizer
            if any(old[k] != new[k] for k in PARAMETERS if k.startswith("registration.")):
                self.pipeline.registration = settings.registration

    # ---------------------------------------------------------------- input
    def _on_image(self, channel: int, msg: Image) -> None:
        now = time.monotonic()
        name = CHANNEL_NAMES[channel]
        self._received[channel] += 1
        if self._silent[channel]:
            self.get_logger().info(f"{name} images are back after {now - self._last_rx[channel]:.1f} s")
            self._silent[channel] = False
        self._last_rx[channel] = now
        try:
            ros_image.check_fields(msg.encoding, msg.height, msg.width, msg.step, len(msg.data),
                                   IR_ENCODINGS if channel == IR else VIS_ENCODINGS)
        except ValueError as exc:
            self._bad[channel] += 1
            self._warn(f"bad{channel}:{' '.join(str(exc).split()[:2])}", f"{name} image ignored: {exc}")
            return
        stamp = Time.from_msg(msg.header.stamp).nanoseconds * 1e-9
        resets = self.sync.resets
        pairs = self.sync.push(channel, stamp, msg)
        if self.sync.resets != resets:
            self.get_logger().info(f"{name} time went back to {stamp:.3f} s (bag loop?): synchroniser reset")
            self._restart_normalizer = True
        for ir_msg, vis_msg in pairs:
            with self._wake:
                if self._pending is not None:
                    self._skipped += 1
                self._pending = (ir_msg, vis_msg, now)
                self._wake.notify()

    def _watch_inputs(self) -> None:
        if not self._active or len(self._inputs) < 2:
            return
        now = time.monotonic()
        quiet = [now - self._last_rx[ch] for ch in (IR, VIS)]
        self._silent = [q > self.settings.values["silence_timeout"] for q in quiet]
        if all(self._silent):
            self._warn("silent", f"no images on {' or '.join(s.topic_name for s in self._inputs)} "
                                 f"for {min(quiet):.1f} s", input_problem=False)
            return
        for channel in (IR, VIS):
            if self._silent[channel]:
                what = "no images yet" if self._received[channel] == 0 else f"no images for {quiet[channel]:.1f} s"
                self._warn(f"silent{channel}", f"{CHANNEL_NAMES[channel]} input {self._inputs[channel].topic_name}: "
                                               f"{what} (the other input is live)", input_problem=False)

    # ---------------------------------------------------------------- processing
    def _work(self) -> None:
        while True:
            with self._wake:
                while self._active and self._pending is None:
                    self._wake.wait()
                if not self._active:
                    return
                ir_msg, vis_msg, received = self._pending
                self._pending = None
            try:
                self._process(ir_msg, vis_msg, received)
            except ValueError as exc:
                self._warn("pair", f"pair skipped: {' '.join(str(exc).split())}")
            except Exception as exc:  # noqa: BLE001 - one bad pair must not stop the node
                self._warn("error", f"pair failed: {type(exc).__name__}: {' '.join(str(exc).split())}")

    def _process(self, ir_msg: Image, vis_msg: Image, received: float) -> None:
        ir, vis = self._to_array(ir_msg), self._to_array(vis_msg)
        if ir.dtype.kind == "f":
            bad = int(ir.size - np.count_nonzero(np.isfinite(ir)))
            if bad:
                self._bad[IR] += 1
                self._warn("nonfinite", f"IR 32FC1 image has {bad} NaN/inf pixels (NaN and -inf shown cold, +inf hot)")
                if bad == ir.size:
                    raise ValueError("IR image has no finite values")
        shapes = (ir.shape[:2], vis.shape[:2])
        if self._shapes is not None and shapes != self._shapes:
            self._warn(f"size{shapes}", "image sizes changed mid-stream: "
                                        f"IR {_wh(self._shapes[0])} -> {_wh(shapes[0])}, "
                                        f"visible {_wh(self._shapes[1])} -> {_wh(shapes[1])}")
            self._restart_normalizer = True
        self._shapes = shapes
        pipeline = self.pipeline
        if pipeline is None:
            return
        if self._restart_normalizer:
            pipeline.ir_normalizer.reset()
            self._restart_normalizer = False
        result = pipeline(ir, vis)
        header = vis_msg.header
        self._publish("~/fused", result.fused, "bgr8" if result.fused.ndim == 3 else "mono8", header)
        self._latency.append((self.get_clock().now() - Time.from_msg(header.stamp)).nanoseconds * 1e-9)
        self._processing.append(time.monotonic() - received)
        self._publish("~/labels", result.labels, "mono8", header)
        if self.settings.values["publish_labels_color"]:
            self._publish("~/labels_color", pipeline.overlay(result), "bgr8", header)
        self._fused += 1

    def _to_array(self, msg: Image) -> np.ndarray:
        if self.bridge is None:
            return ros_image.image_to_array(msg)
        return self.bridge.imgmsg_to_cv2(msg, "bgr8" if msg.encoding == "rgb8" else "passthrough")

    def _publish(self, topic: str, array: np.ndarray, encoding: str, header: Header) -> None:
        if self.bridge is not None:
            msg = self.bridge.cv2_to_imgmsg(array, encoding=encoding, header=header)
        else:
            msg = ros_image.fill_image(Image(), array, encoding, header)
        self._outputs[topic].publish(msg)

    # ---------------------------------------------------------------- diagnostics
    def _reset_stats(self) -> None:
        now = time.monotonic()
        self._received = [0, 0]
        self._bad = [0, 0]
        self._last_rx = [now, now]
        self._silent = [False, False]
        self._rate_window = (now, [0, 0])
        self._fused = 0
        self._skipped = 0
        self._shapes = None
        self._restart_normalizer = False
        self._problem = (-float("inf"), "")
        self._latency: deque[float] = deque(maxlen=2000)
        self._processing: deque[float] = deque(maxlen=2000)

    def _warn(self, key: str, text: str, input_problem: bool = True) -> None:
        """Log ``text`` at most once per ``WARN_PERIOD_S`` per ``key``; input problems also show in diagnostics."""
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_PERIOD_S) >= WARN_PERIOD_S:
            self._warned[key] = now
            self.get_logger().warning(text)
        if input_problem:
            self._problem = (now, text)

    def diagnostics(self) -> DiagnosticStatus:
        """The node's health: rates, pairs, drops, latency, device."""
        now = time.monotonic()
        since, counts = self._rate_window
        rates = [(self._received[ch] - counts[ch]) / max(now - since, 1e-3) for ch in (IR, VIS)]
        self._rate_window = (now, list(self._received))
        status = DiagnosticStatus(name=f"{self.get_name()}: fusion", hardware_id=self._device_name())
        silent = [CHANNEL_NAMES[ch] for ch in (IR, VIS) if self._silent[ch]]
        if not self._active:
            status.level, status.message = DiagnosticStatus.OK, "inactive"
        elif silent:
            status.level, status.message = DiagnosticStatus.WARN, f"{' and '.join(silent)} input silent"
        elif now - self._problem[0] < max(WARN_PERIOD_S, self.settings.values["diagnostics_period"]):
            status.level, status.message = DiagnosticStatus.WARN, self._problem[1]
        else:
            status.level, status.message = DiagnosticStatus.OK, f"fusing {self._fused} pairs"
        sync = self.sync
        values = {
            "IR rate (Hz)": f"{rates[IR]:.2f}",
            "visible rate (Hz)": f"{rates[VIS]:.2f}",
            "IR images": self._received[IR],
            "visible images": self._received[VIS],
            "bad IR images": self._bad[IR],
            "bad visible images": self._bad[VIS],
            "pairs made": sync.pairs if sync else 0,
            "pairs fused": self._fused,
            "pairs skipped (busy)": self._skipped,
            "IR dropped unpaired": sync.dropped[IR] if sync else 0,
            "visible dropped unpaired": sync.dropped[VIS] if sync else 0,
            "synchroniser resets": sync.resets if sync else 0,
            "synchroniser": type(sync).__name__ if sync else "",
            "device": self._device_name(),
            "backend": self.get_parameter("backend").value,
        }
        for label, samples in (("latency", self._latency), ("processing", self._processing)):
            if samples:
                p50, p90, p99 = np.percentile(np.asarray(samples) * 1e3, (50, 90, 99))
                values.update({f"{label} p50 (ms)": f"{p50:.1f}", f"{label} p90 (ms)": f"{p90:.1f}",
                               f"{label} p99 (ms)": f"{p99:.1f}"})
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        return status

    def _device_name(self) -> str:
        pipeline = self.pipeline
        if pipeline is None:
            return self.get_parameter("device").value
        return f"{pipeline.device}{' half' if pipeline.half else ''}"

    def _publish_diagnostics(self) -> None:
        status = self.diagnostics()
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._outputs["diagnostics"].publish(array)


def _wh(shape) -> str:
    return f"{shape[1]}x{shape[0]}"


def main(args: list[str] | None = None) -> int:
    """``fusion_node [--ros-args ...]``: run until Ctrl-C; exit 1 when the node cannot start, 2 on bad parameters."""
    use_fastdds_profile()
    try:
        rclpy.init(args=args)
        node = FusionNode()
    except (RCLError, ParameterException, ValueError) as exc:
        print(f"fusion_node: error: {' '.join(str(exc).split())}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    if node.get_parameter("autostart").value and not node.start():
        node.destroy_node()
        rclpy.try_shutdown()
        return 1
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._stop()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
