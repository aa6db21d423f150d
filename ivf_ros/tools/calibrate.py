"""Estimate the IR -> visible registration (homography YAML for the node) from point pairs or automatically.

With ``--points`` the mapping is fitted to the given correspondences (the reliable path for a first calibration);
without, it is estimated from the image pair(s) by cross-modal structure matching, which reports its confidence and
refuses (exit status 3) when the images share too little structure. Writes the YAML (``Registration.save``) and a
PNG overlay (checkerboard and edge overlay of the registered IR on the visible image) to judge the result.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..calibration import (MODELS, AutoConfig, CalibrationError, calibrate_auto, calibrate_from_points,
                           content_mask, edge_alignment, read_points_csv, to_gray, write_overlay)
from ..data import IMAGE_SUFFIXES, find_pairs, read_ir, read_vis
from ..registration import Registration

EXIT_REFUSED = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ir", required=True, help="IR image, or a folder of IR frames (paired with --vis by file stem)")
    p.add_argument("--vis", required=True, help="visible image, or a folder of visible frames")
    p.add_argument("--out", required=True, help="YAML file to write (the node's registration.file)")
    p.add_argument("--points", help="CSV of point pairs 'ir_x,ir_y,vis_x,vis_y' in full-resolution pixels "
                                    "(header row allowed); without it the mapping is estimated automatically")
    p.add_argument("--model", choices=MODELS, default="homography", help="mapping model (default homography)")
    p.add_argument("--overlay", help="overlay PNG to write (default: beside --out, <name>_overlay.png)")
    p.add_argument("--max-pairs", type=int, default=6,
                   help="automatic mode: use at most this many frame pairs, evenly spread (default 6)")
    p.add_argument("--scale-range", type=float, nargs=2, metavar=("LO", "HI"), default=(0.55, 1.8),
                   help="automatic mode: IR->visible scale searched, relative to fitting the IR frame into the "
                        "visible frame (default 0.55 1.8)")
    p.add_argument("--min-confidence", type=float, default=AutoConfig.min_confidence,
                   help=f"automatic mode: refuse below this confidence (default {AutoConfig.min_confidence})")
    p.add_argument("--ransac-px", type=float, default=3.0, help="points mode: RANSAC outlier threshold in visible "
                                                                 "pixels, 0 = plain least squares (default 3)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the search's progress")


def _inputs(ir: str, vis: str) -> list[tuple[str, Path, Path]]:
    ir_p, vis_p = Path(ir), Path(vis)
    if ir_p.is_dir() != vis_p.is_dir():
        raise ValueError("--ir and --vis must both be images or both be folders")
    if ir_p.is_dir():
        return [(p.stem, p.ir, p.vis) for p in find_pairs(ir_p, vis_p, allow_unmatched=True)]
    for p in (ir_p, vis_p):
        if not p.is_file():
            raise ValueError(f"{p}: no such image")
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{p}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
    return [(ir_p.stem, ir_p, vis_p)]


def _spread(items: list, n: int) -> list:
    if n <= 0 or len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx))]


def run(args: argparse.Namespace) -> int:
    entries = _inputs(args.ir, args.vis)
    out = Path(args.out)
    overlay = Path(args.overlay) if args.overlay else out.with_name(out.stem + "_overlay.png")
    log = print if args.verbose else None
    ir0, vis0 = read_ir(entries[0][1]), read_vis(entries[0][2])
    try:
        if args.points:
            ir_pts, vis_pts = read_points_csv(args.points)
            reg, info = calibrate_from_points(ir_pts, vis_pts, (ir0.shape[1], ir0.shape[0]),
                                              (vis0.shape[1], vis0.shape[0]), args.model,
                                              args.ransac_px if args.ransac_px > 0 else None)
            print(f"{info['points']} point pairs, {info['inliers']} used, RMS residual {info['residual_px']:.3f} px")
        else:
            chosen = [(entries[0][0], ir0, vis0)]
            for stem, ir_path, vis_path in _spread(entries, args.max_pairs)[1:]:
                ir, vis = read_ir(ir_path), read_vis(vis_path)
                if ir.shape[:2] != ir0.shape[:2] or vis.shape[:2] != vis0.shape[:2]:
                    print(f"skipping {stem}: sizes differ from {entries[0][0]} (one rig, one size)", file=sys.stderr)
                    continue
                chosen.append((stem, ir, vis))
            cfg = AutoConfig(model=args.model, scale_range=tuple(args.scale_range),
                             min_confidence=args.min_confidence)
            reg, info = calibrate_auto([(ir, vis) for _, ir, vis in chosen], cfg, verbose=log)
            print(f"{len(chosen)} pair(s): {info['inliers']} of {info['matches']} patch matches consistent "
                  f"({info['inlier_ratio']:.0%}), refined on the whole frame (a nudged start lands "
                  f"{info['spread_px']:.1f} px away), verified over {info['coverage']:.0%} of the frame: "
                  f"confidence {info['confidence']:.2f}")
    except CalibrationError as exc:
        print(f"ivf calibrate: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    out.parent.mkdir(parents=True, exist_ok=True)
    reg.save(out)
    Registration.load(out)  # what the node will read
    write_overlay(overlay, ir0, vis0, reg)
    g = to_gray(ir0)
    before = edge_alignment(Registration().apply(g, vis0.shape[:2]), vis0,
                            Registration().apply(content_mask(g).astype(np.float32), vis0.shape[:2]) > 0.5)
    after = edge_alignment(reg.apply(g, vis0.shape[:2]), vis0,
                           reg.apply(content_mask(g).astype(np.float32), vis0.shape[:2]) > 0.5)
    np.set_printoptions(precision=6, suppress=True)
    print(f"method {reg.method}; IR {reg.ir_size[0]}x{reg.ir_size[1]} -> visible {reg.vis_size[0]}x{reg.vis_size[1]}")
    print(f"homography:\n{reg.matrix}")
    print(f"edge alignment on {entries[0][0]}: {before:.3f} (plain resize) -> {after:.3f} (registered)")
    print(f"wrote {out} and {overlay}")
    return 0
