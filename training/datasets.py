"""Training data: IR/visible pairs with optional per-pixel targets, from the layouts users have.

Supported layouts (``load_pairs(root, layout)``):

* ``pairs``  ``ir/`` + ``vi/`` matched by stem, optional ``boxes/`` (YOLO txt) -> box-derived masks (MSRS here);
* ``msrs``   ``ir/`` + ``vi/`` + ``Label/`` (pixel class ids, the full MSRS release, 9 classes);
* ``fmb``    ``Infrared/`` + ``Visible/`` + ``Label/`` (FMB, 15 classes);
* ``mfnet``  ``images/*.png`` 4-channel (R, G, B, thermal) + ``labels/*.png`` (MFNet, 9 classes).

Box-derived masks: each box is filled with its class (larger boxes first so small ones stay visible) and a band
along the box border is marked ``IGNORE`` because boxes are looser than objects; pixels outside every box are
background. Pixel-label layouts map their classes onto the checkpoint's classes with a name table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ivf_ros.data import find_pairs, list_images, read_ir, read_vis, read_yolo_boxes
from ivf_ros.imageops import gray_u8, prepare_ir, split_luminance
from ivf_ros.model import window_row_coordinates

IGNORE = 255
CLASSES = ["background", "person", "bicycle", "car"]  # the shipped classes (MSRS boxes)

LAYOUT_CLASSES = {
    "msrs": ["unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump"],
    "mfnet": ["unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump"],
    "fmb": ["unlabelled", "road", "sidewalk", "building", "traffic_light", "traffic_sign", "vegetation", "sky",
            "person", "car", "truck", "bus", "motorcycle", "bicycle", "pole"],
}
# Layout class names -> our class names (anything unmapped becomes background).
CLASS_ALIASES = {"bike": "bicycle", "bicycle": "bicycle", "motorcycle": "bicycle", "person": "person",
                 "car": "car", "truck": "car", "bus": "car"}


@dataclass
class Sample:
    """One pair in memory: IR gray uint8, visible BGR or gray uint8, target class ids (uint8, IGNORE) or None,
    and the pixel boxes the target came from (box layouts only)."""

    stem: str
    ir: np.ndarray
    vis: np.ndarray
    target: np.ndarray | None
    boxes: list | None = None
    soft: np.ndarray | None = None  # teacher soft targets C x H/scale x W/scale (float16), see attach_teacher
    weight: np.ndarray | None = None  # their per-pixel loss weight (float16), 0 = no loss
    scale: int = 1


def box_mask(shape: tuple[int, int], boxes, band: float = 0.1) -> np.ndarray:
    """Class-id mask from pixel boxes ``(yolo_class, x0, y0, x1, y1)``; class id = yolo_class + 1."""
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    for c, x0, y0, x1, y1 in sorted(boxes, key=lambda b: -(b[3] - b[1]) * (b[4] - b[2])):
        x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
        x1, y1 = min(w, int(round(x1))), min(h, int(round(y1)))
        if x1 <= x0 or y1 <= y0:
            continue
        mask[y0:y1, x0:x1] = IGNORE
        b = max(1, int(round(band * min(x1 - x0, y1 - y0))))
        if x1 - x0 > 2 * b and y1 - y0 > 2 * b:
            mask[y0 + b:y1 - b, x0 + b:x1 - b] = c + 1
    return mask


def remap_labels(labels: np.ndarray, layout_classes: list[str], classes: list[str]) -> np.ndarray:
    """Map a layout's class ids onto ``classes`` by name (unknown -> background, ids beyond the table -> IGNORE)."""
    lut = np.full(256, IGNORE, np.uint8)
    for i, name in enumerate(layout_classes):
        ours = CLASS_ALIASES.get(name)
        lut[i] = classes.index(ours) if ours in classes else 0
    return lut[labels]


def _read_label(path: Path) -> np.ndarray:
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"{path}: cannot read label image")
    return lab if lab.ndim == 2 else lab[..., 0]


def load_pairs(root: str | Path, layout: str = "pairs", classes: list[str] | None = None,
               stems: list[str] | None = None) -> list[Sample]:
    """Load every pair of a dataset folder into memory (optionally only ``stems``)."""
    root = Path(root)
    classes = classes or CLASSES
    samples = []
    if layout == "mfnet":
        labels = list_images(root / "labels")
        for stem, path in list_images(root / "images").items():
            if stems is not None and stem not in stems:
                continue
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None or img.ndim != 3 or img.shape[2] != 4:
                raise ValueError(f"{path}: MFNet images have 4 channels (R, G, B, thermal)")
            vis = np.ascontiguousarray(img[..., :3])  # OpenCV reads B, G, R, then the 4th (thermal) channel
            target = remap_labels(_read_label(labels[stem]), LAYOUT_CLASSES[layout], classes) if stem in labels else None
            samples.append(Sample(stem, np.ascontiguousarray(img[..., 3]), vis, target))
        return samples
    dirs = {"pairs": ("ir", "vi", None), "msrs": ("ir", "vi", "Label"), "fmb": ("Infrared", "Visible", "Label")}
    if layout not in dirs:
        raise ValueError(f"unknown dataset layout '{layout}' (pairs, msrs, fmb, mfnet)")
    ir_dir, vis_dir, label_dir = dirs[layout]
    labels = list_images(root / label_dir) if label_dir else {}
    for pair in find_pairs(root / ir_dir, root / vis_dir, allow_unmatched=True):
        if stems is not None and pair.stem not in stems:
            continue
        ir, vis = read_ir(pair.ir), read_vis(pair.vis)
        if ir.dtype != np.uint8:  # the served normalisation of the whole frame, kept at 8 bits like 8-bit IR
            ir = gray_u8(prepare_ir(ir))
        if ir.shape[:2] != vis.shape[:2]:
            raise ValueError(f"{pair.stem}: IR {ir.shape[:2]} and visible {vis.shape[:2]} sizes differ")
        target, boxes = None, None
        if label_dir and pair.stem in labels:
            target = remap_labels(_read_label(labels[pair.stem]), LAYOUT_CLASSES[layout], classes)
        elif layout == "pairs" and (root / "boxes").is_dir():
            h, w = ir.shape[:2]
            boxes = read_yolo_boxes(root / "boxes" / f"{pair.stem}.txt", w, h)
            target = box_mask((h, w), boxes)
        samples.append(Sample(pair.stem, ir, vis, target, boxes))
    return samples


def to_tensors(ir: np.ndarray, vis: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IR 1xHxW, visible luminance 1xHxW, visible YCrCb 3xHxW) float tensors in [0, 1], prepared by the served
    pipeline's functions (``ivf_ros.imageops.prepare_ir`` and ``split_luminance``); gray visible: neutral chroma."""
    vis_y, chroma = split_luminance(vis)
    chroma01 = (chroma.astype(np.float32) * np.float32(1.0 / 255.0) if chroma is not None
                else np.full((*vis_y.shape, 2), 128.0 / 255.0, np.float32))
    t = torch.from_numpy(np.dstack([vis_y, chroma01])).permute(2, 0, 1)
    return torch.from_numpy(prepare_ir(ir))[None], t[:1], t


AUGMENTS = ("scale", "gamma", "contrast")


def check_augment(augment: dict | None) -> dict:
    """``train.augment`` checked: each of ``AUGMENTS`` absent (off) or a range ``[low, high]``, 0 < low <= high."""
    augment = dict(augment or {})
    unknown = sorted(set(augment) - set(AUGMENTS))
    if unknown:
        raise ValueError(f"train.augment: unknown {', '.join(unknown)} (known: {', '.join(AUGMENTS)})")
    for key, value in augment.items():
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and 0 < value[0] <= value[1]):
            raise ValueError(f"train.augment.{key}: expected [low, high] with 0 < low <= high, not {value}")
    return augment


class CropDataset(Dataset):
    """Random crops with flips; half of the crops of labelled pairs are centred on an object. With ``rows`` each
    item ends with the crop's row map at 1/8 in the whole frame (``window_row_coordinates``, for a ``seg_rows``
    head); ``balanced``: object-centred crops draw the object's class uniformly first (``centred_corner``).
    ``augment`` (``check_augment``; default none): ``scale`` resizes the whole pair by a uniform factor before
    cropping (``rescaled``), ``gamma`` / ``contrast`` jitter the IR and the visible luminance independently
    (``jitter``; the chroma is kept). They draw from their own streams, so the crops are those without them."""

    def __init__(self, samples: list[Sample], crop: int = 160, length: int = 2000, seed: int = 0,
                 rows: bool = False, balanced: bool = False, augment: dict | None = None):
        self.augment = check_augment(augment)
        self.samples = [s for s in samples if min(s.ir.shape[:2]) >= crop]
        if not self.samples:
            raise ValueError(f"no training pair is at least {crop}x{crop}")
        self.crop, self.length, self.seed, self.rows, self.balanced = crop, length, seed, rows, balanced

    def __len__(self) -> int:
        return self.length

    def draw(self, index: int) -> tuple[int, Sample, tuple[slice, slice], bool]:
        """The crop of item ``index`` (deterministic for the seed): sample position, the sample (rescaled with
        ``augment.scale``), window, flip."""
        rng = np.random.default_rng((self.seed, index))
        i = int(rng.integers(len(self.samples)))
        s = self.samples[i]
        if "scale" in self.augment:
            s = rescaled(s, np.random.default_rng((self.seed, index, 1)).uniform(*self.augment["scale"]), self.crop)
        return (i, s, *random_window(s, self.crop, rng, self.balanced))

    def tensors(self, index: int, ir: np.ndarray, vis: np.ndarray):
        """``to_tensors`` of a crop, with the photometric jitter of ``augment`` (visible YCrCb's Y = the jittered
        luminance, its chroma unchanged)."""
        ir_t, vis_y, ycrcb = to_tensors(ir, vis)
        if "gamma" in self.augment or "contrast" in self.augment:
            rng = np.random.default_rng((self.seed, index, 2))
            ir_t = jitter(ir_t, rng, self.augment.get("gamma"), self.augment.get("contrast"))
            vis_y = jitter(vis_y, rng, self.augment.get("gamma"), self.augment.get("contrast"))
            ycrcb = torch.cat([vis_y, ycrcb[1:]])
        return ir_t, vis_y, ycrcb

    def row_map(self, s: Sample, window: tuple[slice, slice]) -> tuple:
        """(the window's row map,) with ``rows``, else ()."""
        grid = -(-self.crop // 8)
        return (window_row_coordinates(window[0].start, s.ir.shape[0], (grid, grid)),) if self.rows else ()

    def __getitem__(self, index: int):
        _, s, window, flip = self.draw(index)
        ir, vis, target = crop_sample(s, window, flip)
        return (*self.tensors(index, ir, vis), torch.from_numpy(target).long(), *self.row_map(s, window))


def rescaled(s: Sample, factor: float, crop: int = 0) -> Sample:
    """The pair resized as a whole by ``factor`` (at least ``crop`` pixels on each side; sizes rounded to a
    multiple of the teacher targets' scale): images by area (shrinking) or bilinear, class ids and target weights
    by nearest neighbour, soft targets bilinear, boxes scaled."""
    h, w = s.ir.shape[:2]
    factor = max(factor, crop / min(h, w))
    size = tuple(max(crop, int(round(n * factor / s.scale)) * s.scale) for n in (w, h))  # (width, height)
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    fx, fy = size[0] / w, size[1] / h
    soft = weight = None
    if s.soft is not None:
        small = (size[0] // s.scale, size[1] // s.scale)
        planes = cv2.resize(np.ascontiguousarray(s.soft.transpose(1, 2, 0), np.float32), small,
                            interpolation=cv2.INTER_LINEAR).reshape(small[1], small[0], -1)
        soft = np.ascontiguousarray(planes.transpose(2, 0, 1), np.float16)
        weight = cv2.resize(s.weight.astype(np.float32), small, interpolation=cv2.INTER_NEAREST).astype(np.float16)
    return Sample(s.stem, cv2.resize(s.ir, size, interpolation=interp), cv2.resize(s.vis, size, interpolation=interp),
                  None if s.target is None else cv2.resize(s.target, size, interpolation=cv2.INTER_NEAREST),
                  None if s.boxes is None else [(c, x0 * fx, y0 * fy, x1 * fx, y1 * fy) for c, x0, y0, x1, y1 in s.boxes],
                  soft, weight, s.scale)


def jitter(x: torch.Tensor, rng: np.random.Generator, gamma=None, contrast=None) -> torch.Tensor:
    """An image in [0, 1] raised to a gamma drawn log-uniformly in ``gamma``, then its contrast about its mean
    scaled by a factor drawn uniformly in ``contrast`` (either range None: skipped), clipped to [0, 1]."""
    if gamma:
        x = x.clamp_min(0.0) ** float(np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]))))
    if contrast:
        mean = x.mean()
        x = ((x - mean) * float(rng.uniform(*contrast)) + mean).clamp(0.0, 1.0)
    return x


def centred_corner(target: np.ndarray | None, shape: tuple[int, int], crop: int, rng: np.random.Generator,
                   balanced: bool = False) -> tuple[int, int]:
    """Top-left corner of a random ``crop`` window, half of the time centred near an object pixel of ``target``
    (any object pixel, or with ``balanced`` a pixel of one of the pair's classes drawn uniformly first, so rare
    classes are seen as often)."""
    h, w = shape
    y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    if target is not None and rng.random() < 0.5:
        objects = (target > 0) & (target != IGNORE)
        present = [c for c in np.unique(target) if 0 < c != IGNORE] if balanced else []
        if present:
            objects = target == present[int(rng.integers(len(present)))]
        ys, xs = np.nonzero(objects)
        if len(ys):
            k = rng.integers(len(ys))
            y = int(np.clip(ys[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, h - crop))
            x = int(np.clip(xs[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, w - crop))
    return y, x


def random_window(s: Sample, crop: int, rng: np.random.Generator,
                  balanced: bool = False) -> tuple[tuple[slice, slice], bool]:
    """A random crop window (``centred_corner``) and a flip flag. With teacher targets the window starts on a
    multiple of their scale."""
    y, x = centred_corner(s.target, s.ir.shape[:2], crop, rng, balanced)
    y, x = y - y % s.scale, x - x % s.scale
    return (slice(y, y + crop), slice(x, x + crop)), bool(rng.random() < 0.5)


def crop_sample(s: Sample, window: tuple[slice, slice], flip: bool):
    """(IR, visible, target) of ``window``, mirrored when ``flip``; unlabelled pairs get an all-IGNORE target."""
    ir, vis = s.ir[window], s.vis[window]
    h, w = ir.shape[:2]
    target = s.target[window] if s.target is not None else np.full((h, w), IGNORE, np.uint8)
    if flip:
        ir, vis, target = ir[:, ::-1], vis[:, ::-1], target[:, ::-1]
    return np.ascontiguousarray(ir), np.ascontiguousarray(vis), np.ascontiguousarray(target)


def attach_teacher(samples: list[Sample], cache: str | Path, rule: dict) -> list[Sample]:
    """Give each sample the cached teacher targets corrected by its boxes (``training.label_rule``, ``rule`` its
    keyword arguments); the hard target becomes their argmax at full resolution (IGNORE where the weight is 0)."""
    from .label_cache import cache_info, read_cache
    from .label_rule import box_consistent_target, rule_labels

    scale = int(cache_info(cache)["scale"])
    for s in samples:
        probs = read_cache(cache, s.stem)
        if probs is None:
            raise FileNotFoundError(f"{cache}: no teacher targets for {s.stem} (run python -m training.label_cache)")
        h, w = s.ir.shape[:2]
        ir_small = cv2.resize(s.ir, (probs.shape[2], probs.shape[1]), interpolation=cv2.INTER_AREA)
        soft, weight = box_consistent_target(probs, s.boxes, ir_small, scale, **rule)
        s.target = cv2.resize(rule_labels(soft, weight), (w, h), interpolation=cv2.INTER_NEAREST)
        s.soft, s.weight, s.scale = soft.astype(np.float16), weight.astype(np.float16), scale
    return samples


class TeacherCropDataset(CropDataset):
    """Crops as ``CropDataset`` plus the teacher's soft targets and weights of the crop (zeros without them)."""

    def __init__(self, samples: list[Sample], crop: int = 160, length: int = 2000, seed: int = 0,
                 num_classes: int = 4, scale: int = 2, rows: bool = False, balanced: bool = False,
                 augment: dict | None = None):
        super().__init__(samples, crop, length, seed, rows, balanced, augment)
        if crop % scale:
            raise ValueError(f"crop {crop} is not a multiple of the teacher targets' scale {scale}")
        self.num_classes, self.scale = num_classes, scale

    def __getitem__(self, index: int):
        _, s, window, flip = self.draw(index)
        ir, vis, target = crop_sample(s, window, flip)
        n = self.crop // self.scale
        if s.soft is None:
            soft, weight = np.zeros((self.num_classes, n, n), np.float32), np.zeros((n, n), np.float32)
        else:
            if s.scale != self.scale:
                raise ValueError(f"{s.stem}: teacher targets at 1/{s.scale}, the dataset expects 1/{self.scale}")
            small = tuple(slice(w.start // s.scale, w.start // s.scale + n) for w in window)
            soft, weight = s.soft[(slice(None), *small)], s.weight[small]
            if flip:
                soft, weight = soft[..., ::-1], weight[..., ::-1]
        return (*self.tensors(index, ir, vis), torch.from_numpy(target).long(),
                torch.from_numpy(np.ascontiguousarray(soft, np.float32)),
                torch.from_numpy(np.ascontiguousarray(weight, np.float32)), *self.row_map(s, window))
