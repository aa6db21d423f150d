"""Evaluate automatic IR -> visible registration on the shared data (misaligned/* and roadscene_unregistered).

misaligned/msrs and misaligned/roadscene: the mapping is estimated between ``ir_warp`` (the aligned IR under a known
non-rigid deformation) and the visible image, applied to ``ir_warp``, and compared with the aligned ``ir``: mean
absolute error (gray levels, whole frame) before and after, and the edge-alignment score against the visible image.
roadscene_unregistered: raw 640x512 IR against the high-resolution visible frame; edge-alignment score of a plain
resize versus the estimated mapping, and overlay pictures to judge by eye. Writes results.json, results.csv,
table.md and overlays/ under --out.

--synthetic DIR...: the known-answer evaluation. Each IR image of a folder of aligned pairs (``ir/`` and ``vi/``) is
warped by random realistic homographies (fixed seed) and registered back; the recovered IR -> visible mapping is
scored by its distance from the true one over a 16-px grid of the whole visible frame (mean and max per answer).
Writes synthetic.json, synthetic.csv, synthetic.md (and synthetic.png with --plot) under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

from ..calibration import (MODELS, AutoConfig, CalibrationError, calibrate_auto, confidence_score, content_mask,
                           edge_alignment, grid_error, project, to_gray, write_overlay)
from ..data import data_root, find_pairs, read_ir, read_vis
from ..imageops import write_image
from ..metrics import entropy
from ..registration import Registration

DATASETS = ("msrs", "roadscene", "unregistered")
DOCS_PAIRS = ("unregistered:FLIR_00122", "unregistered:FLIR_03909", "msrs:00055D", "roadscene:19",
              "aligned-msrs:00186D", "aligned-roadscene:FLIR_04412")
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
    p.add_argument("--synthetic", nargs="+", metavar="DIR",
                   help="known-answer evaluation on these folders of aligned pairs (ir/ and vi/ inside) instead")
    p.add_argument("--per-pair", type=int, default=2,
                   help="synthetic: random homographies per pair (default 2; 0 with --self-reference: only the "
                        "pairs' references, logged to be joined to another run's log by --rescore)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed (default 0)")
    p.add_argument("--reference", nargs="+", metavar="YAML",
                   help="synthetic: per folder, the registration of its aligned IR to its visible images ('-' = "
                        "identity, the default): the true mapping is this after undoing the random warp")
    p.add_argument("--self-reference", action="store_true",
                   help="synthetic: also score the answers against each unwarped pair's own registration (the "
                        "method's consistency, free of the data set's own misalignment; none where ivf calibrate would "
                        "refuse it) and against its mutual-information registration (a reference found "
                        "independently of the method)")
    p.add_argument("--pairs", nargs="+", metavar="PAIR",
                   help="synthetic: only these pairs (file stems, or FOLDER:STEM); they get the same warps as in a "
                        "full run")
    p.add_argument("--jobs", type=int, default=1, help="synthetic: worker processes (default 1)")
    p.add_argument("--rescore", metavar="JSONL",
                   help="synthetic: recompute confidence and refusals of a logged run (synthetic.jsonl, or several "
                        "concatenated: a --per-pair 0 --self-reference log adds the references) with the current "
                        "confidence function and write the tables to --out")
    p.add_argument("--plot", action="store_true", help="synthetic: also write synthetic.png (error vs confidence)")


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
    """README pictures: unregistered frames (checkerboard | edges), misaligned pairs and pairs of the aligned data
    sets (``aligned-msrs:STEM``) before/after (edges)."""
    from ..calibration import render_overlay
    written = []
    for spec in specs:
        ds, _, stem = spec.partition(":")
        if ds == "unregistered":
            ir_dir, vis_dir = root / "roadscene_unregistered" / "ir_raw", root / "roadscene_unregistered" / "vi_hr"
        elif ds.startswith("aligned-"):  # a pair of an aligned data set, as the data set aligned it
            ir_dir, vis_dir = root / ds[len("aligned-"):] / "ir", root / ds[len("aligned-"):] / "vi"
        else:
            ir_dir, vis_dir = root / "misaligned" / ds / "ir_warp", root / "misaligned" / ds / "vi"
        ir, vis = read_ir(next(ir_dir.glob(stem + ".*"))), read_vis(next(vis_dir.glob(stem + ".*")))
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
            first = "as the data set aligned it" if ds.startswith("aligned-") else "ir_warp as is"
            img = np.hstack([_label(before, first), sep, _label(after, "registered")])
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
    if args.rescore:
        rows = [json.loads(line) for line in Path(args.rescore).read_text().splitlines() if line.strip()]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return write_synthetic(rescore(rows), args, out)
    if args.synthetic:
        return run_synthetic(args)
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


# ----------------------------------------------------------------------------------------------- known answers

WARP_RANGES = {"scale": (0.9, 1.15), "rotation_deg": 3.0, "shear": 0.02, "translation": 0.06, "perspective": 3e-5}
GRID_STEP = 16
CONFIRMED_PX = 1.5  # a data set's alignment of a pair counts as confirmed within this of its MI registration


def random_homography(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A realistic IR warp (aligned IR px -> warped IR px) about the frame centre: scale, rotation, shear and
    perspective terms drawn uniformly from WARP_RANGES, then a translation of up to 6% of the frame."""
    r = WARP_RANGES
    s, th = rng.uniform(*r["scale"]), math.radians(rng.uniform(-r["rotation_deg"], r["rotation_deg"]))
    A = s * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]) @ np.array(
        [[1.0, rng.uniform(-r["shear"], r["shear"])], [0.0, 1.0]])
    P = np.eye(3)
    P[:2, :2] = A
    P[2, :2] = rng.uniform(-r["perspective"], r["perspective"], 2)
    c = np.array([[1.0, 0, w / 2], [0, 1.0, h / 2], [0, 0, 1.0]])
    T = np.eye(3)
    T[:2, 2] = rng.uniform(-r["translation"], r["translation"], 2) * (w, h)
    G = T @ c @ P @ np.linalg.inv(c)
    return G / G[2, 2]


def _refusal(confidence: float) -> str | None:
    """Why ``ivf calibrate`` refuses an answer of this confidence, or None when it accepts it."""
    return None if confidence >= AutoConfig.min_confidence else "confidence below threshold"


def mutual_information(a: np.ndarray, b: np.ndarray, valid: np.ndarray, bins: int = 32) -> float:
    """Mutual information (bits) of two gray images in [0, 1] over the ``valid`` pixels."""
    h, _, _ = np.histogram2d(a[valid], b[valid], bins=bins, range=((0, 1), (0, 1)))
    return entropy(h.sum(axis=1)) + entropy(h.sum(axis=0)) - entropy(h)


def mi_registration(ir: np.ndarray, vis: np.ndarray, H0: np.ndarray, side: int = 320, bins: int = 32,
                    steps=(4.0, 2.0, 1.0, 0.5), reach: float = 0.04) -> tuple[np.ndarray, float] | None:
    """A reference for an aligned pair found independently of :func:`calibrate_auto`: the homography (IR px ->
    visible px) maximising the normalised mutual information of the raw intensities (not the structure maps the
    registration uses) over the overlap at ``side`` px, by a pattern search over the visible positions of the
    frame's four corners (``steps`` in full visible px) from ``H0``. Returns (matrix, normalised mutual
    information), or None when the search runs into ``reach`` x the frame's long side from the start (no local
    optimum near it: dark night frames, where the score favours degenerate overlaps)."""
    gi, gv = to_gray(ir), to_gray(vis)
    hv, wv = gv.shape
    a = min(1.0, side / max(hv, wv))
    small = cv2.resize(gv, (round(wv * a), round(hv * a)), interpolation=cv2.INTER_AREA)
    hw, ww = small.shape
    qv = np.minimum((cv2.GaussianBlur(small, (0, 0), 0.7) * bins).astype(np.int64), bins - 1).ravel()
    gi = cv2.GaussianBlur(gi, (0, 0), 0.7 / a)
    mask = content_mask(gi).astype(np.uint8)
    S = np.array([[a, 0, (a - 1) / 2], [0, a, (a - 1) / 2], [0, 0, 1.0]])
    corners = np.array([[0, 0], [wv - 1, 0], [wv - 1, hv - 1], [0, hv - 1]], np.float64)
    ir_corners = project(np.linalg.inv(H0), corners).astype(np.float32)
    matrix = lambda d: cv2.getPerspectiveTransform(ir_corners, (corners + d.reshape(4, 2)).astype(np.float32))

    def score(d):
        Hw = S @ matrix(d)
        m = cv2.warpPerspective(gi, Hw, (ww, hw), flags=cv2.INTER_LINEAR)
        ok = cv2.warpPerspective(mask, Hw, (ww, hw), flags=cv2.INTER_NEAREST).ravel() > 0
        if ok.mean() < 0.3:
            return -1.0
        qi = np.minimum((m.ravel()[ok] * bins).astype(np.int64), bins - 1)
        p = np.bincount(qi * bins + qv[ok], minlength=bins * bins).reshape(bins, bins).astype(np.float64)
        p = cv2.GaussianBlur(p, (3, 3), 0.5)  # a little Parzen smoothing of the joint histogram
        # normalised (entropies over joint entropy - 1): unlike plain MI it does not favour shrinking the overlap
        return (entropy(p.sum(axis=0)) + entropy(p.sum(axis=1))) / max(entropy(p), 1e-9) - 1.0

    d, best = np.zeros(8), score(np.zeros(8))
    limit = reach * max(hv, wv)
    for step in steps:
        improved = True
        while improved:
            improved = False
            for i in range(8):
                for sign in (1.0, -1.0):
                    t = d.copy()
                    t[i] += sign * step
                    if abs(t[i]) > limit:
                        return None
                    v = score(t)
                    if v > best:
                        d, best, improved = t, v, True
                        break
    H = matrix(d).astype(np.float64)
    return H / H[2, 2], best


def _synthetic_pair(task: dict) -> list[dict]:
    """The known-answer cases of one pair (runs in a worker): warp, register, score against the true mapping. With
    ``self_reference`` the first row is the pair's unwarped row (:func:`_unwarped_row`)."""
    cv2.setNumThreads(1)
    ir, vis = read_ir(task["ir"]), read_vis(task["vis"])
    h, w = ir.shape[:2]
    vis_wh = (vis.shape[1], vis.shape[0])
    cfg = AutoConfig(model=task["model"], min_confidence=0.0)  # answers below the threshold are scored too
    ref = np.asarray(task["reference"]).reshape(3, 3)
    rows = [_unwarped_row(task, ir, vis, cfg, ref)] if task["self_reference"] else []
    for j, (warp, overlay) in enumerate(zip(task["warps"], task["overlays"])):
        G = np.asarray(warp).reshape(3, 3)
        iw = cv2.warpPerspective(ir, G, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        row = {"dataset": task["dataset"], "pair": task["pair"], "case": j, "warp": G.ravel().tolist()}
        t = time.perf_counter()
        try:
            reg, info = calibrate_auto([(iw, vis)], cfg)
        except CalibrationError as exc:
            row.update(refused=str(exc), answer=False, seconds=time.perf_counter() - t)
            rows.append(row)
            continue
        row["seconds"] = time.perf_counter() - t
        # truth: warped IR px -> visible px
        mean, mx = grid_error(reg.matrix, ref @ np.linalg.inv(G), vis_wh, GRID_STEP)
        row.update(answer=True, matrix=reg.matrix.ravel().tolist(), mean_px=mean, max_px=mx,
                   confidence=info["confidence"],
                   refused=_refusal(info["confidence"]),
                   **{k: info[k] for k in SYNTHETIC_INFO if k in info})
        if not np.allclose(ref, np.eye(3)):
            row["mean_px_vs_dataset"], row["max_px_vs_dataset"] = grid_error(reg.matrix, np.linalg.inv(G), vis_wh)
        if overlay:
            write_overlay(overlay, iw, vis, reg, max_width=1200)
        rows.append(row)
    return rows


def _unwarped_row(task: dict, ir: np.ndarray, vis: np.ndarray, cfg: AutoConfig, ref: np.ndarray) -> dict:
    """The references of one pair for ``--self-reference``, logged once per pair and joined to its cases by
    :func:`with_references`: the unwarped pair registered by the same method (``own``, with the evidence its
    confidence comes from) and by mutual information (``mi``), and which of them fits the pair better."""
    vis_wh = (vis.shape[1], vis.shape[0])
    row = {"dataset": task["dataset"], "pair": task["pair"], "unwarped": True, "vis_wh": list(vis_wh),
           "reference": ref.ravel().tolist(), "own": None, "mi": None}
    t = time.perf_counter()
    try:
        reg, info = calibrate_auto([(ir, vis)], cfg)
        row.update(own=reg.matrix.ravel().tolist(), own_evidence={k: info[k] for k in SYNTHETIC_INFO if k in info})
    except CalibrationError as exc:
        row["own_error"] = str(exc)
    # a reference found independently of the method: mutual information, from the data set's alignment
    found = mi_registration(ir, vis, ref)
    if found is not None:
        row.update(mi=found[0].ravel().tolist(), reference_vs_mi_px=grid_error(found[0], ref, vis_wh, GRID_STEP)[0])
    # which fits the unwarped pair better, the data set's alignment or the pair's own registration (edge score and
    # mutual information of the raw intensities, a similarity the registration does not use)
    if row["own"] is not None:
        for name, M in (("reference", ref), ("own", reg.matrix)):
            g, valid = _apply(Registration(M, (ir.shape[1], ir.shape[0]), vis_wh), ir, vis.shape)
            row[f"{name}_edge"] = _edge(g, vis, valid)
            row[f"{name}_mi"] = mutual_information(g, to_gray(vis), valid)
    row["seconds"] = time.perf_counter() - t
    return row


def own_accepted(unwarped: dict) -> bool:
    """Whether ``ivf calibrate`` accepts the unwarped pair's own registration (an answer whose confidence, with the
    current :func:`confidence_score`, reaches the threshold)."""
    return unwarped["own"] is not None and _refusal(confidence_score(unwarped["own_evidence"])) is None


def with_references(rows: list[dict]) -> list[dict]:
    """The cases of ``rows`` scored against their pair's unwarped row, where the log has one: ``*_px_vs_self``
    against the pair's own registration composed with the warp, except where ``ivf calibrate`` would refuse that
    registration (below ``min_confidence`` with the current :func:`confidence_score`, or no answer): those pairs
    have no such reference, flagged ``self_reference_refused``; ``*_px_vs_mi`` against the mutual-information one."""
    refs = {(r["dataset"], r["pair"]): r for r in rows if r.get("unwarped")}
    out = []
    for r in rows:
        u = refs.get((r["dataset"], r.get("pair")))
        if r.get("unwarped") or u is None:
            out.append(r)
            continue
        r = dict(r)
        r["self_reference_refused"] = not own_accepted(u)
        if r.get("answer"):
            A, G_inv = np.asarray(r["matrix"]).reshape(3, 3), np.linalg.inv(np.asarray(r["warp"]).reshape(3, 3))
            vis_wh = tuple(u["vis_wh"])
            if not r["self_reference_refused"]:
                own = np.asarray(u["own"]).reshape(3, 3)
                r["mean_px_vs_self"], r["max_px_vs_self"] = grid_error(A, own @ G_inv, vis_wh, GRID_STEP)
            if u["mi"] is not None:
                mi = np.asarray(u["mi"]).reshape(3, 3)
                r["mean_px_vs_mi"], r["max_px_vs_mi"] = grid_error(A, mi @ G_inv, vis_wh, GRID_STEP)
                r["reference_vs_mi_px"] = u["reference_vs_mi_px"]
        out.append(r)
    return out


SYNTHETIC_INFO = ("inliers", "inlier_ratio", "coarse_distinct", "ambiguity", "dense_correlation",
                  "spread_px", "scale", "overlap", "moved_px", "agree", "coverage",
                  "verify_matches")


def synthetic_tasks(folders, per_pair: int, seed: int, references, model: str, limit: int = 0,
                    overlays: int = 0, out: Path | None = None, self_reference: bool = False,
                    only: list[str] | None = None) -> list[dict]:
    """The cases of the known-answer evaluation. The warps of a pair depend only on ``seed``, the folder's name and
    the pair's name, so a pair gets the same cases in a full run, a ``limit``-ed one, or alone (``only``: pair
    names, or ``folder:pair``)."""
    per_folder = []
    for fi, folder in enumerate(folders):
        tasks = []
        per_folder.append(tasks)
        folder = Path(folder)
        vis_dir = folder / "vi" if (folder / "vi").is_dir() else folder / "vis"
        pairs = find_pairs(folder / "ir", vis_dir)
        if limit:
            pairs = pairs[:: max(1, len(pairs) // limit)][:limit]
        name = folder.name
        if only:
            pairs = [p for p in pairs if p.stem in only or f"{name}:{p.stem}" in only]
        ref_spec = references[fi] if references else "-"
        ref = np.eye(3) if ref_spec == "-" else Registration.load(ref_spec).matrix
        for k, p in enumerate(pairs):
            h, w = cv2.imread(str(p.ir), cv2.IMREAD_UNCHANGED).shape[:2]
            rng = np.random.default_rng([seed, zlib.crc32(f"{name}/{p.stem}".encode())])
            warps = [random_homography(rng, w, h).ravel().tolist() for _ in range(per_pair)]
            shots = [str(out / "overlays" / f"synthetic_{name}_{p.stem}_{j}.png")
                     if out is not None and (overlays < 0 or k * per_pair + j < overlays) else None
                     for j in range(per_pair)]
            tasks.append({"dataset": name, "pair": p.stem, "ir": str(p.ir), "vis": str(p.vis), "warps": warps,
                          "overlays": shots, "reference": ref.ravel().tolist(), "model": model,
                          "self_reference": self_reference})
    # run each folder's pairs in an order fixed by their names but unrelated to them, and the folders interleaved
    # (the warps are drawn above, so the order changes no result): a run that is cut short has covered every folder
    # evenly, with a sample of its pairs rather than its first ones
    per_folder = [sorted(t, key=lambda t: zlib.crc32(f"{t['dataset']}/{t['pair']}/order".encode())) for t in per_folder]
    return [t[i] for i in range(max(map(len, per_folder), default=0)) for t in per_folder if i < len(t)]


def synthetic_summary(rows: list[dict], limit_px: float = 3.0, wrong_px: float = 5.0,
                      key: str = "mean_px") -> list[dict]:
    """Per data set and over all: refusal rate, median grid error (``key``: the mean over the grid against the
    reference, or ``mean_px_vs_self``), share of accepted answers within ``limit_px``, the worst accepted answer,
    and how many accepted (and refused) answers are wrong (> ``wrong_px``)."""
    out = []
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    for ds in names + (["all"] if len(names) > 1 else []):
        rs = [r for r in rows if ds == "all" or r["dataset"] == ds]
        rs = [r for r in rs if not r.get("answer") or key in r]
        acc = [r for r in rs if not r["refused"]]
        mean = np.array([r[key] for r in acc])
        mx = np.array([r[key.replace("mean", "max")] for r in acc])
        wrong_refused = [r for r in rs if r["refused"] and r.get("answer") and r[key] > wrong_px]
        out.append({"dataset": ds, "cases": len(rs), "refused": len(rs) - len(acc),
                    "refusal_rate": (len(rs) - len(acc)) / max(len(rs), 1),
                    "median_px": float(np.median(mean)) if acc else None,
                    "median_max_px": float(np.median(mx)) if acc else None,
                    "within_limit": float((mean <= limit_px).mean()) if acc else None,
                    "max_accepted_px": float(mean.max()) if acc else None,
                    "max_accepted_max_px": float(mx.max()) if acc else None,
                    "accepted_wrong": int((mean > wrong_px).sum()) if acc else 0,
                    "refused_wrong": len(wrong_refused),
                    "seconds_per_case": float(np.mean([r["seconds"] for r in rs]))})
    return out


def synthetic_markdown(summary: list[dict]) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    lines = ["| data set | cases | refused | median grid error (mean / max px) | accepted <= 3 px | worst accepted "
             "(mean / max px) | accepted > 5 px | s per case |",
             "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['dataset']} | {s['cases']} | {s['refused']} ({100 * s['refusal_rate']:.1f}%) | "
                     f"{f(s['median_px'], '.2f')} / {f(s['median_max_px'], '.2f')} | "
                     f"{f(s['within_limit'] and 100 * s['within_limit'], '.1f')}% | "
                     f"{f(s['max_accepted_px'], '.2f')} / {f(s['max_accepted_max_px'], '.2f')} | "
                     f"{s['accepted_wrong']} | {s['seconds_per_case']:.2f} |")
    return "\n".join(lines) + "\n"


def confidence_markdown(rows: list[dict], edges=(0.0, 0.25, 0.5, 0.75, 0.9, 1.01), key: str = "mean_px") -> str:
    """Per data set and confidence band: answers, median grid error (``key``), share within 3 px and above 5 px."""
    lines = ["| data set | confidence | answers | median grid error (px) | <= 3 px | > 5 px |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds and r.get("answer") and key in r]
        for lo, hi in zip(edges[:-1], edges[1:]):
            e = np.array([r[key] for r in rs if lo <= r["confidence"] < hi])
            if len(e):
                lines.append(f"| {ds} | {lo:.2f}-{min(hi, 1.0):.2f} | {len(e)} | {np.median(e):.2f} | "
                             f"{100 * (e <= 3).mean():.0f}% | {100 * (e > 5).mean():.0f}% |")
    return "\n".join(lines) + "\n"


def reference_check(unwarped: list[dict]) -> str:
    """Per data set, from the unwarped rows: how many of the pairs' own registrations ``ivf calibrate`` would refuse,
    how far the accepted ones lie from the data set's alignment, and on how many pairs the own registration fits
    better than that alignment (higher mutual information, higher edge score)."""
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in unwarped):
        rs = list({r["pair"]: r for r in unwarped if r["dataset"] == ds}.values())
        ok = [r for r in rs if own_accepted(r)]
        d = [grid_error(np.reshape(r["own"], (3, 3)), np.reshape(r["reference"], (3, 3)), tuple(r["vis_wh"]),
                        GRID_STEP)[0] for r in ok]
        fits = [r for r in rs if "own_mi" in r]
        lines.append(f"{ds}: of {len(rs)} unwarped pairs, `ivf calibrate` would refuse {len(rs) - len(ok)} own "
                     "registrations" + (f"; the accepted ones lie a median {np.median(d):.2f} px (max {max(d):.2f}) "
                                        "from the data set's alignment" if d else "")
                     + f"; the own registration fits the pair better than that alignment on "
                     f"{sum(r['own_mi'] > r['reference_mi'] for r in fits)} of {len(fits)} pairs by mutual "
                     f"information, {sum(r['own_edge'] > r['reference_edge'] for r in fits)} by edge score")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds and r.get("answer")]
        ax.scatter([r["confidence"] for r in rs], [max(r["mean_px"], 0.05) for r in rs], s=8, alpha=0.6, label=ds)
    ax.axhline(5.0, color="k", lw=0.8, ls="--")
    ax.axvline(AutoConfig.min_confidence, color="r", lw=0.8, ls=":", label="refused below")
    ax.set_yscale("log")
    ax.set_xlabel("confidence")
    ax.set_ylabel("grid error, mean over the visible frame (px)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_synthetic(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reference and len(args.reference) != len(args.synthetic):
        raise ValueError(f"--reference needs one entry per --synthetic folder ({len(args.synthetic)}), "
                         f"got {len(args.reference)}")
    tasks = synthetic_tasks(args.synthetic, args.per_pair, args.seed, args.reference, args.model, args.limit,
                            args.overlays, out, args.self_reference, args.pairs)
    missing = set(args.pairs or ()) - {t["pair"] for t in tasks} - {f"{t['dataset']}:{t['pair']}" for t in tasks}
    if missing:
        raise ValueError(f"--pairs: no such pair in {', '.join(args.synthetic)}: {', '.join(sorted(missing))}")
    rows: list[dict] = []
    with (out / "synthetic.jsonl").open("w") as log, tqdm(total=len(tasks), desc="registering", unit="pair") as bar:
        def done(pair_rows):  # cases are logged as they come, so a long run can be followed (and read if cut)
            for r in pair_rows:
                log.write(json.dumps(r) + "\n")
            log.flush()
            rows.extend(pair_rows)
            bar.update()
        if args.jobs > 1:
            import multiprocessing as mp
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            with mp.get_context("spawn").Pool(args.jobs) as pool:
                for pair_rows in pool.imap(_synthetic_pair, tasks):
                    done(pair_rows)
        else:
            for t in tasks:
                done(_synthetic_pair(t))
    return write_synthetic(rows, args, out)


def rescore(rows: list[dict]) -> list[dict]:
    """The logged cases with confidence and refusal recomputed by the current :func:`confidence_score` (a pure
    function of the logged evidence), so the confidence can be re-calibrated without registering again."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("answer"):
            r["confidence"] = confidence_score(r)
            r["refused"] = _refusal(r["confidence"])
        out.append(r)
    return out


def write_synthetic(rows: list[dict], args: argparse.Namespace, out: Path) -> int:
    unwarped = [r for r in rows if r.get("unwarped")]
    rows = [r for r in with_references(rows) if not r.get("unwarped")]
    summary = synthetic_summary(rows)
    (out / "synthetic.json").write_text(json.dumps({"seed": args.seed, "per_pair": args.per_pair,
                                                    "warp_ranges": WARP_RANGES, "grid_step_px": GRID_STEP,
                                                    "summary": summary, "cases": rows, "unwarped": unwarped},
                                                   indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("warp", "matrix")))
    with (out / "synthetic.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = synthetic_markdown(summary) + "\nWhat the confidence means (all answers, refused ones too):\n\n" + \
        confidence_markdown(rows)
    if any("self_reference_refused" in r for r in rows):
        scored = [r for r in rows if r.get("self_reference_refused") is False]
        none = [r for r in rows if r.get("self_reference_refused")]
        names = sorted({f"{r['dataset']}:{r['pair']}" for r in none})
        table += ("\nAgainst each pair's own registration (the unwarped pair registered by the same method; "
                  f"{len(names)} of {len({(r['dataset'], r['pair']) for r in scored + none})} pairs have none: "
                  "`ivf calibrate` would refuse it):\n\n"
                  + synthetic_markdown(synthetic_summary(scored, key="mean_px_vs_self")) + "\n"
                  + reference_check(unwarped) + "\nWhat the confidence means against that reference:\n\n"
                  + confidence_markdown(scored, key="mean_px_vs_self"))
        if none:
            table += ("\nThe cases of the pairs without one, against the data set's alignment "
                      f"({' '.join(names)}):\n\n" + synthetic_markdown(synthetic_summary(none)))
    if any("mean_px_vs_mi" in r for r in rows):
        table += ("\nAgainst an independent reference per pair (the unwarped pair registered by maximising the mutual "
                  "information of the raw intensities, from the data set's alignment):\n\n"
                  + synthetic_markdown(synthetic_summary(rows, key="mean_px_vs_mi")))
        confirmed = [r for r in rows if r.get("reference_vs_mi_px", math.inf) <= CONFIRMED_PX]
        table += (f"\nAgainst the data set's alignment, on the pairs where the mutual-information registration "
                  f"confirms it (within {CONFIRMED_PX:g} px; {len({(r['dataset'], r['pair']) for r in confirmed})} of "
                  f"{len({(r['dataset'], r['pair']) for r in rows})} pairs):\n\n"
                  + synthetic_markdown(synthetic_summary(confirmed)))
    (out / "synthetic.md").write_text(table)
    if args.plot:
        _plot(rows, out / "synthetic.png")
    print(table)
    print(f"wrote {out}/synthetic.json, synthetic.csv, synthetic.md" + (", synthetic.png" if args.plot else ""))
    return 0
