"""Print a checkpoint's metadata (architecture, classes, training data, validation metrics)."""
from __future__ import annotations

import json

from ..checkpoint import default_checkpoint, read_metadata


def add_arguments(p) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint file (default: the shipped one)")


def run(args) -> int:
    print(json.dumps(read_metadata(args.checkpoint or default_checkpoint()), indent=2))
    return 0
