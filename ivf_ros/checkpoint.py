"""Checkpoints: safetensors weights plus a JSON metadata block in the safetensors header.

Loading never unpickles anything. Every failure is a ``CheckpointError`` whose message is one line naming the
file and what is wrong with it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .data import file_problem
from .errors import one_line
from .model import ARCHITECTURES, build_model

METADATA_KEY = "ivf_ros"
REQUIRED_KEYS = ("architecture", "hyper_parameters", "classes", "palette")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype names of floating-point tensors
_SAFETENSORS_DTYPE = {torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "ivf_student.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match its architecture."""


def default_checkpoint() -> Path:
    """The shipped checkpoint: ``models/ivf_student.safetensors`` next to the package (source or share dir)."""
    if DEFAULT_CHECKPOINT.exists():
        return DEFAULT_CHECKPOINT
    try:  # installed by colcon: share/ivf_ros/models
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("ivf_ros")) / "models" / DEFAULT_CHECKPOINT.name
    except Exception:  # noqa: BLE001 - no ament index: report the source-tree path in the error
        return DEFAULT_CHECKPOINT


def save_checkpoint(path: str | Path, model: torch.nn.Module, metadata: dict) -> Path:
    """Write weights and metadata; also writes ``<name>.json`` beside it as a readable model card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata)
    meta.setdefault("architecture", getattr(model, "architecture", None))
    meta.setdefault("hyper_parameters", model.hyper_parameters() if hasattr(model, "hyper_parameters") else None)
    validate_metadata({k: v for k, v in meta.items() if v is not None}, path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata block of a checkpoint, validated (types and ranges); reads the header only."""
    path = Path(path)
    meta = _json_metadata(path, _header(path)[0])
    validate_metadata(meta, path)
    return meta


def validate_checkpoint_file(path: str | Path) -> dict:
    """Check a checkpoint without building the model or reading its weights: the metadata, and every tensor's name,
    dtype and shape against the architecture (instantiated on the meta device, so nothing is allocated).
    Returns the metadata; raises ``CheckpointError``. Cheap enough for a set-parameter callback."""
    path = Path(path)
    header, tensors = _header(path)
    meta = _json_metadata(path, header)
    validate_metadata(meta, path)
    with torch.device("meta"):
        expected = build_model(meta["architecture"], meta["hyper_parameters"]).state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path}: weights do not match {meta['architecture']} ({what})")
    for name, (dtype, shape) in tensors.items():
        want = expected[name]
        if want.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is stored as {dtype}, {meta['architecture']} needs "
                                  f"floating-point weights ({', '.join(FLOAT_DTYPES)})")
        if not want.is_floating_point() and dtype != _SAFETENSORS_DTYPE.get(want.dtype):
            raise CheckpointError(f"{path}: tensor {name} is stored as {dtype}, {meta['architecture']} needs "
                                  f"{_SAFETENSORS_DTYPE.get(want.dtype, want.dtype)}")
        if tuple(shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(shape)}, {meta['architecture']} needs {tuple(want.shape)}"
            )
    return meta


def validate_metadata(meta, path: str | Path) -> None:
    """Types and ranges of the metadata block, hyper-parameters within the limits the architecture declares
    (``hyper_parameter_limits`` next to it in ``ivf_ros.model``); raises ``CheckpointError``."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, not {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    arch = meta["architecture"]
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: architecture must be a string, not {_short(arch)}")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {_short(arch)} (known: {', '.join(ARCHITECTURES)})")
    hp = meta["hyper_parameters"]
    if not isinstance(hp, dict):
        raise CheckpointError(f"{path}: hyper_parameters must be an object, not {_short(hp)}")
    limits = getattr(ARCHITECTURES[arch], "hyper_parameter_limits", {})
    for key, value in hp.items():
        if key not in limits:
            raise CheckpointError(f"{path}: {arch} has no hyper-parameter {_short(key)} "
                                  f"(known: {', '.join(limits) or 'none'})")
        kind, low, high = limits[key]
        if isinstance(value, bool) or not (isinstance(value, kind) or (kind is float and isinstance(value, int))):
            raise CheckpointError(f"{path}: hyper-parameter {key} must be {kind.__name__}, not {_short(value)}")
        if not low <= value <= high:
            raise CheckpointError(f"{path}: hyper-parameter {key} = {value} is outside [{low}, {high}] for {arch}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise CheckpointError(f"{path}: classes must be a non-empty list of names, not {_short(classes)}")
    if "num_classes" in hp and hp["num_classes"] != len(classes):
        raise CheckpointError(f"{path}: {len(classes)} classes but hyper-parameter num_classes = {hp['num_classes']}")
    palette = meta["palette"]
    if not isinstance(palette, list):
        raise CheckpointError(f"{path}: palette must be a list of [r, g, b] colours, not {_short(palette)}")
    if len(classes) != len(palette):
        raise CheckpointError(f"{path}: {len(classes)} classes but {len(palette)} palette colours")
    for i, colour in enumerate(palette):
        if not (isinstance(colour, list) and len(colour) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)):
            raise CheckpointError(f"{path}: palette colour {i} must be [r, g, b] integers 0..255, not {_short(colour)}")


def _json_metadata(path: Path, header: dict) -> dict:
    """The parsed ``ivf_ros`` block of a safetensors header's metadata."""
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata block")
    try:
        return json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc.msg})") from None


def _header(path: Path) -> tuple[dict, dict]:
    """(string metadata, {tensor name: (safetensors dtype, shape)}) from the file's header, no tensor data read."""
    problem = file_problem(path, "checkpoint")
    if problem:
        raise CheckpointError(problem)
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return f.metadata() or {}, {k: (s.get_dtype(), s.get_shape()) for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(exc, 200)})") from None


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its weights. Returns ``(model.eval(), metadata)``.

    Everything ``validate_checkpoint_file`` checks is checked before the model is built; weights must be finite."""
    path = Path(path) if path else default_checkpoint()
    meta = validate_checkpoint_file(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights are unreadable ({one_line(exc, 200)})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    model = build_model(meta["architecture"], meta["hyper_parameters"])
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta


def _short(value) -> str:
    """A one-line, bounded description of a metadata value for error messages."""
    text = " ".join(json.dumps(value).split()) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
