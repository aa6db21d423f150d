"""Helpers shared by the tests of the package's tools (the node tests have theirs in node_harness.py): the shared
MSRS pairs and checkpoint files written as users' bad files would be."""
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from ivf_ros.checkpoint import read_metadata, save_checkpoint
from ivf_ros.data import data_root
from ivf_ros.model import FusionStudent

MSRS = data_root() / "msrs"
needs_msrs = pytest.mark.skipif(not MSRS.is_dir(), reason=f"shared data not found at {MSRS} (set IVF_DATA)")
META = {"classes": ["background", "person"], "palette": [[0, 0, 0], [255, 0, 0]], "training": {"data": "test"}}


def copy_msrs(root: Path, stems: list[str]) -> Path:
    """``root`` with the MSRS pairs ``stems``: ir/, vi/ and their boxes/."""
    for sub, ext in (("ir", ".png"), ("vi", ".png"), ("boxes", ".txt")):
        (root / sub).mkdir()
        for stem in stems:
            shutil.copy(MSRS / sub / f"{stem}{ext}", root / sub / f"{stem}{ext}")
    return root


def write_checkpoint(path: Path, meta_changes: dict | None = None, tensor_change=None) -> Path:
    """A small checkpoint (two classes, width 8) with some metadata entries replaced and/or ``coeff_head.weight``
    transformed by ``tensor_change``; written without the checks ``save_checkpoint`` makes."""
    model = FusionStudent(num_classes=2, width=8)
    save_checkpoint(path, model, META)
    tensors = dict(model.state_dict())
    if tensor_change is not None:
        tensors["coeff_head.weight"] = tensor_change(tensors["coeff_head.weight"])
    save_file(tensors, str(path), metadata={"ivf_ros": json.dumps({**read_metadata(path), **(meta_changes or {})})})
    return path


def corrupt_checkpoint(path: Path) -> Path:
    """A .safetensors file whose header (16 bytes, as its length says) is not JSON."""
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    return path
