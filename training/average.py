"""Average the weights of checkpoints of one architecture (a "model soup") and validate the result.

    python -m training.average A.safetensors B.safetensors --out models/ivf_student.safetensors [--config CFG]

Useful for checkpoints on one training trajectory (a student and its fine-tune): the average sits between them
on the metrics they trade against each other. The metadata describes the average (see ``average_checkpoints``)
and its own validation numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ivf_ros.checkpoint import CheckpointError, load_checkpoint
from ivf_ros.model import count_parameters

from .train import file_sha256, git_commit, save_validated


def average_checkpoints(paths: list[Path]) -> tuple[torch.nn.Module, dict]:
    """Mean of the floating-point tensors of ``paths``; integer buffers come from the first checkpoint.

    The metadata describes the average: the shared architecture, classes and conventions, and under ``training``
    the averaging and each input (file, SHA-256, commit, steps, init, validation); nothing of one input is taken
    for the whole."""
    models, metas = zip(*(load_checkpoint(p) for p in paths))
    shared = ("architecture", "hyper_parameters", "classes", "palette")
    for p, meta in zip(paths[1:], metas[1:]):
        differs = [k for k in shared if meta[k] != metas[0][k]]
        if differs:
            raise CheckpointError(f"{p}: {', '.join(differs)} differ(s) from {paths[0]}")
    states = [m.state_dict() for m in models]
    merged = {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
              for k, v in states[0].items()}
    model = models[0]
    model.load_state_dict(merged)
    meta = {k: metas[0][k] for k in (*shared, "input") if k in metas[0]}
    meta["parameters"] = count_parameters(model)
    meta["training"] = {
        "method": "weight average (training/average.py): uniform mean of the floating-point tensors, "
                  "integer buffers from the first input",
        "inputs": [{"checkpoint": str(p), "sha256": file_sha256(p),
                    **{k: m.get("training", {}).get(k) for k in ("commit", "steps", "init", "data")},
                    "validation": m.get("validation")} for p, m in zip(paths, metas)],
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }
    return model, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", default="training/configs/student.yaml", help="its 'val' entry is used to validate")
    args = ap.parse_args(argv)
    if len(args.checkpoints) < 2:
        ap.error("give at least two checkpoints")
    model, meta = average_checkpoints(args.checkpoints)
    print(json.dumps(save_validated(model, meta, args.config, args.out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
