"""The segmentation table of the README: the judge on the MSRS validation part for the MFNet teacher, student
checkpoints and the trivial "hottest 3% of IR pixels = person" rule, with milliseconds per pair.

    python -m training.seg_compare --checkpoint new=models/ivf_student.safetensors \
        --checkpoint previous=runs/previous.safetensors [--threads 2] [--json runs/seg_compare.json]

Checkpoints run through the whole pipeline (``FusionPipeline``: fuse + segment, ms per pair measured there); the
teacher runs at full resolution (network only).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ivf_ros.metrics import BoxScorer
from ivf_ros.pipeline import FusionPipeline

from .datasets import CLASSES
from .label_cache import class_probs
from .mfnet import load_mfnet, teacher_logits
from .train import load_split


def hottest_ir(ir: np.ndarray, share: float = 0.03) -> np.ndarray:
    """The trivial rule: the hottest ``share`` of the IR pixels are person (label 1), the rest background."""
    return (ir >= np.quantile(ir, 1 - share)).astype(np.uint8)


def compare(checkpoints: dict[str, str], split: str = "val", teacher: bool = True) -> dict:
    samples = load_split({"root": "msrs", "layout": "pairs", "split": split}, CLASSES)
    methods = {name: FusionPipeline(path, device="cpu") for name, path in checkpoints.items()}
    if teacher:
        mfnet = load_mfnet()
        methods["MFNet teacher"] = lambda ir, vis: class_probs(teacher_logits(mfnet, ir, vis), CLASSES
                                                               ).numpy().argmax(0).astype(np.uint8)
    methods["hottest 3% IR = person"] = lambda ir, vis: hottest_ir(ir)
    scorers = {name: BoxScorer(CLASSES) for name in methods}
    times = {name: [] for name in methods}
    for i, s in enumerate(samples):
        ir, vis, boxes = s.ir, s.vis, s.boxes
        for name, method in methods.items():
            start = time.perf_counter()
            out = method(ir, vis)
            elapsed = 1000 * (time.perf_counter() - start)
            if i:  # the first pair warms up
                times[name].append(elapsed)
            scorers[name].add(out.labels if hasattr(out, "labels") else out, boxes)
    result = {}
    for name, scorer in scorers.items():
        s = scorer.summary()
        result[name] = {"ms_per_pair": float(np.median(times[name])), "mean_f": scorer.mean_f(),
                        **{c: {k: s[c][k] for k in ("px_precision", "box_recall", "f", "false_ppm")}
                           for c in CLASSES[1:]}}
    return {"pairs": len(samples), "split": split, "methods": result}


def markdown(res: dict) -> str:
    lines = ["| method | " + " | ".join(f"{c} P / R / F" for c in CLASSES[1:]) + " | mean F | ms per pair |",
             "| --- |" + " ---: |" * (len(CLASSES) + 1)]
    for name, r in res["methods"].items():
        lines.append(f"| {name} | " + " | ".join(
            "{px_precision:.2f} / {box_recall:.2f} / {f:.3f}".format(**r[c]) for c in CLASSES[1:])
            + f" | {r['mean_f']:.3f} | {r['ms_per_pair']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--split", default="val", choices=("val", "train"))
    ap.add_argument("--no-teacher", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    res = compare(checkpoints, args.split, not args.no_teacher)
    print(f"{res['pairs']} MSRS {args.split} pairs\n\n" + markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
