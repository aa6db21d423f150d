"""The ``ivf`` command line: one sub-command per module in ``ivf_ros.tools``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .backends import keep_freed_memory

# Sub-command name -> module in ivf_ros.tools providing ``add_arguments(parser)`` and ``run(args) -> int``.
TOOLS = {
    "fuse": ("fuse", "fuse (and segment) folders of IR/visible pairs"),
    "eval": ("evaluate", "fusion metrics and segmentation scores on folders of pairs"),
    "demo": ("demo", "run the whole system on the embedded MSRS pairs (or yours, or a synthetic street)"),
    "info": ("info", "print a checkpoint's metadata"),
    "calibrate": ("calibrate", "estimate the IR->visible homography YAML (point pairs or automatic)"),
    "calibrate-eval": ("registration_eval", "evaluate automatic registration on the shared data"),
    "bench": ("bench", "time the pipeline, the network and the SAGE student per backend and size"),
    "export": ("export", "export the network to ONNX (and check it against torch)"),
    "bench-node": ("node_bench", "benchmark fusion_node over DDS: rates, drops, latency, memory"),
    "bag": ("bag", "write, evaluate and replay rosbag2 bags of IR/visible images"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivf", description="Infrared + visible image fusion and segmentation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in TOOLS.items():
        tool = importlib.import_module(f"ivf_ros.tools.{module}")
        p = sub.add_parser(name, help=help_text, description=(tool.__doc__ or help_text).strip().splitlines()[0])
        tool.add_arguments(p)
        p.set_defaults(_run=tool.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:  # user errors: one line, no traceback
        print(f"ivf {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
