"""Fine-tune the segmentation head on your own labelled pairs (fusion unchanged).

    python -m training.finetune DATA --layout msrs|fmb|mfnet|pairs [--epochs 40] [--out runs/finetune]
        [--init models/ivf_student.safetensors] [--set KEY=VALUE ...]

``DATA`` in one of the layouts of ``training/datasets.py`` (pixel labels, or ``pairs`` with YOLO ``boxes/``);
every 4th name (sorted) validates, the rest trains. The recipe is ``training/configs/segmentation.yaml`` without the
teacher, run by ``training/fit_head.py``: the checkpoint's fusion modules are frozen and its head (same
hyper-parameters) goes on learning from your labels (classes mapped by name onto background, person, bicycle,
car) on windows of ``head_fit.crop`` px (the recipe's 256; every pair must be at least that large). Writes
``OUT/best.safetensors``, usable as ``--checkpoint`` everywhere.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ivf_ros.checkpoint import read_metadata

from .fit_head import fit_head
from .train import load_config, set_entry

RECIPE = Path(__file__).resolve().parent / "configs" / "segmentation.yaml"


def finetune_config(data: str, layout: str, epochs: int, init: str) -> dict:
    cfg = load_config(RECIPE)
    root = str(Path(data).resolve())
    cfg.update(init=init, data=[{"root": root, "layout": layout, "split": "train"}],
               val={"root": root, "layout": layout, "split": "val"})
    cfg["model"] = {k: v for k, v in read_metadata(init)["hyper_parameters"].items() if k != "num_classes"}
    cfg["head_fit"] = {**cfg.get("head_fit", {}), "epochs": epochs, "fresh_head": False,
                       "val_every": max(1, min(cfg.get("head_fit", {}).get("val_every", 10), epochs))}
    cfg["segmentation_targets"] = f"the user's labels ({layout} layout, {root})"
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="dataset folder")
    ap.add_argument("--layout", default="msrs", choices=("msrs", "fmb", "mfnet", "pairs"))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", default="runs/finetune")
    ap.add_argument("--init", default="models/ivf_student.safetensors", help="checkpoint to start from")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (head_fit.crop=128)")
    args = ap.parse_args(argv)
    cfg = finetune_config(args.data, args.layout, args.epochs, args.init)
    for item in args.set:
        set_entry(cfg, item)
    print(json.dumps(fit_head(cfg, Path(args.out)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
