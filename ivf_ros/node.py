"""ROS 2 node ``fusion_node``: time-synced IR + visible images in, fused image and class-id map out.

A thin lifecycle shell over ``FusionPipeline``: subscriptions, pairing, publishing. The parameter schema lives in
``node_params``, the input checks in ``streams``, QoS and the Fast DDS profile in ``dds``, counters and diagnostics in
``node_stats``. The model is loaded on ``activate`` and released on ``deactivate``; by default the node configures
and activates itself (parameter ``autostart``).
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from . import ros_image
from .backends import ONNX_BACKENDS, keep_freed_memory
from .dds import input_qos, latched_qos, output_qos, overridable, use_fastdds_profile
from .errors import one_line
from .node_params import FILE_ERRORS, PARAMETERS, Settings, build_settings, change, declare
from .node_stats import NodeStats, RateLimitedLog
from .pipeline import FusionPipeline
from .streams import IR, STREAM_NAMES, VIS, StreamCheck, stamp_seconds
from .sync import ApproximateTimeSynchronizer
from .worker import LatestWorker

RESET_AFTER_S = 1.0  # a stamp going back more than this (bag loop) resets the synchroniser
WORKER_JOIN_S = 10.0  # deactivate waits this long for a pair in progress; activate refuses until it is done
IMAGE_OUTPUTS = ("~/fused", "~/labels", "~/labels_color")
LISTENED = ("~/fused", "~/labels", "~/camera_info")  # + ~/labels_color when published


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
            node.failure = one_line(exc)
            node.get_logger().error(node.failure)
            return TransitionCallbackReturn.FAILURE

    return run


class FusionNode(LifecycleNode):
    """Subscribes ``ir/image`` + ``visible/image`` (or their ``/compressed``) and ``visible/camera_info``;
    publishes ``~/fused``, ``~/labels`` (+ ``~/labels_color``) and ``~/camera_info``."""

    def __init__(self, node_name: str = "fusion_node", **kwargs):
        super().__init__(node_name, **kwargs)
        declare(self)
        self.settings: Settings | None = None
        self.pipeline: FusionPipeline | None = None
        self.failure = ""  # why the last transition failed
        self.sync: ApproximateTimeSynchronizer | None = None
        self.stats = NodeStats()
        self._log = RateLimitedLog(self.get_logger(), lambda: self.stats)
        self._checks = [StreamCheck(IR), StreamCheck(VIS)]
        self._active = False
        self._outputs, self._inputs, self._timers = {}, [], []
        self._worker: LatestWorker | None = None
        self._restart_normalizer = False
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
        for name, kind, qos in [(n, Image, output_qos) for n in IMAGE_OUTPUTS] + [
                ("~/camera_info", CameraInfo, output_qos), ("~/class_names", String, latched_qos),
                ("/diagnostics", DiagnosticArray, output_qos)]:
            self._outputs[name] = self.create_publisher(kind, name, qos(), qos_overriding_options=overridable())
        self._timers = [self.create_timer(self.settings.values["diagnostics_period"], self._publish_diagnostics),
                        self.create_timer(0.25, self._watch_inputs)]
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._worker is not None and self._worker.alive():  # never two workers
            self.failure = "the previous activation is still finishing a pair: activate again when it is done"
            self.get_logger().error(self.failure)
            return TransitionCallbackReturn.FAILURE
        self.settings = build_settings(self._values())
        values = self.settings.values
        self._set_threads()  # threads may have changed while inactive
        onnx_path = Path(values["onnx_path"]).expanduser() if values["onnx_path"] else None
        if onnx_path and values["backend"] not in ONNX_BACKENDS:
            self.get_logger().warning(f"onnx_path is ignored by backend '{values['backend']}'")
        self.pipeline = FusionPipeline(values["checkpoint"] or None, values["device"], values["half"],
                                       self.settings.normalizer, self.settings.registration,
                                       backend=values["backend"], onnx_path=onnx_path,
                                       head_precision=values["head_precision"])
        names = {"classes": self.pipeline.classes, "palette": self.pipeline.palette}
        self._outputs["~/class_names"].publish(String(data=json.dumps(names)))
        self.stats = NodeStats()
        self.sync = ApproximateTimeSynchronizer(values["sync.queue_size"], values["sync.slop"], RESET_AFTER_S)
        self._checks = [StreamCheck(ch, values["max_pixels"]) for ch in (IR, VIS)]
        self._active = True
        self._worker = LatestWorker(self._process, lambda exc: self._log.warn(
            "error", f"pair failed: {type(exc).__name__}: {one_line(exc)}"),
            name=f"fusion_worker {self.get_fully_qualified_name()}")
        kind, suffix = (CompressedImage, "/compressed") if values["transport"] == "compressed" else (Image, "")
        subscriptions = [(kind, f"ir/image{suffix}", functools.partial(self._on_image, IR)),
                         (kind, f"visible/image{suffix}", functools.partial(self._on_image, VIS)),
                         (CameraInfo, "visible/camera_info", self._on_camera_info)]
        self._inputs = [self.create_subscription(k, topic, self._log.guarded(cb), input_qos(),
                                                 qos_overriding_options=overridable())
                        for k, topic, cb in subscriptions]
        self.get_logger().info(f"fusing on {self.pipeline.device} ({self.pipeline.precision}): "
                               f"{self._inputs[IR].topic_name} + {self._inputs[VIS].topic_name}")
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
        """Stop taking images and release the model (and its GPU memory) once no pair is in progress."""
        for sub in self._inputs:
            self.destroy_subscription(sub)
        self._inputs = []
        self._active = False
        if self._worker is not None:
            if self._worker.stop(WORKER_JOIN_S):
                self._worker = None
            else:
                self.get_logger().warning(f"a pair is still in progress after {WORKER_JOIN_S:.0f} s; its result will "
                                          "be dropped, and activate waits until it is done")
        on_gpu = self.pipeline is not None and self.pipeline.device.type == "cuda"
        self.pipeline = None
        if on_gpu and self._worker is None:
            torch.cuda.empty_cache()

    def _release_outputs(self) -> None:
        for timer in self._timers:
            self.destroy_timer(timer)
        for pub in self._outputs.values():
            self.destroy_publisher(pub)
        self._timers, self._outputs = [], {}

    # ---------------------------------------------------------------- parameters
    def _values(self) -> dict:
        return {name: self.get_parameter(name).value for name in PARAMETERS}

    def _on_set_parameters(self, params) -> SetParametersResult:
        try:  # a user's file may raise anything: refused with the reason, never out of this callback
            settings = change(self.settings, self._values(), params, self._active)
        except FILE_ERRORS as exc:
            return SetParametersResult(successful=False, reason=one_line(exc))
        if self.settings is not None:
            self._apply(settings)
        return SetParametersResult(successful=True)

    def _apply(self, settings: Settings) -> None:
        old, new = self.settings, settings.values
        self.settings = settings
        if self.sync is not None:
            self.sync.queue_size, self.sync.slop = new["sync.queue_size"], new["sync.slop"]
        for check in self._checks:
            check.max_pixels = new["max_pixels"]
        if self.pipeline is not None:  # new objects only where their parameters changed
            if settings.normalizer is not old.normalizer:
                self.pipeline.ir_normalizer = settings.normalizer
            if settings.registration is not old.registration:
                self.pipeline.registration = settings.registration

    # ---------------------------------------------------------------- input
    def _on_image(self, channel: int, msg) -> None:
        now = time.monotonic()
        back = self.stats.arrived(channel, now)
        if back is not None:
            self.get_logger().info(f"{STREAM_NAMES[channel]} images are back after {back:.1f} s")
        try:
            stamp = self._checks[channel].fields(msg)
        except ValueError as exc:
            return self._log.bad_image(channel, exc)
        resets = self.sync.resets
        pairs = self.sync.push(channel, stamp, msg)
        if self.sync.resets != resets:
            self.get_logger().info(f"{STREAM_NAMES[channel]} time went back to {stamp:.3f} s (bag loop?): "
                                   "synchroniser and latency statistics reset")
            self._restart_normalizer = True
            self.stats.latency.reset()
        for pair in pairs:
            if not any(self._outputs[t].get_subscription_count() for t in self._listened_outputs()):
                self.stats.unheard += 1
                self._log.warn("unheard", "no subscribers to the outputs: pairs are counted, not fused",
                               input_problem=False)
                continue
            self.stats.skipped += self._worker.put((*pair, now))

    def _listened_outputs(self) -> tuple[str, ...]:
        return LISTENED + ("~/labels_color",) * bool(self.settings.values["publish_labels_color"])

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            stamp_seconds(msg.header.stamp)
        except ValueError as exc:
            self.stats.bad_camera_info += 1
            return self._log.warn("bad_info", f"camera info ignored: {exc}")
        self.stats.camera_info, self.stats.camera_info_count = msg, self.stats.camera_info_count + 1

    def _watch_inputs(self) -> None:
        if not self._active or len(self._inputs) < 2:
            return
        topics = [s.topic_name for s in self._inputs[:2]]
        for key, text in self.stats.silences(time.monotonic(), self.settings.values["silence_timeout"], topics):
            self._log.warn(key, text, input_problem=False)

    # ---------------------------------------------------------------- processing (worker thread)
    def _process(self, item) -> None:
        ir_msg, vis_msg, received = item
        worker, images = self._worker, []
        for channel, msg in ((IR, ir_msg), (VIS, vis_msg)):
            try:
                checked = self._checks[channel].convert(msg)
            except ValueError as exc:
                return self._log.bad_image(channel, exc)
            for note in checked.notes:
                self._log.warn(note.split(":")[0], note)
            self._restart_normalizer |= checked.resized
            images.append(checked.image)
        pipeline = self.pipeline
        if pipeline is None:
            return
        if self._restart_normalizer:
            pipeline.ir_normalizer.reset()
            self._restart_normalizer = False
        result = pipeline(*images)
        if not worker.running:  # deactivated meanwhile: the result is dropped
            return
        header = vis_msg.header
        self._publish("~/fused", result.fused, "bgr8" if result.fused.ndim == 3 else "mono8", header)
        self.stats.latency.add(self.get_clock().now().nanoseconds * 1e-9 - stamp_seconds(header.stamp))
        self.stats.processing.add(time.monotonic() - received)
        self._publish("~/labels", result.labels, "mono8", header)
        if self.settings.values["publish_labels_color"]:
            self._publish("~/labels_color", pipeline.overlay(result), "bgr8", header)
        if self.stats.camera_info is not None:
            self._outputs["~/camera_info"].publish(ros_image.restamped(self.stats.camera_info, header))
        self.stats.fused += 1

    def _publish(self, topic: str, array, encoding: str, header) -> None:
        self._outputs[topic].publish(ros_image.fill_image(Image(), array, encoding, header))

    # ---------------------------------------------------------------- diagnostics
    def diagnostics(self):
        """The node's health as a DiagnosticStatus (see ``node_stats``)."""
        pipeline = self.pipeline
        if pipeline:
            hardware = str(pipeline.device) + ("" if pipeline.precision == "float32" else f" {pipeline.precision}")
        else:
            hardware = self.get_parameter("device").value
        info_topic = self._inputs[2].topic_name if len(self._inputs) > 2 else "visible/camera_info"
        period = self.settings.values["diagnostics_period"] if self.settings else 1.0
        return self.stats.status(self.get_name(), hardware, self._active, self.sync,
                                 self.get_parameter("backend").value, info_topic, period)

    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray(status=[self.diagnostics()])
        array.header.stamp = self.get_clock().now().to_msg()
        self._outputs["/diagnostics"].publish(array)


def main(args: list[str] | None = None) -> int:
    """``fusion_node [--ros-args ...]``: run until Ctrl-C; exit 1 when the node cannot start, 2 on bad parameters."""
    use_fastdds_profile()
    keep_freed_memory()
    try:
        rclpy.init(args=args)
        node = FusionNode()
    except (_rclpy.RCLError, ParameterException, ValueError) as exc:
        print(f"fusion_node: error: {one_line(exc)}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = 0
    try:  # Ctrl-C while the model loads ends as cleanly as while spinning
        if node.get_parameter("autostart").value and not node.start():
            code = 1 if rclpy.ok() else 0  # a Ctrl-C mid-transition fails it: not a failed start
        else:
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except _rclpy.RCLError:  # Ctrl-C's shutdown can land inside spin, between its checks and its wait set
        if rclpy.ok():
            raise
    finally:
        node._stop()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
