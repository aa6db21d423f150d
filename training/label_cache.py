"""Teacher-label cache: run the MFNet teacher once per pair and keep its soft targets on disk.

    python -m training.label_cache PAIRS_DIR --out runs/teacher/msrs [--scale 2] [--threads 2]

``PAIRS_DIR`` holds ``ir/`` and ``vi/`` (matched by stem). Per pair ``OUT/<stem>.npz`` holds ``probs``: uint8
C x (H/scale) x (W/scale), the teacher's class probabilities x 255 mapped onto our classes (background, person,
bicycle, car: MFNet's other classes count as background) and area-averaged to the head's resolution.
``OUT/cache.json`` names the teacher, the classes and the scale. Pairs already cached are skipped.

Combining with boxes (``box_consistent_target``) is measured in ``training/label_rule.py``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ivf_ros.data import find_pairs, read_ir, read_vis

from .datasets import CLASS_ALIASES, CLASSES
from .mfnet import MFNET_CLASSES, load_mfnet, teacher_logits

TEACHER = "MFNet (Ha et al. 2017), haqishen/MFNet-pytorch final.pth, ../shared/teachers/mfnet"


def class_map(classes: list[str]) -> torch.Tensor:
    """len(classes) x 9 matrix summing MFNet's class probabilities into ``classes`` (unmapped -> background)."""
    m = torch.zeros(len(classes), len(MFNET_CLASSES))
    for j, name in enumerate(MFNET_CLASSES):
        ours = CLASS_ALIASES.get(name)
        m[classes.index(ours) if ours in classes else 0, j] = 1.0
    return m


def class_probs(logits: torch.Tensor, classes: list[str]) -> torch.Tensor:
    """9 x H x W teacher logits -> C x H x W probabilities of ``classes``."""
    return torch.einsum("cj,jhw->chw", class_map(classes), logits.softmax(0))


def soft_targets(logits: torch.Tensor, classes: list[str], scale: int) -> np.ndarray:
    """9 x H x W teacher logits -> uint8 C x ceil(H/scale) x ceil(W/scale) probabilities x 255 (area average)."""
    probs = class_probs(logits, classes)
    if scale > 1:
        probs = F.avg_pool2d(probs[None], scale, ceil_mode=True)[0]
    return np.round(probs.numpy() * 255).astype(np.uint8)


def read_cache(folder: str | Path, stem: str) -> np.ndarray | None:
    """The cached probabilities of ``stem`` as float32 C x h x w in [0, 1], or None when not cached."""
    path = Path(folder) / f"{stem}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["probs"].astype(np.float32) / 255.0


def cache_info(folder: str | Path) -> dict:
    path = Path(folder) / "cache.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a teacher-label cache (run python -m training.label_cache)")
    return json.loads(path.read_text())


def build_cache(pairs_dir: str | Path, out: str | Path, scale: int = 2, classes: list[str] = CLASSES,
                weights: str | Path | None = None, progress: bool = True) -> int:
    """Cache the teacher's soft targets of every pair not cached yet; returns the number of pairs run."""
    pairs_dir, out = Path(pairs_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"teacher": TEACHER, "classes": list(classes), "scale": scale, "pairs": str(pairs_dir)}
    if (out / "cache.json").is_file() and {k: v for k, v in cache_info(out).items() if k != "pairs"} != {
            k: v for k, v in info.items() if k != "pairs"}:
        raise ValueError(f"{out}: holds a cache of other classes or scale ({out / 'cache.json'})")
    (out / "cache.json").write_text(json.dumps(info, indent=2) + "\n")
    todo = [p for p in find_pairs(pairs_dir / "ir", pairs_dir / "vi") if not (out / f"{p.stem}.npz").is_file()]
    model = load_mfnet(weights) if todo else None
    for pair in tqdm(todo, desc="teacher", disable=not progress, dynamic_ncols=True):
        probs = soft_targets(teacher_logits(model, read_ir(pair.ir), read_vis(pair.vis)), classes, scale)
        tmp = out / f"{pair.stem}.tmp.npz"
        np.savez_compressed(tmp, probs=probs)
        tmp.replace(out / f"{pair.stem}.npz")  # a killed run never leaves a half-written entry
    return len(todo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", help="folder with ir/ and vi/")
    ap.add_argument("--out", required=True, help="cache folder")
    ap.add_argument("--scale", type=int, default=2, help="store at 1/scale of the input size (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", help="MFNet safetensors (default ../shared/teachers/mfnet)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = build_cache(args.pairs, args.out, args.scale, weights=args.weights)
    print(f"{n} pairs cached in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
