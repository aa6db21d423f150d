"""Image pairs on disk: matching by file stem, reading IR / visible images, YOLO box labels, the MSRS split."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def file_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be read as a ``kind`` file (a directory, missing, not a regular file), or None."""
    if path.is_dir():
        return f"{path}: is a directory, not a {kind} file"
    if not path.exists():
        return f"{path}: no such {kind} file"
    if not path.is_file():
        return f"{path}: not a regular file"
    return None


class PairingError(ValueError):
    """IR and visible folders do not pair up."""


@dataclass(frozen=True)
class Pair:
    stem: str
    ir: Path
    vis: Path


def data_root() -> Path:
    """``$IVF_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("IVF_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def list_images(folder: str | Path) -> dict[str, Path]:
    """Stem -> image file of a folder; two images with one stem (``a.png`` beside ``a.jpg``) are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PairingError(f"{folder}: no such folder")
    images: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in images:
            raise PairingError(f"{folder}: {images[p.stem].name} and {p.name} share the stem '{p.stem}' "
                               "(keep one of them)")
        images[p.stem] = p
    return images


def find_pairs(ir_dir: str | Path, vis_dir: str | Path, allow_unmatched: bool = False) -> list[Pair]:
    """Pairs of images with the same stem, sorted by stem. Unmatched files are an error unless allowed."""
    ir, vis = list_images(ir_dir), list_images(vis_dir)
    common = sorted(set(ir) & set(vis))
    only_ir, only_vis = sorted(set(ir) - set(vis)), sorted(set(vis) - set(ir))
    if not common:
        raise PairingError(f"no image stems in common between {ir_dir} ({len(ir)} images) and {vis_dir} ({len(vis)})")
    if (only_ir or only_vis) and not allow_unmatched:
        parts = []
        if only_ir:
            parts.append(f"{len(only_ir)} IR image(s) without a visible partner, e.g. {only_ir[0]}")
        if only_vis:
            parts.append(f"{len(only_vis)} visible image(s) without an IR partner, e.g. {only_vis[0]}")
        raise PairingError("; ".join(parts))
    return [Pair(s, ir[s], vis[s]) for s in common]


def read_ir(path: str | Path) -> np.ndarray:
    """IR image as stored (uint8 or uint16); 3-channel files are reduced to gray."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: cannot read image")
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    return img


def read_vis(path: str | Path) -> np.ndarray:
    """Visible image as BGR uint8, or gray uint8 when the file is single-channel.

    16-bit files are scaled by full scale (65535 -> 255); floating-point files must hold [0, 1] (scaled to
    0..255), anything else is refused rather than guessed."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: cannot read image")
    if img.dtype == np.uint16:
        img = np.round(img / 257.0).astype(np.uint8)
    elif img.dtype.kind == "f":
        if not np.isfinite(img).all():
            raise ValueError(f"{path}: {img.dtype} visible image holds NaN or infinite values")
        low, high = float(img.min()), float(img.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{path}: {img.dtype} visible image has values in [{low:g}, {high:g}]; floating-point "
                             "visible images must hold [0, 1] (or store 8/16-bit integers)")
        img = np.round(img * 255.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"{path}: {img.dtype} visible images are not supported (8/16-bit integers or [0, 1] floats)")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    return img


def read_yolo_boxes(path: str | Path, width: int, height: int) -> list[tuple[int, float, float, float, float]]:
    """YOLO ``class cx cy w h`` (normalised) -> [(class, x0, y0, x1, y1)] in pixels. Missing file: no boxes."""
    path = Path(path)
    if not path.is_file():
        return []
    boxes = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        c, cx, cy, w, h = int(float(parts[0])), *map(float, parts[1:5])
        boxes.append((c, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height))
    return boxes


def msrs_split(stems: list[str]) -> tuple[list[str], list[str]]:
    """(train, val): validation is every 4th name in sorted order (the 4th, 8th, ...), training the rest."""
    stems = sorted(stems)
    val = stems[3::4]
    val_set = set(val)
    return [s for s in stems if s not in val_set], val
