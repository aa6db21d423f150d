"""Fine-tune the segmentation head on your own labelled pairs (fusion unchanged).

    python -m training.finetune DATA --layout msrs|fmb|mfnet|pairs [--steps 1500] [--out runs/finetune]
        [--init models/ivf_student.safetensors] [--set KEY=VALUE ...]

``DATA`` in one of the layouts of ``training/datasets.py`` (pixel labels, or ``pairs`` with YOLO ``boxes/``);
every 4th name (sorted) validates, the rest trains. The recipe is ``training/configs/segmentation.yaml`` without the
teacher: the checkpoint's fusion modules are frozen and the head is trained on your labels (classes mapped by name
onto background, person, bicycle, car). Writes ``OUT/best.safetensors``, usable as ``--checkpoint`` everywhere.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .train import load_config, set_entry, train

RECIPE = Path(__file__).resolve().parent / "configs" / "segmentation.yaml"


def finetune_config(data: str, layout: str, steps: int, init: str) -> dict:
    cfg = load_config(RECIPE)
    root = str(Path(data).resolve())
    cfg.update(init=init, data=[{"root": root, "layout": layout, "split": "train"}],
               val={"root": root, "layout": layout, "split": "val"})
    cfg["train"]["steps"] = steps
    cfg["train"]["val_every"] = max(1, min(cfg["train"]["val_every"], steps))
    cfg["segmentation_targets"] = f"the user's labels ({layout} layout, {root})"
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="dataset folder")
    ap.add_argument("--layout", default="msrs", choices=("msrs", "fmb", "mfnet", "pairs"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="runs/finetune")
    ap.add_argument("--init", default="models/ivf_student.safetensors", help="checkpoint to start from")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (train.crop=128)")
    args = ap.parse_args(argv)
    cfg = finetune_config(args.data, args.layout, args.steps, args.init)
    for item in args.set:
        set_entry(cfg, item)
    print(json.dumps(train(cfg, Path(args.out)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
