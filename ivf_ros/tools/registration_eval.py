"""Evaluate automatic IR -> visible registration on the shared data (misaligned/* and roadscene_unregistered).

misaligned/msrs and misaligned/roadscene: the mapping is estimated between ``ir_warp`` (the aligned IR under a known
non-rigid deformation) and the visible image, applied to ``ir_warp``, and compared with the aligned ``ir``: mean
absolute error (gray levels, whole frame) before and after, and the edge-alignment score against the visible image.
roadscene_unregistered: raw 640x512 IR against the high-resolution visible frame; edge-alignment score of a plain
resize versus the estimated mapping, and overlay pictures to judge by eye. Writes results.json, results.csv,
table.md and overlays/ under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import cv2
import numpy as np

from ..calibration import (MODELS, AutoConfig, CalibrationError, calibrate_auto, content_mask, edge_alignment,
                           to_gray, write_overlay)
from ..data import data_root, find_pairs, read_ir, read_vis
from ..imageops import write_image
from ..registration import Registration

DATASETS = ("msrs", "roadscene", "unregistered")
DOCS_PAIRS = ("unregistered:FLIR_00122", "unregistered:FLIR_03909", "msrs:00055D", "roadscene:19")
DOCS_WIDTH = 760


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="shared data folder (default: $IVF_DATA or ../shared/data)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--limit", type=int, default=0, help="at most this many pairs per dataset (0 = all)")
    p.add_argument("--model", choices=MODELS, default="homography")
    p.add_argument("--overlays", type=int, default=6,
                   help="write overlay PNGs for this many pairs per dataset (-1 = all; default 6)")
    p.add_argument("--out", default="out/registration_eval", help="output folder")
    p.add_argument("--docs", help="also write small overlay pictures for the README into this folder "
                                   "(registration_<dataset>_<pair>.png, downscaled)")
    p.add_argument("--docs-pairs", nargs="+", default=list(DOCS_PAIRS), metavar="DATASET:PAIR",
                   help="pairs pictured with --docs (default: %(default)s)")


def _edge(img: np.ndarray, vis: np.ndarray, valid: np.ndarray) -> float:
    return edge_alignment(img, vis, valid)


def _apply(reg: Registration, ir: np.ndarray, vis_shape) -> tuple[np.ndarray, np.ndarray]:
    g = to_gray(ir)
    return reg.apply(g, vis_shape[:2]), reg.apply(content_mask(g).astype(np.float32), vis_shape[:2]) > 0.5


def _register(ir, vis, model):
    t = time.perf_counter()
    try:
        reg, info = calibrate_auto([(ir, vis)], AutoConfig(model=model))
        return reg, info, None, time.perf_counter() - t
    except CalibrationError as exc:
        return None, {}, str(exc), time.perf_counter() - t


def eval_misaligned(root: Path, name: str, args, out: Path) -> list[dict]:
    base = root / "misaligned" / name
    warped = {p.stem: p for p in (base / "ir_warp").iterdir()}
    pairs = [p for p in find_pairs(base / "ir", base / "vi") if p.stem in warped]
    if args.limit:
        pairs = pairs[: args.limit]
    rows = []
    for k, p in enumerate(pairs):
        ir = to_gray(read_ir(p.ir)) * 255.0
        iw = read_ir(warped[p.stem])
        vis = read_vis(p.vis)
        before, valid0 = _apply(Registration(), iw, vis.shape)
        reg, info, refused, secs = _register(iw, vis, args.model)
        after, valid1 = _apply(reg, iw, vis.shape) if reg else (before, valid0)
        row = {"dataset": f"misaligned/{name}", "pair": p.stem, "refused": refused,
               "mae_before": float(np.abs(before * 255.0 - ir).mean()),
               "mae_after": float(np.abs(after * 255.0 - ir).mean()),
               "edge_before": _edge(before, vis, valid0), "edge_after": _edge(after, vis, valid1),
               "confidence": info.get("confidence"), "seconds": secs}
        rows.append(row)
        print(f"{row['dataset']} {p.stem}: MAE {row['mae_before']:.2f} -> {row['mae_after']:.2f}, edge "
              f"{row['edge_before']:.3f} -> {row['edge_after']:.3f}" + (" REFUSED" if refused else ""), flush=True)
        if reg is not None and (args.overlays < 0 or k < args.overlays):
            write_overlay(out / "overlays" / f"misaligned_{name}_{p.stem}.png", iw, vis, reg, max_width=1200)
    return rows


def eval_unregistered(root: Path, args, out: Path) -> list[dict]:
    base = root / "roadscene_unregistered"
    pairs = find_pairs(base / "ir_raw", base / "vi_hr")
    if args.limit:
        pairs = pairs[: args.limit]
    rows = []
    for k, p in enumerate(pairs):
        ir, vis = read_ir(p.ir), read_vis(p.vis)
        before, valid0 = _apply(Registration(), ir, vis.shape)
        reg, info, refused, secs = _register(ir, vis, args.model)
        row = {"dataset": "roadscene_unregistered", "pair": p.stem, "refused": refused,
               "edge_before": _edge(before, vis, valid0), "confidence": info.get("confidence"), "seconds": secs}
        if reg is not None:
            after, valid1 = _apply(reg, ir, vis.shape)
            row["edge_after"] = _edge(after, vis, valid1)
            row["scale"] = float(np.sqrt(abs(np.linalg.det(reg.matrix[:2, :2]))))
            if args.overlays < 0 or k < args.overlays:
                write_overlay(out / "overlays" / f"unregistered_{p.stem}.png", ir, vis, reg, max_width=1200)
        else:
            row["edge_after"] = row["edge_before"]
        rows.append(row)
        print(f"{row['dataset']} {p.stem}: edge {row['edge_before']:.3f} -> {row['edge_after']:.3f}"
              + (" REFUSED" if refused else f" (confidence {row['confidence']:.2f})"), flush=True)
    return rows


def _label(img: np.ndarray, text: str) -> np.ndarray:
    img = img.copy()
    cv2.putText(img, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(img, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def _small_png(path: Path, img: np.ndarray) -> None:
    """Downscale to DOCS_WIDTH and keep 5 bits per channel so the PNG stays small."""
    img = cv2.resize(img, (DOCS_WIDTH, round(img.shape[0] * DOCS_WIDTH / img.shape[1])), interpolation=cv2.INTER_AREA)
    img = (img & 0xF8) | 0x04
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, img, (cv2.IMWRITE_PNG_COMPRESSION, 9))


def docs_pictures(root: Path, specs: list[str], folder: Path, model: str) -> list[Path]:
    """README pictures: unregistered frames (checkerboard | edges), misaligned pairs before/after (edges)."""
    from ..calibration import render_overlay
    written = []
    for spec in specs:
        ds, _, stem = spec.partition(":")
        if ds == "unregistered":
            base = root / "roadscene_unregistered"
            ir, vis = read_ir(next((base / "ir_raw").glob(stem + ".*"))), read_vis(next((base / "vi_hr").glob(stem + ".*")))
        else:
            base = root / "misaligned" / ds
            ir, vis = read_ir(next((base / "ir_warp").glob(stem + ".*"))), read_vis(next((base / "vi").glob(stem + ".*")))
        reg, _, refused, _ = _register(ir, vis, model)
        if reg is None:
            print(f"docs picture {spec}: registration refused ({refused})")
            continue
        if ds == "unregistered":
            img = _label(render_overlay(ir, vis, reg, max_width=4000), f"{stem}: registered IR on visible")
        else:
            h, w = vis.shape[:2]
            ident = Registration(np.eye(3), (ir.shape[1], ir.shape[0]), (w, h))
            before = render_overlay(ir, vis, ident, max_width=4000)[:, -w:]
            after = render_overlay(ir, vis, reg, max_width=4000)[:, -w:]
            sep = np.full((h, 6, 3), 255, np.uint8)
            img = np.hstack([_label(before, "ir_warp as is"), sep, _label(after, "registered")])
        path = folder / f"registration_{ds}_{stem}.png"
        _small_png(path, img)
        written.append(path)
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return written


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds]
        s = {"dataset": ds, "pairs": len(rs), "refused": sum(bool(r["refused"]) for r in rs),
             "edge_before": float(np.mean([r["edge_before"] for r in rs])),
             "edge_after": float(np.mean([r["edge_after"] for r in rs])),
             "edge_improved": sum(r["edge_after"] > r["edge_before"] for r in rs),
             "seconds_per_pair": float(np.mean([r["seconds"] for r in rs]))}
        if "mae_before" in rs[0]:
            s.update(mae_before=float(np.mean([r["mae_before"] for r in rs])),
                     mae_after=float(np.mean([r["mae_after"] for r in rs])),
                     mae_improved=sum(r["mae_after"] < r["mae_before"] for r in rs))
        out.append(s)
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| dataset | pairs | refused | MAE to aligned IR before -> after | MAE improved | "
             "edge score before -> after | edge improved |",
             "| --- | ---: | ---: | --- | ---: | --- | ---: |"]
    for s in summary:
        mae = (f"{s['mae_before']:.2f} -> {s['mae_after']:.2f}" if "mae_before" in s else "n/a (no ground truth)")
        imp = (f"{s['mae_improved']}/{s['pairs']} ({100 * s['mae_improved'] / s['pairs']:.0f}%)"
               if "mae_before" in s else "-")
        lines.append(f"| {s['dataset']} | {s['pairs']} | {s['refused']} | {mae} | {imp} | "
                     f"{s['edge_before']:.3f} -> {s['edge_after']:.3f} | {s['edge_improved']}/{s['pairs']} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    root = Path(args.data) if args.data else data_root()
    if not root.is_dir():
        raise ValueError(f"{root}: no data folder (set --data or IVF_DATA)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for ds in args.datasets:
        rows += eval_unregistered(root, args, out) if ds == "unregistered" else eval_misaligned(root, ds, args, out)
    summary = summarize(rows)
    (out / "results.json").write_text(json.dumps({"summary": summary, "pairs": rows}, indent=1))
    keys = sorted({k for r in rows for k in r})
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    table = markdown(summary)
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out}/results.json, results.csv, table.md, overlays/")
    if args.docs:
        docs_pictures(root, args.docs_pairs, Path(args.docs), args.model)
    return 0
