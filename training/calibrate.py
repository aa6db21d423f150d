"""Per-class logit offsets for the segmentation head, chosen with the judge on the TRAINING part.

    python -m training.calibrate runs/segmentation/best.safetensors --out models/ivf_student.safetensors

The offsets are added to the head's output bias (the checkpoint format does not change). Coordinate ascent over
the foreground classes, ``rounds`` times, maximising mean F + person F (the training selection's segmentation
term) minus ``PENALTY`` x the shortfall of each class's precision below ``--min-precision`` (a class labelled
nowhere has none), on the MSRS training pairs, never the validation part; recorded in the metadata.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ivf_ros.checkpoint import load_checkpoint, save_checkpoint
from ivf_ros.metrics import BoxScorer

from .datasets import to_tensors
from .train import load_split

OFFSETS = tuple(np.arange(-3.0, 3.01, 0.5))
PENALTY = 4.0  # per unit of precision below the floor: outweighs any F it buys


def objective(scorer: BoxScorer, min_precision: float = 0.0) -> float:
    """Mean F + person F, less ``PENALTY`` x each labelled class's precision shortfall below ``min_precision``."""
    summary = scorer.summary()
    short = sum(max(0.0, min_precision - summary[name]["px_precision"])
                for c, name in enumerate(scorer.classes[1:], start=1) if scorer.judge_counts[c, 0])
    return scorer.mean_f() + summary["person"]["f"] - PENALTY * short


@torch.no_grad()
def head_logits(model, samples) -> list[np.ndarray]:
    """C x H x W logits of every sample as served: the head's, upsampled bilinearly to the input size (an offset
    added before or after the upsampling gives the same logits)."""
    out = []
    for s in tqdm(samples, desc="logits", leave=False):
        ir, vis_y, ycc = to_tensors(s.ir, s.vis)
        small = model.forward_with_head(ir[None], vis_y[None], ycc[None, 1:])[2]
        out.append(F.interpolate(small, size=s.ir.shape[:2], mode="bilinear", align_corners=False)[0].numpy())
    return out


def score(logits, samples, classes, bias: np.ndarray) -> BoxScorer:
    scorer = BoxScorer(classes)
    b = np.asarray(bias, np.float32)[:, None, None]
    for full, s in zip(logits, samples):
        scorer.add((full + b).argmax(0).astype(np.uint8), s.boxes)  # NumPy: 50x faster than torch here
    return scorer


def calibrate(model, samples, classes, rounds: int = 1, min_precision: float = 0.0) -> tuple[np.ndarray, float, float]:
    """(offsets per class, objective before, after)."""
    logits = head_logits(model.eval(), samples)
    bias = np.zeros(len(classes))
    before = best = objective(score(logits, samples, classes, bias), min_precision)
    for _ in range(rounds):
        for c in range(1, len(classes)):
            for value in OFFSETS:
                trial = bias.copy()
                trial[c] = value
                v = objective(score(logits, samples, classes, trial), min_precision)
                if v > best + 1e-9:
                    best, bias = v, trial
    return bias, before, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="msrs", help="pairs with boxes/ (default msrs under the data root)")
    ap.add_argument("--every", type=int, default=2, help="use every N-th training pair (default 2: faster)")
    ap.add_argument("--min-precision", type=float, default=0.0, help="precision floor per class (default none)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    samples = load_split({"root": args.data, "layout": "pairs", "split": "train"}, meta["classes"])[::args.every]
    bias, before, after = calibrate(model, samples, meta["classes"], args.rounds, args.min_precision)
    with torch.no_grad():
        model.seg_head.bias += torch.from_numpy(bias).float()
    meta["training"]["head_bias_offsets"] = {"offsets": [float(v) for v in bias], "objective_train_before": before,
                                             "objective_train_after": after,
                                             "min_precision": args.min_precision,
                                             "method": f"training/calibrate.py on one in {args.every} pairs of the "
                                                       "MSRS training part"}
    save_checkpoint(args.out, model, meta)
    print(json.dumps(meta["training"]["head_bias_offsets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
