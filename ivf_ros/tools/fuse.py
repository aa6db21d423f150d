"""Fuse (and segment) every IR/visible pair of two folders, matched by file stem."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
from tqdm import tqdm

from ..data import find_pairs, read_ir, read_vis
from ..imageops import IRNormalizer
from ..pipeline import FusionPipeline
from ..registration import Registration


def add_pipeline_arguments(p) -> None:
    """Options shared by every command that runs the pipeline on image folders."""
    p.add_argument("--ir", required=True, help="folder of IR images")
    p.add_argument("--vis", required=True, help="folder of visible images (same file stems)")
    p.add_argument("--checkpoint", help="model checkpoint (default: the shipped models/ivf_student.safetensors)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--homography", help="IR->visible registration YAML (from `ivf calibrate`)")
    p.add_argument("--resize", action="store_true", help="resize IR to the visible size when the sizes differ")
    p.add_argument("--ir-norm", choices=("auto", "fixed", "percentile"), default="auto",
                   help="IR normalisation: auto = full scale for 8-bit, per-image percentiles otherwise")


def make_pipeline(args) -> FusionPipeline:
    registration = Registration.load(args.homography) if args.homography else Registration()
    norm = IRNormalizer(args.ir_norm, smoothing=0.0)  # independent images: no temporal smoothing
    return FusionPipeline(args.checkpoint, args.device, ir_normalizer=norm, registration=registration)


def read_checked_pair(pair, args):
    """Read a pair; sizes must agree unless registration or resizing was asked for."""
    ir, vis = read_ir(pair.ir), read_vis(pair.vis)
    if ir.shape[:2] != vis.shape[:2] and not (args.homography or args.resize):
        raise ValueError(f"pair '{pair.stem}': IR is {ir.shape[1]}x{ir.shape[0]} but visible is "
                         f"{vis.shape[1]}x{vis.shape[0]} (pass --homography YAML or --resize)")
    return ir, vis


def add_arguments(p) -> None:
    add_pipeline_arguments(p)
    p.add_argument("--out", required=True, help="folder for the fused images (<stem>.png)")
    p.add_argument("--labels-out", help="folder for label maps <stem>.png, overlays <stem>_color.png, classes.json")


def run(args) -> int:
    pairs = find_pairs(args.ir, args.vis)
    pipe = make_pipeline(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels_out = Path(args.labels_out) if args.labels_out else None
    if labels_out:
        labels_out.mkdir(parents=True, exist_ok=True)
        (labels_out / "classes.json").write_text(json.dumps(pipe.classes) + "\n")
    for pair in tqdm(pairs, desc="fuse", unit="pair"):
        result = pipe(*read_checked_pair(pair, args))
        cv2.imwrite(str(out / f"{pair.stem}.png"), result.fused)
        if labels_out:
            cv2.imwrite(str(labels_out / f"{pair.stem}.png"), result.labels)
            cv2.imwrite(str(labels_out / f"{pair.stem}_color.png"), pipe.overlay(result))
    print(f"fused {len(pairs)} pairs into {out}" + (f", labels into {labels_out}" if labels_out else ""))
    return 0
