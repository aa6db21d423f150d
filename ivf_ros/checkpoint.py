"""Checkpoints: safetensors weights plus a JSON metadata block in the safetensors header.

Loading never unpickles anything. Every failure is a ``CheckpointError`` whose message is one line naming the
file and what is wrong with it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import ARCHITECTURES, build_model

METADATA_KEY = "ivf_ros"
REQUIRED_KEYS = ("architecture", "hyper_parameters", "classes", "palette")
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
    missing = [k for k in REQUIRED_KEYS if k not in meta or meta[k] is None]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata block of a checkpoint, validated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata block")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc.msg})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    if meta["architecture"] not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unknown architecture '{meta['architecture']}' (known: {', '.join(ARCHITECTURES)})"
        )
    if len(meta["classes"]) != len(meta["palette"]):
        raise CheckpointError(f"{path}: {len(meta['classes'])} classes but {len(meta['palette'])} palette colours")
    return meta


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its weights. Returns ``(model.eval(), metadata)``."""
    path = Path(path) if path else default_checkpoint()
    meta = read_metadata(path)
    try:
        model = build_model(meta["architecture"], meta["hyper_parameters"])
    except TypeError as exc:
        raise CheckpointError(f"{path}: bad hyper-parameters for {meta['architecture']} ({exc})") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights are unreadable ({_one_line(exc)})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path}: weights do not match {meta['architecture']} ({what})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"{meta['architecture']} needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]
