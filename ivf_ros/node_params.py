"""fusion_node's parameters: the schema (defaults, descriptions, ranges, when each may change) and their validation.

``build_settings`` checks a full set of values together and turns them into the objects the pipeline uses; every
problem is a ``ValueError`` with a one-line reason, which the node returns to ``ros2 param set``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

from .backends import BACKENDS, HEAD_PRECISIONS, ONNX_BACKENDS, resolve_head_dtype
from .checkpoint import default_checkpoint, validate_checkpoint_file
from .errors import one_line
from .imageops import IRNormalizer
from .pipeline import resolve_device
from .registration import Registration
from .streams import MAX_PIXELS

IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
FILE_ERRORS = (ValueError, TypeError, KeyError, OSError)  # what loading a user's file may raise


@dataclass
class Param:
    default: object
    description: str
    choices: tuple = ()
    int_range: tuple | None = None
    float_range: tuple | None = None
    live: bool = True  # changeable while active; otherwise only while the node is not active
    read_only: bool = False


PARAMETERS = {
    "checkpoint": Param("", "fusion checkpoint (.safetensors); empty = the shipped model", live=False),
    "device": Param("auto", "auto, cpu, cuda or cuda:N", live=False),
    "half": Param(False, "float16 inference (CUDA only; ignored on CPU)", live=False),
    "head_precision": Param("auto", "segmentation head on the CPU: auto = bfloat16 with the torch backend on a CPU "
                            "with native bfloat16 (AMX, AVX512-BF16; 2-3x faster, fused image unchanged), else "
                            "float32", choices=HEAD_PRECISIONS, live=False),
    "backend": Param("torch", "inference backend: torch (eager), compile (torch.compile), onnxruntime, "
                     "tensorrt (ONNX Runtime's TensorRT provider, CUDA only)", choices=BACKENDS, live=False),
    "onnx_path": Param("", "ONNX file from 'ivf export' for the onnxruntime and tensorrt backends; empty = export "
                       "the checkpoint in memory once per input size", live=False),
    "threads": Param(0, "torch CPU threads, set at configure (also ONNX Runtime's pool); 0 = torch's default",
                     int_range=(0, 64), live=False),
    "autostart": Param(True, "configure and activate at start-up", read_only=True),
    "transport": Param("raw", "input transport: raw (sensor_msgs/Image on ir/image, visible/image) or compressed "
                       "(sensor_msgs/CompressedImage, JPEG or PNG, on ir/image/compressed, visible/image/compressed)",
                       choices=("raw", "compressed"), live=False),
    "max_pixels": Param(MAX_PIXELS, "largest input frame in pixels (width x height); larger ones are rejected",
                        int_range=(1, 100_000_000)),
    "sync.queue_size": Param(10, "messages kept per input while waiting for a partner", int_range=(1, 100)),
    "sync.slop": Param(0.05, "largest stamp difference (s) within a pair", float_range=(0.001, 1.0)),
    "ir.normalization": Param("auto", "fixed: map ir.fixed_range; percentile: map ir.percentiles of each frame, "
                              "smoothed; auto: full scale for 8-bit IR, percentile otherwise",
                              choices=("auto", "fixed", "percentile")),
    "ir.fixed_range": Param([0.0, 65535.0], "[low, high] raw IR values mapped to black and white (fixed mode)"),
    "ir.percentiles": Param([1.0, 99.0], "[low, high] percentiles mapped to black and white (percentile mode)"),
    "ir.smoothing": Param(0.8, "temporal smoothing of the percentile range (0 = none)", float_range=(0.0, 0.99)),
    "registration.homography": Param(IDENTITY, "row-major 3x3 homography from IR to visible pixels"),
    "registration.file": Param("", "YAML file with the homography (overrides registration.homography)"),
    "publish_labels_color": Param(False, "also publish ~/labels_color (bgr8 overlay)"),
    "silence_timeout": Param(1.0, "seconds without images before an input is reported silent",
                             float_range=(0.1, 60.0)),
    "diagnostics_period": Param(1.0, "seconds between /diagnostics messages", float_range=(0.1, 60.0),
                                read_only=True),
}


def descriptor(name: str, spec: Param) -> ParameterDescriptor:
    text = spec.description + ("" if spec.live or spec.read_only else " (change only while inactive)")
    d = ParameterDescriptor(name=name, description=text, read_only=spec.read_only)
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.int_range:
        d.integer_range = [IntegerRange(from_value=spec.int_range[0], to_value=spec.int_range[1], step=1)]
    if spec.float_range:
        d.floating_point_range = [FloatingPointRange(from_value=spec.float_range[0], to_value=spec.float_range[1])]
    return d


def declare(node) -> None:
    """Declare every parameter of the schema on ``node``."""
    for name, spec in PARAMETERS.items():
        node.declare_parameter(name, spec.default, descriptor(name, spec))


@dataclass
class Settings:
    """Validated parameter values turned into the objects the pipeline uses."""

    normalizer: IRNormalizer
    registration: Registration
    values: dict


IR_PARAMETERS = ("ir.normalization", "ir.fixed_range", "ir.percentiles", "ir.smoothing")
REGISTRATION_PARAMETERS = ("registration.homography", "registration.file")


def build_settings(values: dict, previous: Settings | None = None) -> Settings:
    """Check parameter values together; raises ``ValueError`` with the reason. What ``previous`` (settings already
    checked) holds for unchanged values is kept: their files (checkpoint, ONNX, homography) are not read again."""
    values = {name: values[name] for name in PARAMETERS}

    def changed(*names: str) -> bool:
        return previous is None or any(previous.values[name] != values[name] for name in names)

    for name, spec in PARAMETERS.items():
        if spec.choices and values[name] not in spec.choices:
            raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, not '{values[name]}'")
    resolve_head_dtype(values["head_precision"], resolve_device(values["device"]), values["backend"])
    if values["backend"] in ONNX_BACKENDS and importlib.util.find_spec("onnxruntime") is None:
        raise ValueError(f"backend '{values['backend']}' needs the onnxruntime package, which is not installed")
    if changed("onnx_path") and values["onnx_path"] and not Path(values["onnx_path"]).expanduser().is_file():
        raise ValueError(f"onnx_path: {values['onnx_path']}: no such ONNX file")
    normalizer = _normalizer(values) if changed(*IR_PARAMETERS) else previous.normalizer
    if changed("checkpoint"):
        checkpoint = str(values["checkpoint"] or default_checkpoint())
        try:  # the header only: cheap, and a bad file is refused when it is set, not at the next activate
            validate_checkpoint_file(checkpoint)
        except FILE_ERRORS as exc:
            raise ValueError(f"checkpoint: {_one_line(exc, checkpoint)}") from None
    registration = _registration(values) if changed(*REGISTRATION_PARAMETERS) else previous.registration
    return Settings(normalizer, registration, values)


def _normalizer(values: dict) -> IRNormalizer:
    for key, field in (("ir.fixed_range", "fixed_range"), ("ir.percentiles", "percentiles")):
        if len(values[key]) != 2:
            raise ValueError(f"{key} must be [low, high], got {len(values[key])} numbers")
        try:
            IRNormalizer(**{field: values[key]}, smoothing=float(values["ir.smoothing"]))
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return IRNormalizer(values["ir.normalization"], values["ir.fixed_range"], values["ir.percentiles"],
                        float(values["ir.smoothing"]))


def _registration(values: dict) -> Registration:
    try:
        if values["registration.file"]:
            return Registration.load(values["registration.file"])
        return Registration.from_flat(values["registration.homography"])
    except FILE_ERRORS as exc:
        raise ValueError(f"registration: {_one_line(exc, values['registration.file'])}") from None


def change(current: Settings | None, values: dict, params, active: bool) -> Settings:
    """The settings once ``params`` (rclpy Parameters) are set on top of ``values``; ``current`` (the settings in
    use, if any) saves re-reading files whose parameters do not change. ``ValueError`` with the reason when
    refused."""
    values = dict(values)
    values.update({p.name: p.value for p in params if p.name in PARAMETERS})
    settings = build_settings(values, current)
    frozen = [p.name for p in params if p.name in PARAMETERS and not PARAMETERS[p.name].live]
    if active and frozen:
        raise ValueError(f"{', '.join(frozen)} can only change while the node is inactive")
    return settings


def _one_line(exc: BaseException, path: str = "") -> str:
    """The reason in one line, naming ``path`` and, for errors other than ValueError, the kind of error."""
    text = one_line(exc)
    text = text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"
    return text if not path or path in text else f"{path}: {text}"
