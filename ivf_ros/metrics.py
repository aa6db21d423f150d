"""Image-fusion metrics on gray images and box-based scoring of segmentation label maps.

Conventions follow ``../shared/reference/fusion_metrics.json``; every metric there is reproduced to 1e-4 relative.
Of the metrics that compare the fused image with both sources, MI, SCD, VIF and SSIM are sums over IR and visible,
MS_SSIM and CC means, PSNR uses the mean of the two MSEs, and Qabf is joint by definition.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import cv2
import numpy as np

FUSION_METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "MS_SSIM", "CC", "PSNR")

_PEAK = 255.0


# ---------------------------------------------------------------------------------------------------- helpers


# The trivial fusions every evaluation reports beside a model (as in ../shared/reference/fusion_metrics.json):
# gray images in, gray images out. Average fusion rounds half to even, like the reference.
TRIVIAL_FUSIONS = {
    "average": lambda ir, vis: np.round((ir + vis) / 2.0),
    "max": np.maximum,
}


def to_gray(img: np.ndarray) -> np.ndarray:
    """uint8 gray or BGR image -> float64 gray, Y = 0.299 R + 0.587 G + 0.114 B rounded to integers."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return img.astype(np.float64)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected a gray or BGR image, got shape {img.shape}")
    b, g, r = (img[..., i].astype(np.float64) for i in range(3))
    return np.round(0.299 * r + 0.587 * g + 0.114 * b)


def _levels(img: np.ndarray) -> np.ndarray:
    """Integer gray levels 0..255 (rounded and clipped) for histogram-based metrics."""
    return np.clip(np.round(img), 0, 255).astype(np.intp)


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of a histogram of any shape and scale."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """MI in bits from the 256x256 joint histogram of integer levels."""
    joint = np.bincount((_levels(a) * 256 + _levels(b)).ravel(), minlength=256 * 256).reshape(256, 256)
    return entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images (MATLAB ``corr2``); 0 when either is constant."""
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian; its outer product is MATLAB's ``fspecial('gaussian', size, sigma)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def _filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable filtering with ``kernel`` in both axes, keeping only the 'valid' region (no padding used)."""
    r = len(kernel) // 2
    out = cv2.sepFilter2D(img, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return out[r : img.shape[0] - r, r : img.shape[1] - r]


# ---------------------------------------------------------------------------------------------------- single-image


def _spatial_frequency(f: np.ndarray) -> float:
    rf = np.square(np.diff(f, axis=1)).sum()
    cf = np.square(np.diff(f, axis=0)).sum()
    return math.sqrt((rf + cf) / f.size)


def _average_gradient(f: np.ndarray) -> float:
    gy, gx = np.gradient(f)  # central differences inside, one-sided at borders (as MATLAB gradient)
    m, n = f.shape
    return float(np.sqrt((gx * gx + gy * gy) / 2).sum() / ((m - 1) * (n - 1)))


# ---------------------------------------------------------------------------------------------------- pyramids

class _Level(NamedTuple):
    """One pyramid level: the image and its local statistics under ``kernel`` (valid region)."""

    kernel: np.ndarray
    image: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def _level(img: np.ndarray, kernel: np.ndarray) -> _Level:
    mean = _filter_valid(img, kernel)
    return _Level(kernel, img, mean, _filter_valid(img * img, kernel) - mean * mean)


def _covariance(x: _Level, y: _Level) -> np.ndarray:
    return _filter_valid(x.image * y.image, x.kernel) - x.mean * y.mean


# ---------------------------------------------------------------------------------------------------- VIF

# Scale s (0..3) uses a (2^(4-s)+1)-tap Gaussian with sigma = size / 5.
_VIF_KERNELS = tuple(_gaussian_kernel(2 ** (4 - s) + 1, (2 ** (4 - s) + 1) / 5) for s in range(4))


def _vif_pyramid(img: np.ndarray) -> list[_Level]:
    """Levels of the VIF pyramid: each scale is the previous one filtered (valid region) and decimated by 2.

    Small images stop before a level smaller than its kernel.
    """
    levels = []
    for scale, kernel in enumerate(_VIF_KERNELS):
        if scale:
            img = _filter_valid(img, kernel)[::2, ::2]
        if min(img.shape) < len(kernel):
            break
        levels.append(_level(img, kernel))
    return levels


def _vif(ref: list[_Level], dist: list[_Level], sigma_n2: float = 2.0) -> float:
    """Pixel-domain multiscale VIF (Sheikh & Bovik 2006) of the distorted (fused) image against a reference."""
    eps = 1e-10
    num = den = 0.0
    for r, d in zip(ref, dist):
        s1, s2 = np.maximum(r.var, 0), np.maximum(d.var, 0)
        s12 = _covariance(r, d)
        # The gain g is zeroed where either image is flat or the covariance is negative; there the term is 0.
        informative = (s1 >= eps) & (s2 >= eps) & (s12 > 0)
        g = np.divide(s12, s1 + eps, out=np.zeros_like(s12), where=informative)
        noise = np.maximum(s2 - g * s12, eps)
        num += np.log1p(g * g * s1 / (noise + sigma_n2)).sum()
        den += np.log1p(np.where(s1 >= eps, s1, 0) / sigma_n2).sum()
    return float(num / den) if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- Qabf

# MATLAB conv2 flips the kernels: these are the correlation kernels equivalent to conv2 with
# [-1 0 1; -2 0 2; -1 0 1] (x) and [1 2 1; 0 0 0; -1 -2 -1] (y).
_SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
_SOBEL_Y = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], dtype=np.float64)


def _edge_strength_orientation(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel magnitude and orientation atan(gy/gx) (pi/2 where gx = 0), zero padding."""
    gx = cv2.filter2D(img, cv2.CV_64F, _SOBEL_X, borderType=cv2.BORDER_CONSTANT)
    gy = cv2.filter2D(img, cv2.CV_64F, _SOBEL_Y, borderType=cv2.BORDER_CONSTANT)
    zero = gx == 0
    angle = np.arctan(gy / np.where(zero, 1.0, gx))
    angle[zero] = math.pi / 2
    return np.hypot(gx, gy), angle


def _edge_preservation(g_src, a_src, g_f, a_f) -> np.ndarray:
    """Per-pixel Q^{AF}: product of the sigmoid-mapped strength and orientation preservation."""
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    high = np.maximum(g_src, g_f)
    strength = np.divide(np.minimum(g_src, g_f), high, out=np.ones_like(high), where=high > 0)
    orientation = 1 - np.abs(a_src - a_f) / (math.pi / 2)
    return tg / (1 + np.exp(kg * (strength - dg))) * ta / (1 + np.exp(ka * (orientation - da)))


def _qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Xydeas-Petrovic edge-preservation metric Q^{AB/F}."""
    ga, aa = _edge_strength_orientation(a)
    gb, ab = _edge_strength_orientation(b)
    gf, af = _edge_strength_orientation(f)
    num = (_edge_preservation(ga, aa, gf, af) * ga + _edge_preservation(gb, ab, gf, af) * gb).sum()
    den = (ga + gb).sum()
    return float(num / den) if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- SSIM

_SSIM_KERNEL = _gaussian_kernel(11, 1.5)
_C1 = (0.01 * _PEAK) ** 2
_C2 = (0.03 * _PEAK) ** 2
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 box average then every second pixel (MATLAB imfilter 'symmetric' with ones(2)/4, then 1:2:end)."""
    m, n = img.shape
    img = np.pad(img, ((0, m % 2), (0, n % 2)), mode="edge")
    return (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2]) / 4


def _ssim_pyramid(img: np.ndarray, scales: int) -> list[_Level]:
    """Up to ``scales`` levels, stopping before one smaller than the SSIM window."""
    levels = []
    for scale in range(scales):
        if scale:
            img = _halve(img)
            if min(img.shape) < len(_SSIM_KERNEL):
                break
        levels.append(_level(img, _SSIM_KERNEL))
    return levels


def _ssim_terms(x: list[_Level], y: list[_Level]) -> list[tuple[float, float]]:
    """Per level: (mean SSIM, mean contrast-structure term) over the valid region (Wang et al. 2004)."""
    terms = []
    for lx, ly in zip(x, y):
        mx, my = lx.mean, ly.mean
        cs = (2 * _covariance(lx, ly) + _C2) / (lx.var + ly.var + _C2)
        luminance = (2 * mx * my + _C1) / (mx * mx + my * my + _C1)
        terms.append((float((luminance * cs).mean()), float(cs.mean())))
    return terms


def _ms_ssim(terms: list[tuple[float, float]]) -> float:
    """Multi-scale SSIM (Wang et al. 2003): contrast-structure terms of the finer levels, SSIM of the coarsest.

    The weights are used as published (they sum to 1.0001, not 1). Images too small for all five levels use the
    levels that fit, their weights scaled to the same sum. A negative factor keeps its sign.
    """
    used = _MS_SSIM_WEIGHTS[: len(terms)]
    weights = np.array(used) * (sum(_MS_SSIM_WEIGHTS) / sum(used))
    factors = [cs for _, cs in terms[:-1]] + [terms[-1][0]]
    return float(np.prod([np.sign(v) * abs(v) ** w for v, w in zip(factors, weights)]))


def _psnr(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    mse = (np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2
    return float(10 * math.log10(_PEAK**2 / mse)) if mse > 0 else math.inf


# ---------------------------------------------------------------------------------------------------- public


def fusion_metrics(ir, vis, fused, names=FUSION_METRICS) -> dict[str, float]:
    """Fusion metrics of ``fused`` from sources ``ir`` and ``vis`` (gray, 0..255, same size).

    Histogram metrics (EN, MI) use the images rounded to integer levels. Pyramids of the fused image are shared
    between the two sources, and SSIM is the first level of MS-SSIM.
    """
    a, b, f = (np.asarray(img, dtype=np.float64) for img in (ir, vis, fused))
    if not (a.ndim == b.ndim == f.ndim == 2) or not (a.shape == b.shape == f.shape):
        raise ValueError(f"need three gray images of one size, got {a.shape}, {b.shape}, {f.shape}")
    if min(f.shape) < len(_VIF_KERNELS[0]):
        raise ValueError(f"images of {f.shape[1]}x{f.shape[0]} are too small for the metrics (17 px at least)")
    unknown = set(names) - set(FUSION_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(FUSION_METRICS)}")
    ssim_scales = len(_MS_SSIM_WEIGHTS) if "MS_SSIM" in names else 1
    vif_pyramid = functools.cache(lambda img_id: _vif_pyramid((a, b, f)[img_id]))
    ssim_pyramid = functools.cache(lambda img_id: _ssim_pyramid((a, b, f)[img_id], ssim_scales))
    ssim_terms = functools.cache(lambda src: _ssim_terms(ssim_pyramid(src), ssim_pyramid(2)))
    compute = {
        "EN": lambda: entropy(np.bincount(_levels(f).ravel(), minlength=256)),
        "SD": lambda: float(f.std()),
        "SF": lambda: _spatial_frequency(f),
        "AG": lambda: _average_gradient(f),
        "MI": lambda: _mutual_information(a, f) + _mutual_information(b, f),
        "SCD": lambda: _corr(f - b, a) + _corr(f - a, b),
        "VIF": lambda: _vif(vif_pyramid(0), vif_pyramid(2)) + _vif(vif_pyramid(1), vif_pyramid(2)),
        "Qabf": lambda: _qabf(a, b, f),
        "SSIM": lambda: ssim_terms(0)[0][0] + ssim_terms(1)[0][0],
        "MS_SSIM": lambda: (_ms_ssim(ssim_terms(0)) + _ms_ssim(ssim_terms(1))) / 2,
        "CC": lambda: (_corr(a, f) + _corr(b, f)) / 2,
        "PSNR": lambda: _psnr(a, b, f),
    }
    return {name: compute[name]() for name in names}


# ---------------------------------------------------------------------------------------------------- boxes

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; pixel (row i, column j) spans [j, j+1) x [i, i+1)


def regions_to_boxes(labels: np.ndarray, class_id: int, min_area: int = 20) -> list[Box]:
    """Bounding boxes of the 8-connected regions of ``class_id`` with at least ``min_area`` pixels."""
    mask = (np.asarray(labels) == class_id).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [
        (float(x), float(y), float(x + w), float(y + h))
        for x, y, w, h, area in stats[1:]  # row 0 is the background of the mask
        if area >= min_area
    ]


def box_iou(p: Box, q: Box) -> float:
    w = min(p[2], q[2]) - max(p[0], q[0])
    h = min(p[3], q[3]) - max(p[1], q[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return inter / union


def match_boxes(predicted: list[Box], truth: list[Box], threshold: float = 0.5) -> int:
    """Number of one-to-one matches with IoU >= ``threshold``, taken greedily by decreasing IoU."""
    pairs = sorted(
        ((box_iou(p, t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(truth)), reverse=True
    )
    used_p, used_t = set(), set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return len(used_p)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


JUDGE_GROW, JUDGE_HIT_SHARE = 4, 0.2  # the segmentation judge: boxes grown by 4 px, a box found at 20%


class BoxScorer:
    """Scores label maps against ground-truth boxes, accumulated over images.

    A box of YOLO class ``c`` belongs to label id ``c + 1`` (id 0 is background). Predicted boxes are the
    bounding boxes of each class's connected regions (``min_area`` pixels or more), matched one-to-one to the
    boxes of the same class at IoU >= ``iou_threshold``. ``coverage`` is the mean, over ground-truth boxes, of
    the fraction of the box's pixels (pixel centres inside the box) labelled with the box's class.
    Undefined ratios (nothing predicted, no boxes) are reported as 0.

    The judge (pixel precision, box recall, F): ``px_precision`` is the share of pixels labelled c lying inside a
    box of class c grown by ``grow`` px; ``box_recall`` the share of c-boxes with at least ``hit_share`` of their
    pixels labelled c; ``f`` their harmonic mean; ``false_ppm`` the pixels labelled c outside every grown c-box per
    million pixels outside them. ``mean_f()`` is the mean F over the classes (background left out).
    """

    def __init__(self, classes: list[str], min_area: int = 20, iou_threshold: float = 0.5, grow: int = JUDGE_GROW,
                 hit_share: float = JUDGE_HIT_SHARE):
        if len(classes) < 2:
            raise ValueError("BoxScorer needs the background and at least one class")
        self.classes = list(classes)
        self.min_area = min_area
        self.iou_threshold = iou_threshold
        self.grow, self.hit_share = grow, hit_share
        self._coverage = [[] for _ in self.classes]
        self.per_image: list[np.ndarray] = []  # per added image: classes x (tp, fp, fn)
        # per added image: classes x (labelled, inside, hit, boxes, outside)
        self.judge_per_image: list[np.ndarray] = []
        self.judge_counts = np.zeros((len(self.classes), 5), np.int64)  # their sum

    def add(self, labels: np.ndarray, boxes) -> None:
        """One image: ``labels`` (H x W class ids) and its boxes [(yolo_class, x0, y0, x1, y1)] in pixels."""
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"labels must be an H x W map of class ids, got shape {labels.shape}")
        truth = [[] for _ in self.classes]
        for yolo_class, *box in boxes:
            class_id = int(yolo_class) + 1
            if not 0 < class_id < len(self.classes):
                raise ValueError(f"box class {yolo_class} has no label id among {len(self.classes) - 1} classes")
            truth[class_id].append(tuple(float(v) for v in box))
        counts = np.zeros((len(self.classes), 3), np.int64)
        judge = np.zeros((len(self.classes), 5), np.int64)
        for class_id in range(1, len(self.classes)):
            predicted = regions_to_boxes(labels, class_id, self.min_area)
            tp = match_boxes(predicted, truth[class_id], self.iou_threshold)
            counts[class_id] = tp, len(predicted) - tp, len(truth[class_id]) - tp
            coverage = [_box_coverage(labels, class_id, box) for box in truth[class_id]]
            self._coverage[class_id] += coverage
            mine = labels == class_id
            inside = _box_union(labels.shape, truth[class_id], self.grow)
            judge[class_id] = (int(mine.sum()), int((mine & inside).sum()), sum(c >= self.hit_share for c in coverage),
                               len(coverage), int(inside.size - inside.sum()))
        self.per_image.append(counts)
        self.judge_per_image.append(judge)
        self.judge_counts += judge

    def summary(self) -> dict[str, dict]:
        """Per class (background left out): tp, fp, fn, precision, recall, f1, coverage."""
        totals = np.sum(self.per_image, axis=0) if self.per_image else np.zeros((len(self.classes), 3), np.int64)
        result = {}
        for class_id, name in enumerate(self.classes[1:], start=1):
            tp, fp, fn = (int(v) for v in totals[class_id])
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            coverage = self._coverage[class_id]
            result[name] = {
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "precision": precision,
                "recall": recall,
                "f1": _ratio(2 * precision * recall, precision + recall),
                "coverage": float(np.mean(coverage)) if coverage else 0.0,
                **self._judge(class_id),
            }
        return result

    def _judge(self, class_id: int) -> dict:
        labelled, inside, hit, boxes, outside = (int(v) for v in self.judge_counts[class_id])
        precision, recall = _ratio(inside, labelled), _ratio(hit, boxes)
        return {"px_precision": precision, "box_recall": recall, "f": _ratio(2 * precision * recall, precision + recall),
                "false_ppm": 1e6 * _ratio(labelled - inside, outside)}

    def mean_f(self) -> float:
        """Mean judge F over the classes (background left out)."""
        return float(np.mean([self._judge(c)["f"] for c in range(1, len(self.classes))]))

    def report(self) -> dict:
        """What every evaluation reports: ``{"classes": summary(), "mean_f": mean_f()}``."""
        return {"classes": self.summary(), "mean_f": self.mean_f()}


def _bootstrap(n: int, resamples: int, seed: int) -> np.ndarray:
    """resamples x n image indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _same_images(scorer: BoxScorer, reference: BoxScorer | None) -> None:
    if reference is not None and len(reference.per_image) != len(scorer.per_image):
        raise ValueError("the reference scorer must have scored the same images")


def f1_interval(scorer: BoxScorer, name: str, reference: BoxScorer | None = None, resamples: int = 2000,
                level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval (over images) of the F1 of class ``name``; with ``reference`` (scored on the same images),
    of the paired difference F1(scorer) - F1(reference)."""
    _same_images(scorer, reference)
    class_id = scorer.classes.index(name)
    picks = _bootstrap(len(scorer.per_image), resamples, seed)

    def f1(s: BoxScorer) -> np.ndarray:  # resamples x images x (tp, fp, fn) -> F1 per resample
        tp, fp, fn = np.stack([c[class_id] for c in s.per_image]).astype(np.float64)[picks].sum(1).T
        return np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)

    return _interval(f1(scorer) - (f1(reference) if reference is not None else 0.0), level)


def mean_f_interval(scorer: BoxScorer, reference: BoxScorer | None = None, resamples: int = 2000,
                    level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval (over images) of the judge's mean F; with ``reference`` (scored on the same images), of
    the paired difference mean F(scorer) - mean F(reference)."""
    _same_images(scorer, reference)
    picks = _bootstrap(len(scorer.per_image), resamples, seed)

    def mean_f(s: BoxScorer) -> np.ndarray:  # resamples: the judge's counts summed over the drawn images
        labelled, inside, hit, boxes, _ = np.moveaxis(np.stack(s.judge_per_image)[:, 1:][picks].sum(1), -1, 0)
        precision = np.divide(inside, labelled, out=np.zeros(inside.shape), where=labelled > 0)
        recall = np.divide(hit, boxes, out=np.zeros(hit.shape), where=boxes > 0)
        f = np.divide(2 * precision * recall, precision + recall, out=np.zeros(hit.shape),
                      where=precision + recall > 0)
        return f.mean(1)

    return _interval(mean_f(scorer) - (mean_f(reference) if reference is not None else 0.0), level)


def mean_interval(values, reference=None, resamples: int = 2000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-image ``values``; with ``reference`` (the same images' values of
    another model), of the mean paired difference."""
    values = np.asarray(values, np.float64)
    if reference is not None:
        reference = np.asarray(reference, np.float64)
        if reference.shape != values.shape:
            raise ValueError("the reference values must be of the same images")
        values = values - reference
    return _interval(values[_bootstrap(len(values), resamples, seed)].mean(1), level)


def _box_slices(shape: tuple[int, int], box: Box, grow: int = 0) -> tuple[slice, slice]:
    """Rows and columns of the pixels whose centres lie inside ``box`` grown by ``grow`` px on every side."""
    h, w = shape
    x0, y0, x1, y1 = box
    c0, r0, c1, r1 = (int(math.floor(v + 0.5)) for v in (x0 - grow, y0 - grow, x1 + grow, y1 + grow))
    return slice(max(r0, 0), min(r1, h)), slice(max(c0, 0), min(c1, w))


def _box_union(shape: tuple[int, int], boxes: list[Box], grow: int) -> np.ndarray:
    """Mask of the pixels whose centres lie inside any of ``boxes`` grown by ``grow`` px on every side."""
    mask = np.zeros(shape, bool)
    for box in boxes:
        mask[_box_slices(shape, box, grow)] = True
    return mask


def _box_coverage(labels: np.ndarray, class_id: int, box: Box) -> float:
    """Fraction of the pixels whose centres lie inside ``box`` that carry ``class_id`` (0 if none do lie inside)."""
    inside = labels[_box_slices(labels.shape, box)]
    return float((inside == class_id).mean()) if inside.size else 0.0
