"""Per-class logit offsets for the segmentation head, chosen with the judge on the TRAINING part.

    python -m training.calibrate runs/segmentation/best.safetensors --out models/ivf_student.safetensors
    python -m training.calibrate HEAD --folds runs/fold0/best.safetensors ... --min-precision 0.8 --out OUT

The offsets are added to the head's output bias (the checkpoint format does not change; offsets a checkpoint
already carries are replaced). Coordinate ascent over the foreground classes, ``rounds`` times, maximising mean F +
person F (the training selection's segmentation term) minus ``PENALTY`` x the shortfall of each class's precision
below ``--min-precision`` (a class labelled nowhere has none), on the MSRS training pairs, never the validation
part; recorded in the metadata. The head's own logits on its training pairs are more confident than on pairs it
never saw, so offsets chosen on them overshoot; with ``--folds`` (K heads of the same recipe, head k fitted with
``hold_out: [k, K]``) each training pair is scored by the head that did not see it, and the offsets chosen on
those held-out logits are applied to ``HEAD``.
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
from .train import load_split, resolve_root

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


def without_offsets(model, meta: dict) -> list[float] | None:
    """Take the calibration offsets a checkpoint carries off its head's bias (in place); returns them (or None)."""
    offsets = meta["training"].get("head_bias_offsets", {}).get("offsets")
    if offsets:
        with torch.no_grad():
            model.seg_head.bias -= torch.tensor(offsets, dtype=model.seg_head.bias.dtype)
    return offsets


def held_out_logits(paths: list[str], samples, hyper: dict, root: str) -> list[np.ndarray]:
    """Logits of each of ``samples`` (the training split of ``root``, in order) from the fold head that did not
    see it: ``paths[k]`` must be fitted on ``root`` alone with ``hold_out: [k, len(paths)]`` and have the
    architecture ``hyper`` (offsets it carries are taken off)."""
    out = [None] * len(samples)
    for k, path in enumerate(paths):
        model, meta = load_checkpoint(path)
        without_offsets(model, meta)
        data = meta["training"].get("data", [])
        folds = [e.get("hold_out") for e in data]
        if (folds != [[k, len(paths)]] or resolve_root(data[0].get("root", "")) != resolve_root(root)
                or model.hyper_parameters() != hyper):
            raise ValueError(f"{path}: not a fold head {k} of {len(paths)} of this architecture on {root} "
                             f"(its data entries hold out {folds})")
        mine = list(range(k, len(samples), len(paths)))
        for i, logits in zip(mine, head_logits(model.eval(), [samples[i] for i in mine])):
            out[i] = logits
    return out


def score(logits, samples, classes, bias: np.ndarray) -> BoxScorer:
    scorer = BoxScorer(classes)
    b = np.asarray(bias, np.float32)[:, None, None]
    for full, s in zip(logits, samples):
        scorer.add((full + b).argmax(0).astype(np.uint8), s.boxes)  # NumPy: 50x faster than torch here
    return scorer


def calibrate(model, samples, classes, rounds: int = 1, min_precision: float = 0.0,
              logits: list[np.ndarray] | None = None) -> tuple[np.ndarray, float, float]:
    """(offsets per class, objective before, after) on ``logits`` of ``samples`` (default: ``model``'s)."""
    logits = head_logits(model.eval(), samples) if logits is None else logits
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
    ap.add_argument("--every", type=int, default=2,
                    help="use every N-th training pair (default 2: faster; with --folds all pairs)")
    ap.add_argument("--folds", nargs="+", metavar="CHECKPOINT",
                    help="K fold heads (head k fitted with hold_out [k, K]): choose on their held-out logits")
    ap.add_argument("--min-precision", type=float, default=0.0, help="precision floor per class (default none)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.folds is not None and len(args.folds) < 2:
        raise SystemExit("--folds: give K >= 2 fold heads")
    model, meta = load_checkpoint(args.checkpoint)
    previous = without_offsets(model, meta)  # new offsets replace old ones
    samples = load_split({"root": args.data, "layout": "pairs", "split": "train"}, meta["classes"])
    if args.folds:
        logits = held_out_logits(args.folds, samples, model.hyper_parameters(), args.data)
        method = (f"training/calibrate.py on the held-out logits of {len(args.folds)} fold heads "
                  f"({', '.join(args.folds)}) over all pairs of the MSRS training part")
    else:
        samples, logits = samples[::args.every], None
        method = f"training/calibrate.py on one in {args.every} pairs of the MSRS training part"
    bias, before, after = calibrate(model, samples, meta["classes"], args.rounds, args.min_precision, logits)
    with torch.no_grad():
        model.seg_head.bias += torch.from_numpy(bias).float()
    meta["training"]["head_bias_offsets"] = {"offsets": [float(v) for v in bias], "objective_train_before": before,
                                             "objective_train_after": after,
                                             "min_precision": args.min_precision, "method": method}
    if previous:
        meta["training"]["head_bias_offsets"]["replaced"] = previous
    save_checkpoint(args.out, model, meta)
    print(json.dumps(meta["training"]["head_bias_offsets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
