"""Fusion metrics (model vs average vs max fusion) and segmentation box scores on folders of pairs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data import find_pairs, msrs_split, read_yolo_boxes
from ..imageops import gray_u8
from ..metrics import FUSION_METRICS, JUDGE_GROW, JUDGE_HIT_SHARE, TRIVIAL_FUSIONS, BoxScorer, fusion_metrics, to_gray
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
    sums = {name: dict.fromkeys(FUSION_METRICS, 0.0) for name in ("model", *TRIVIAL_FUSIONS)}
    scorer = BoxScorer(pipe.classes)
    times = []
    for i, pair in enumerate(tqdm(pairs, desc="eval", unit="pair")):
        ir_raw, vis = read_checked_pair(pair, args)
        start = time.perf_counter()
        result = pipe(ir_raw, vis)
        elapsed = time.perf_counter() - start
        if i:  # the first pair includes warm-up
            times.append(elapsed)
        ir = gray_u8(result.ir_registered).astype(np.float64)  # 8-bit IR, as training validation scores it
        vis_g = to_gray(vis)
        fused = {"model": to_gray(result.fused)}
        fused.update({name: f(ir, vis_g) for name, f in TRIVIAL_FUSIONS.items()})
        for name, f in fused.items():
            for k, v in fusion_metrics(ir, vis_g, f).items():
                sums[name][k] += v
        if args.boxes:
            h, w = result.labels.shape
            scorer.add(result.labels, read_yolo_boxes(Path(args.boxes) / f"{pair.stem}.txt", w, h))
    report = {
        "pairs": len(pairs),
        "checkpoint": str(args.checkpoint or "shipped"),
        "parameters": count_parameters(pipe.model),
        "device": str(pipe.device),
        "ms_per_pair_median": 1000.0 * float(np.median(times)) if times else None,
        "fusion": {name: {k: v / len(pairs) for k, v in s.items()} for name, s in sums.items()},
    }
    if args.boxes:
        report["segmentation"] = scorer.report()
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
    report = evaluate(args)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
