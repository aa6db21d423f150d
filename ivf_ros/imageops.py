"""Image conventions shared by every path: IR normalisation, luminance/chroma split, label colouring, writing.

The network's inputs are prepared here and only here: ``prepare_ir`` (IR) and ``split_luminance`` (visible), used
by the served pipeline, ``ivf fuse/eval``, the bag tools and training (``training/datasets.py:to_tensors``), so
metrics measured at training time are those of the served path. Colour images are BGR uint8 (OpenCV and ROS
``bgr8`` order). Luminance uses Y = 0.299 R + 0.587 G + 0.114 B.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass
class IRNormalizer:
    """Map raw IR (uint8, uint16 or float) to float32 in [0, 1].

    ``mode="fixed"`` maps ``fixed_range`` (raw units; default: the dtype's full scale, 0..255 for 8-bit,
    0..65535 for 16-bit, 0..1 for float) linearly; ``mode="percentile"`` maps the ``percentiles`` (low, high) of each
    frame, smoothed over time with factor ``smoothing`` (0 = no memory, 0.9 = slow) so a cold scene does not
    flicker; ``mode="auto"`` is full scale for uint8 and percentile otherwise.
    """

    mode: str = "auto"
    fixed_range: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (1.0, 99.0)
    smoothing: float = 0.8
    _range: tuple[float, float] | None = None

    def __post_init__(self):
        if self.mode not in ("auto", "fixed", "percentile"):
            raise ValueError(f"IR normalisation mode must be auto, fixed or percentile, not {self.mode!r}")
        if self.fixed_range is not None:
            self.fixed_range = _ordered_pair(self.fixed_range, "fixed range")
        self.percentiles = _ordered_pair(self.percentiles, "percentiles")
        if not (0.0 <= self.percentiles[0] and self.percentiles[1] <= 100.0):
            raise ValueError(f"percentiles must lie in [0, 100] (got {self.percentiles})")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"IR normalisation smoothing must be in [0, 1) (got {self.smoothing})")

    def reset(self) -> None:
        self._range = None

    def __call__(self, ir: np.ndarray) -> np.ndarray:
        if ir.ndim == 3:  # false-colour or 3-channel gray cameras
            ir = cv2.cvtColor(ir, cv2.COLOR_BGR2GRAY) if ir.shape[2] == 3 else ir[..., 0]
        mode = self.mode
        if mode == "auto":
            mode = "fixed" if ir.dtype == np.uint8 else "percentile"
        x = ir.astype(np.float32)
        if mode == "fixed" and self.fixed_range is None and ir.dtype == np.uint8:
            return x * np.float32(1.0 / 255.0)  # the common 8-bit case, per frame: already in range
        if mode == "fixed":
            lo, hi = self.fixed_range or _full_scale(ir.dtype)
        else:
            finite = x[np.isfinite(x)] if x.dtype.kind == "f" else x
            if finite.size == 0:
                raise ValueError("IR image has no finite values")
            sample = finite.ravel()[:: max(1, finite.size // 20000)]
            lo, hi = (float(v) for v in np.percentile(sample, self.percentiles))
            if self._range is not None:
                a = self.smoothing
                lo, hi = a * self._range[0] + (1 - a) * lo, a * self._range[1] + (1 - a) * hi
            self._range = (lo, hi)
        scale = 1.0 / max(hi - lo, 1e-6)
        out = (x - lo) * scale
        if ir.dtype.kind == "f":  # only float input can hold NaN or inf
            out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(out, 0.0, 1.0, out=out)


def _full_scale(dtype) -> tuple[float, float]:
    """The raw range an IR image of ``dtype`` can hold: 0..255, 0..65535, the integer type's range, 0..1 for floats."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def _ordered_pair(values, what: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"IR normalisation {what} must be [low, high] (got {values!r})") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"IR normalisation needs low < high, both finite (got {what} {low:g}, {high:g})")
    return low, high


def prepare_ir(ir: np.ndarray, normalizer: IRNormalizer | None = None) -> np.ndarray:
    """The network's IR input before registration: gray float32 in [0, 1] by ``normalizer`` (default: one frame,
    auto mode, no temporal smoothing, as ``ivf fuse`` and training use it)."""
    return (normalizer or IRNormalizer(smoothing=0.0))(ir)


def to_luminance(img: np.ndarray) -> np.ndarray:
    """Float32 luminance in [0, 1] of a gray (H x W) or BGR (H x W x 3/4) uint8 image."""
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY) if img.shape[2] >= 3 else img[..., 0]
    return img.astype(np.float32) * (1.0 / 255.0)


def split_luminance(vis: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Split a visible image into float luminance in [0, 1] and its chroma (None for gray inputs)."""
    if vis.ndim == 2 or vis.shape[2] == 1:
        return to_luminance(vis.reshape(vis.shape[:2])), None
    ycrcb = cv2.cvtColor(vis[..., :3], cv2.COLOR_BGR2YCrCb)
    return np.multiply(ycrcb[..., 0], np.float32(1.0 / 255.0), dtype=np.float32), ycrcb[..., 1:]  # one pass


def merge_luminance(y: np.ndarray, chroma: np.ndarray | None) -> np.ndarray:
    """Inverse of ``split_luminance``: fused luminance + visible chroma -> BGR uint8 (or gray uint8)."""
    y8 = np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if chroma is None:
        return y8
    return cv2.cvtColor(cv2.merge([y8, chroma[..., 0], chroma[..., 1]]), cv2.COLOR_YCrCb2BGR)  # 2x np.dstack's speed


def gray_u8(img: np.ndarray) -> np.ndarray:
    """Gray uint8 view of an image for display (float images are taken as [0, 1])."""
    if img.dtype != np.uint8:
        img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    return img


def colorize_labels(labels: np.ndarray, palette, image: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """BGR colour mask of a class-id map (palette given as RGB triplets), blended over ``image`` when given.

    Background (class 0) keeps the image's own pixels in the overlay.
    """
    lut = np.zeros((256, 3), np.uint8)
    rgb = np.asarray(palette, np.uint8).reshape(-1, 3)
    lut[: len(rgb)] = rgb[:, ::-1]
    mask = lut[labels]
    if image is None:
        return mask
    base = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    blended = cv2.addWeighted(base[..., :3], 1.0 - alpha, mask, alpha, 0.0)
    return np.where((labels > 0)[..., None], blended, base[..., :3])


def write_image(path: str | Path, img: np.ndarray, params: tuple[int, ...] = ()) -> Path:
    """Encode ``img`` by the file's extension and write it; every failure (no extension OpenCV knows, unwritable
    folder, full disk) raises ``OSError`` naming the file. ``cv2.imwrite`` only returns False, or even True."""
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(path.suffix, img, list(params))
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"{path}: cannot encode a {'x'.join(map(str, img.shape))} {img.dtype} image as "
                      f"'{path.suffix}'")
    try:
        path.write_bytes(encoded.tobytes())
    except OSError as exc:
        raise OSError(f"{path}: cannot write image ({exc.strerror or exc})") from None
    return path
