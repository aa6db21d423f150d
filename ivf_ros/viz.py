"""Pictures for reports: contact sheets of sample frames and small matplotlib (Agg) plots."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from .imageops import write_image

HEADER_PX = 22
LABEL_PX = 16


def display_bgr(img: np.ndarray, stretch: bool = False) -> np.ndarray:
    """BGR uint8 view of any image: float images are taken as [0, 1]; uint16 images (and any image with
    ``stretch``) are stretched between their 1st and 99th percentiles."""
    if img.dtype.kind == "f":
        img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if stretch or img.dtype != np.uint8:
        lo, hi = np.percentile(img, (1, 99))
        x = np.clip((img.astype(np.float32) - lo) / max(float(hi - lo), 1.0), 0.0, 1.0)
        img = (x * 255.0 + 0.5).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img[..., :3])


def draw_boxes(img: np.ndarray, boxes, palette: Sequence[Sequence[int]], thickness: int = 2) -> np.ndarray:
    """A BGR copy of ``img`` with the ground-truth boxes [(yolo_class, x0, y0, x1, y1)] outlined in the colour of
    their label (``palette``: RGB per label id; YOLO class c is label c + 1)."""
    out = display_bgr(img).copy()
    for c, x0, y0, x1, y1 in boxes:
        r, g, b = palette[int(c) + 1] if int(c) + 1 < len(palette) else (255, 255, 255)
        cv2.rectangle(out, (int(round(x0)), int(round(y0))), (int(round(x1)) - 1, int(round(y1)) - 1),
                      (int(b), int(g), int(r)), thickness)
    return out


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45) -> None:
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[str], row_labels: Sequence[str] = (),
                  tile_width: int = 240, gap: int = 4) -> np.ndarray:
    """One BGR image: a row per sample, a tile per column (each scaled to ``tile_width``), column titles on top.

    Tiles of a row may differ in size; each row takes the height of its tallest tile. ``row_labels`` are written
    into the first tile of each row.
    """
    if not rows:
        raise ValueError("contact sheet needs at least one row")
    n_cols = len(columns)
    if any(len(r) != n_cols for r in rows):
        raise ValueError(f"every contact-sheet row needs {n_cols} images ({', '.join(columns)})")
    width = n_cols * tile_width + (n_cols + 1) * gap
    strips = []
    header = np.full((HEADER_PX, width, 3), 32, np.uint8)
    for j, name in enumerate(columns):
        _text(header, name, (gap + j * (tile_width + gap) + 4, HEADER_PX - 7), 0.5)
    strips.append(header)
    for i, row in enumerate(rows):
        tiles = []
        for img in row:
            tile = display_bgr(img)
            h = max(1, int(round(tile.shape[0] * tile_width / tile.shape[1])))
            tiles.append(cv2.resize(tile, (tile_width, h), interpolation=cv2.INTER_AREA))
        height = max(t.shape[0] for t in tiles)
        strip = np.full((height + gap, width, 3), 32, np.uint8)
        for j, tile in enumerate(tiles):
            x = gap + j * (tile_width + gap)
            strip[gap:gap + tile.shape[0], x:x + tile_width] = tile
        if i < len(row_labels) and row_labels[i]:
            _text(strip, str(row_labels[i]), (gap + 4, gap + LABEL_PX - 3), 0.4)
        strips.append(strip)
    strips.append(np.full((gap, width, 3), 32, np.uint8))
    return np.vstack(strips)


def write_png(path: str | Path, img: np.ndarray) -> Path:
    """Write a PNG (creating folders); raises OSError when it cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, img, (cv2.IMWRITE_PNG_COMPRESSION, 9))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_histogram(path: str | Path, latencies_ms: Mapping[str, Sequence[float]], title: str = "latency per pair"
                      ) -> Path:
    """Histogram of latencies (ms), one series per key, with each series' median marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, values in latencies_ms.items():
        values = np.asarray(values, np.float64)
        if values.size == 0:
            continue
        line = ax.hist(values, bins=min(40, max(5, values.size // 2)), alpha=0.6, label=name)[2][0]
        ax.axvline(float(np.median(values)), color=line.get_facecolor(), linestyle="--", linewidth=1)
    ax.set_xlabel("ms")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def metric_plot(path: str | Path, per_frame: Mapping[str, Mapping[str, Sequence[float]]], metrics: Sequence[str],
                title: str = "fusion metrics per pair") -> Path:
    """One panel per metric, one line per method: ``per_frame[method][metric]`` is a list over pairs."""
    plt = _pyplot()
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metric plot needs at least one metric")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 1.6 * len(metrics) + 0.6), dpi=100, sharex=True,
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for method, series in per_frame.items():
            values = series.get(metric, [])
            ax.plot(range(len(values)), values, marker=".", markersize=3, linewidth=1, label=method)
        ax.set_ylabel(metric)
    axes[0, 0].set_title(title)
    axes[0, 0].legend(fontsize=8, ncol=len(per_frame))
    axes[-1, 0].set_xlabel("pair")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write a finished figure as PNG (creating folders) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path
