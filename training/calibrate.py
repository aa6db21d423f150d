"""Per-class logit offsets for the segmentation head, chosen with the judge on the TRAINING part.

    python -m training.calibrate runs/segmentation/best.safetensors --out models/ivf_student.safetensors

The offsets are added to the head's output bias (the checkpoint format does not change). Coordinate ascent over
the foreground classes, ``rounds`` times, maximising mean F + person F (the training selection's segmentation
term) on the MSRS training pairs, never the validation part; recorded in the metadata.
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

OFFSETS = tuple(np.arange(-2.0, 2.01, 0.5))


def objective(scorer: BoxScorer) -> float:
    return scorer.mean_f() + scorer.summary()["person"]["f"]


@torch.no_grad()
def head_logits(model, samples) -> list[torch.Tensor]:
    """Logits at the head's resolution of every sample."""
    out = []
    for s in tqdm(samples, desc="logits", leave=False):
        ir, vis_y, _ = to_tensors(s.ir, s.vis)
        out.append(model.forward_with_head(ir[None], vis_y[None])[2])
    return out


def score(logits, samples, classes, bias: np.ndarray) -> BoxScorer:
    scorer = BoxScorer(classes)
    b = torch.from_numpy(bias).float().view(1, -1, 1, 1)
    for small, s in zip(logits, samples):
        full = F.interpolate(small + b, size=s.ir.shape[:2], mode="bilinear", align_corners=False)
        scorer.add(full[0].numpy().argmax(0).astype(np.uint8), s.boxes)  # NumPy: 50x faster here
    return scorer


def calibrate(model, samples, classes, rounds: int = 1) -> tuple[np.ndarray, float, float]:
    """(offsets per class, objective before, after)."""
    logits = head_logits(model.eval(), samples)
    bias = np.zeros(len(classes))
    before = best = objective(score(logits, samples, classes, bias))
    for _ in range(rounds):
        for c in range(1, len(classes)):
            for value in OFFSETS:
                trial = bias.copy()
                trial[c] = value
                v = objective(score(logits, samples, classes, trial))
                if v > best + 1e-9:
                    best, bias = v, trial
    return bias, before, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="msrs", help="pairs with boxes/ (default msrs under the data root)")
    ap.add_argument("--every", type=int, default=2, help="use every N-th training pair (default 2: faster)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    samples = load_split({"root": args.data, "layout": "pairs", "split": "train"}, meta["classes"])[::args.every]
    bias, before, after = calibrate(model, samples, meta["classes"])
    with torch.no_grad():
        model.seg_head.bias += torch.from_numpy(bias).float()
    meta["training"]["head_bias_offsets"] = {"offsets": [float(v) for v in bias], "objective_train_before": before,
                                             "objective_train_after": after,
                                             "method": f"training/calibrate.py on one in {args.every} pairs of the "
                                                       "MSRS training part"}
    save_checkpoint(args.out, model, meta)
    print(json.dumps(meta["training"]["head_bias_offsets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
