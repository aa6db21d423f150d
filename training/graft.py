"""Join one checkpoint's segmentation head with another's fusion decoder into one checkpoint.

    python -m training.graft --head runs/head.safetensors --fusion runs/m5/final.safetensors \\
        --out models/ivf_student.safetensors

A head with its own path (``seg_context`` > 0) reads only the encoder (``ENCODER_MODULES``); the fused image also
depends on the fusion decoder (``DECODER_MODULES``), which the head never reads. When both checkpoints share the
encoder bit for bit, the result therefore fuses exactly as ``--fusion`` and labels exactly as ``--head``; anything
else is refused. The head and the decoder can so be trained apart (``training.fit_head`` with the fusion frozen,
``training.train`` with ``train.trainable: [dec8, dec4, coeff_head]``). The metadata is the head checkpoint's;
``training.fusion`` describes the decoder's source (file, SHA-256, its training block and validation) and
``validation`` is the result's own, on the ``val`` entry of ``--config``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ivf_ros.checkpoint import CheckpointError, load_checkpoint

from .train import DECODER_MODULES, ENCODER_MODULES, file_sha256, save_validated


def _tensors(state: dict, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.split(".")[0] in modules}


def graft(head_path: Path, fusion_path: Path) -> tuple[torch.nn.Module, dict]:
    """The ``head_path`` checkpoint with the decoder tensors of ``fusion_path``; raises CheckpointError when the
    head reads the decoder's features or the two encoders differ."""
    model, meta = load_checkpoint(head_path)
    donor, donor_meta = load_checkpoint(fusion_path)
    if not getattr(model, "seg_context", 0):
        raise CheckpointError(f"{head_path}: its head reads the fusion decoder's features (seg_context 0), "
                              "so a new decoder would change its labels")
    if donor_meta["architecture"] != meta["architecture"] or donor_meta["hyper_parameters"].get("width") != \
            meta["hyper_parameters"].get("width"):
        raise CheckpointError(f"{fusion_path}: another architecture or width than {head_path}")
    state, donor_state = model.state_dict(), donor.state_dict()
    mine, theirs = _tensors(state, ENCODER_MODULES), _tensors(donor_state, ENCODER_MODULES)
    differ = sorted(k for k in mine if k not in theirs or not torch.equal(mine[k], theirs[k]))
    if differ:
        raise CheckpointError(f"{fusion_path}: its encoder differs from {head_path}'s ({len(differ)} tensors, "
                              f"e.g. {differ[0]}); the head would read other features")
    state.update(_tensors(donor_state, DECODER_MODULES))
    model.load_state_dict(state)
    training = dict(meta.get("training", {}))
    training["fusion"] = {"checkpoint": str(fusion_path),
                          "sha256": file_sha256(fusion_path),
                          "modules": list(DECODER_MODULES), "training": donor_meta.get("training"),
                          "validation": donor_meta.get("validation")}
    return model, {**meta, "training": training}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", required=True, type=Path, help="checkpoint whose encoder and head are kept")
    ap.add_argument("--fusion", required=True, type=Path, help="checkpoint whose fusion decoder is taken")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", default="training/configs/segmentation.yaml", help="its 'val' entry validates")
    args = ap.parse_args(argv)
    try:
        model, meta = graft(args.head, args.fusion)
    except CheckpointError as exc:
        raise SystemExit(f"graft: error: {exc}")
    print(json.dumps(save_validated(model, meta, args.config, args.out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
