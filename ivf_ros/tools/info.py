"""Check a checkpoint (header only) and print its metadata (architecture, classes, training data, metrics)."""
from __future__ import annotations

import json

from ..checkpoint import default_checkpoint, validate_checkpoint_file


def add_arguments(p) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint file (default: the shipped one)")


def run(args) -> int:
    print(json.dumps(validate_checkpoint_file(args.checkpoint or default_checkpoint()), indent=2))
    return 0
