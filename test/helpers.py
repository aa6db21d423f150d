"""Helpers shared by the tests of the package's tools (the node tests have theirs in node_harness.py)."""
import shutil
from pathlib import Path

import pytest

from ivf_ros.data import data_root

MSRS = data_root() / "msrs"
needs_msrs = pytest.mark.skipif(not MSRS.is_dir(), reason=f"shared data not found at {MSRS} (set IVF_DATA)")


def copy_msrs(root: Path, stems: list[str]) -> Path:
    """``root`` with the MSRS pairs ``stems``: ir/, vi/ and their boxes/."""
    for sub, ext in (("ir", ".png"), ("vi", ".png"), ("boxes", ".txt")):
        (root / sub).mkdir()
        for stem in stems:
            shutil.copy(MSRS / sub / f"{stem}{ext}", root / sub / f"{stem}{ext}")
    return root
