"""Fusion metrics (model vs average vs max fusion) and segmentation box scores on folders of pairs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..data import find_pairs, msrs_split, read_yolo_boxes
from ..evaluation import Scored
from ..evaluation import evaluate as evaluate_pairs
from ..imageops import gray_u8
from ..metrics import FUSION_METRICS, JUDGE_GROW, JUDGE_HIT_SHARE
from ..model import count_parameters
from .fuse import add_pipeline_arguments, make_pipeline, read_checked_pair

def add_arguments(p) -> None:
    add_pipeline_arguments(p)
    p.add_argument("--boxes", help="folder of YOLO box files <stem>.txt (classes person, bicycle, car)")
    p.add_argument("--split", choices=("all", "val", "train"), default="all",
                   help="MSRS-style split of the sorted stems: val = every 4th name (4th, 8th, ...)")
    p.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    p.add_argument("--json", help="write all numbers to this JSON file")


def evaluate(args) -> dict:
    pairs = find_pairs(args.ir, args.vis)
    if args.split != "all":
        train, val = msrs_split([p.stem for p in pairs])
        keep = set(val if args.split == "val" else train)
        pairs = [p for p in pairs if p.stem in keep]
    pairs = pairs[: args.limit] if args.limit else pairs
    pipe = make_pipeline(args)
    times = []

    def score(pair) -> Scored:
        ir, vis = read_checked_pair(pair, args)
        start = time.perf_counter()
        result = pipe(ir, vis)
        times.append(time.perf_counter() - start)
        h, w = result.labels.shape
        boxes = read_yolo_boxes(Path(args.boxes) / f"{pair.stem}.txt", w, h) if args.boxes else None
        return Scored(gray_u8(result.ir_registered), vis, {"model": result.fused}, {"model": result.labels}, boxes)

    evaluation = evaluate_pairs(pairs, score, ["model"], pipe.classes)
    report = {
        "pairs": len(pairs),
        "checkpoint": str(args.checkpoint or "shipped"),
        "parameters": count_parameters(pipe.model),
        "device": f"{pipe.device} ({pipe.precision})",
        "ms_per_pair_median": 1000.0 * float(np.median(times[1:])) if times[1:] else None,  # the first warms up
        "fusion": evaluation.fusion(),
    }
    if args.boxes:
        report["segmentation"] = evaluation.segmentation("model")
    return report


def format_report(report: dict) -> str:
    cols = FUSION_METRICS
    lines = [f"{report['pairs']} pairs, {report['parameters']} parameters, {report['device']}, "
             f"{report['ms_per_pair_median'] or float('nan'):.1f} ms per pair (median, full pipeline)", "",
             "| fusion | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, values in report["fusion"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" for c in cols) + " |")
    if "segmentation" in report:
        lines += ["", "| class | precision | recall | F1 | box coverage | TP | FP | FN |", "|---" * 8 + "|"]
        for cls, s in report["segmentation"]["classes"].items():
            lines.append(f"| {cls} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
                         f"{s['coverage']:.3f} | {s['tp']} | {s['fp']} | {s['fn']} |")
        lines += ["", f"Judge (pixels inside boxes grown by {JUDGE_GROW} px, boxes >= {JUDGE_HIT_SHARE:.0%} "
                  f"labelled): mean F {report['segmentation']['mean_f']:.3f}", "",
                  "| class | pixel precision | box recall | F | false area per million |", "|---" * 5 + "|"]
        for cls, s in report["segmentation"]["classes"].items():
            lines.append(f"| {cls} | {s['px_precision']:.3f} | {s['box_recall']:.3f} | {s['f']:.3f} | "
                         f"{s['false_ppm']:.0f} |")
    return "\n".join(lines)


def run(args) -> int:
    if args.json:  # fail before the evaluation, not after it
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    report = evaluate(args)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
