"""Fuse (and segment) every IR/visible pair of two folders, matched by file stem."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..backends import HEAD_PRECISIONS
from ..data import find_pairs, read_ir, read_vis
from ..imageops import IRNormalizer, write_image
from ..pipeline import FusionPipeline
from ..registration import Registration


def add_pipeline_arguments(p) -> None:
    """Options shared by every command that runs the pipeline on image folders."""
    p.add_argument("--ir", required=True, help="folder of IR images")
    p.add_argument("--vis", required=True, help="folder of visible images (same file stems)")
    p.add_argument("--checkpoint", help="model checkpoint (default: the shipped models/ivf_student.safetensors)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_head_precision_argument(p)
    p.add_argument("--homography", help="IR->visible registration YAML (from `ivf calibrate`)")
    p.add_argument("--resize", action="store_true", help="resize IR to the visible size when the sizes differ")
    p.add_argument("--ir-norm", choices=("auto", "fixed", "percentile"), default="auto",
                   help="IR normalisation: auto = full scale for 8-bit, per-image percentiles otherwise; "
                        "fixed = --ir-range; percentile = --ir-percentiles")
    p.add_argument("--ir-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="fixed mode: raw IR values mapped to black and white (default: the image dtype's full scale, "
                        "0 255 for 8-bit, 0 65535 for 16-bit)")
    p.add_argument("--ir-percentiles", nargs=2, type=float, metavar=("LOW", "HIGH"), default=(1.0, 99.0),
                   help="percentile mode: per-image percentiles mapped to black and white (default: 1 99)")


def add_head_precision_argument(p) -> None:
    p.add_argument("--head-precision", choices=HEAD_PRECISIONS, default="auto",
                   help="segmentation head on the CPU: auto = bfloat16 where the CPU has it natively (AMX, "
                        "AVX512-BF16), else float32 (default: auto)")


def make_pipeline(args) -> FusionPipeline:
    registration = Registration.load(args.homography) if args.homography else Registration()
    norm = IRNormalizer(args.ir_norm, args.ir_range, args.ir_percentiles, smoothing=0.0)  # independent images
    return FusionPipeline(args.checkpoint, args.device, ir_normalizer=norm, registration=registration,
                          head_precision=args.head_precision)


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
        write_image(str(out / f"{pair.stem}.png"), result.fused)
        if labels_out:
            write_image(str(labels_out / f"{pair.stem}.png"), result.labels)
            write_image(str(labels_out / f"{pair.stem}_color.png"), pipe.overlay(result))
    print(f"fused {len(pairs)} pairs into {out}" + (f", labels into {labels_out}" if labels_out else ""))
    return 0
