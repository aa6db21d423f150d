"""Estimate the IR -> visible mapping: from point correspondences, or automatically from frame pairs.

Thermal and visible images do not share intensities (a warm wall can be bright in IR and dark in the visible, and
the reverse), but they share *structure*: object outlines, horizons, poles, lane edges. The automatic method works
on structure maps (locally contrast-normalised gradient magnitude, which ignores edge polarity) in three steps:

1. coarse search: isotropic scale x translation. For each scale on a log grid the scaled IR structure map
   (magnitude plus polarity-free orientation channels) is correlated with the visible one at every translation by
   a masked normalised cross-correlation (FFT), so partially overlapping fields of view are handled. The best few
   peaks over scale are kept as hypotheses, with their distinctiveness (how far a peak stands above the other
   translations, in robust standard deviations).
2. verification: the IR is warped with a hypothesis; on a grid of textured patches the displacement to the
   visible structure map is found by normalised cross-correlation within a small radius (weak, ambiguous or
   border peaks are dropped) and RANSAC fits an affine map to these correspondences. The hypothesis with the most
   consistent support wins.
3. dense refinement on the whole frame: Gauss-Newton maximises the correlation of the structure channels of the
   warped IR and the visible frames over their valid overlap (padding masked), coarse to fine, for the full model;
   the perspective terms carry a prior relative to the evidence on the affine terms. Several pairs of one rig are
   pooled into one system.

The result carries its own confidence (:func:`confidence_score`: patch support, stability of the refinement from a
nudged start, verified coverage of the frame, uniqueness of the match at the refined mapping). When it is too low,
or the images share too little structure, :class:`CalibrationError` says so instead of returning a guess.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .imageops import write_image
from .registration import Registration

MODELS = ("homography", "affine")


class CalibrationError(ValueError):
    """The mapping cannot be estimated (too few points, too little shared structure, bad input)."""


# ----------------------------------------------------------------------------------------------- image helpers

def to_gray(img: np.ndarray) -> np.ndarray:
    """Any IR / visible image -> float32 gray in [0, 1] (uint16 IR is stretched between its 0.5/99.5 percentiles)."""
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY) if img.shape[2] >= 3 else img[..., 0]
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    x = img.astype(np.float32)
    sample = x[np.isfinite(x)].ravel()
    if sample.size == 0:
        raise CalibrationError("image has no finite values")
    lo, hi = np.percentile(sample[:: max(1, sample.size // 50000)], (0.5, 99.5))
    return np.clip((np.nan_to_num(x) - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def structure_map(gray: np.ndarray, sigma: float = 1.0, norm_sigma: float = 12.0, floor: float = 0.5) -> np.ndarray:
    """Polarity-free structure: gradient magnitude divided by its local mean, compressed to [0, 1].

    The local normalisation makes a weak thermal edge and a strong visible edge of the same outline comparable.
    """
    g = gray.astype(np.float32)
    if sigma > 0:
        g = cv2.GaussianBlur(g, (0, 0), sigma)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)
    local = cv2.GaussianBlur(mag, (0, 0), norm_sigma)
    # the floor (relative to the frame's mean gradient) keeps flat, noisy regions (night skies, dark roads) low
    s = mag / (local + floor * float(mag.mean()) + 1e-4)
    return (s / (1.0 + s)).astype(np.float32)


def structure_channels(gray: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """(h, w, 3) float32: structure ``s`` and the polarity-free orientation ``s*cos 2t``, ``s*sin 2t``."""
    g = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), sigma) if sigma > 0 else gray.astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    s = structure_map(gray, sigma)
    mag2 = gx * gx + gy * gy + 1e-12
    c2 = (gx * gx - gy * gy) / mag2  # cos 2t
    s2 = 2 * gx * gy / mag2  # sin 2t
    return np.dstack([s, s * c2, s * s2]).astype(np.float32)


def content_mask(gray: np.ndarray) -> np.ndarray:
    """False on padding: exactly-black regions touching the frame border (left by earlier warps or crops)."""
    zero = (gray <= 0).astype(np.uint8)
    if not zero.any():
        return np.ones(gray.shape, bool)
    n, lab = cv2.connectedComponents(zero, connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    border = border[border > 0]
    pad = np.isin(lab, border)
    # a dark but real image region is not padding: only large, exactly-zero border regions count
    if pad.sum() < 0.002 * gray.size:
        return np.ones(gray.shape, bool)
    return ~cv2.dilate(pad.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def edge_map(gray: np.ndarray, fraction: float = 0.06, sigma: float = 1.5,
             mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean Canny edges with thresholds set per image: the high threshold is the gradient magnitude exceeded by
    ``fraction`` of the (masked) pixels, so dark and bright, thermal and visible frames give similar edge densities."""
    u8 = np.clip(cv2.GaussianBlur(gray.astype(np.float32), (0, 0), sigma) * 255.0, 0, 255).astype(np.uint8)
    gx = cv2.Sobel(u8, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(u8, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)
    vals = mag[mask] if mask is not None else mag.ravel()
    if vals.size == 0:
        return np.zeros(gray.shape, bool)
    high = max(float(np.quantile(vals, 1.0 - fraction)), 8.0)
    e = cv2.Canny(u8, 0.4 * high, high, L2gradient=True) > 0
    if mask is not None:
        e &= mask
    return e


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=interp)


def _diag(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def _warp(img: np.ndarray, H: np.ndarray, size_wh: tuple[int, int], interp=cv2.INTER_LINEAR) -> np.ndarray:
    return cv2.warpPerspective(img, H, size_wh, flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# ----------------------------------------------------------------------------------------------- point fitting

def fit_points(ir_pts, vis_pts, model: str = "homography", ransac_px: float | None = 3.0):
    """Fit ``model`` to IR -> visible point pairs. Returns (3x3 matrix, inlier mask, RMS residual of inliers).

    With ``ransac_px`` and enough points (>= 2x the minimum) outliers are rejected first; the final matrix is
    a least-squares fit (refined by Levenberg-Marquardt) on the inliers, so exact correspondences are recovered
    exactly.
    """
    if model not in MODELS:
        raise CalibrationError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    src = np.asarray(ir_pts, np.float64).reshape(-1, 2)
    dst = np.asarray(vis_pts, np.float64).reshape(-1, 2)
    if src.shape != dst.shape:
        raise CalibrationError("IR and visible point lists differ in length")
    need = 4 if model == "homography" else 3
    if len(src) < need:
        raise CalibrationError(f"a {model} needs at least {need} point pairs, got {len(src)}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise CalibrationError("point coordinates must be finite numbers")
    robust = ransac_px is not None and len(src) >= 2 * need
    inl = np.ones(len(src), bool)
    if robust:
        if model == "homography":
            M, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransac_px, maxIters=4000, confidence=0.999)
        else:
            M, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ransac_px,
                                           maxIters=4000, confidence=0.999)
        if M is None:
            raise CalibrationError("no consistent mapping found in the point pairs")
        inl = mask.ravel().astype(bool)
        if inl.sum() < need:
            raise CalibrationError("too few consistent point pairs")
    s, d = src[inl], dst[inl]
    if model == "homography":
        M = _dlt(s, d)
    else:
        A = np.hstack([s, np.ones((len(s), 1))])
        sol, *_ = np.linalg.lstsq(A, d, rcond=None)
        M = np.vstack([sol.T, [0.0, 0.0, 1.0]])
    M = np.asarray(M, np.float64)
    if M.shape == (2, 3):
        M = np.vstack([M, [0.0, 0.0, 1.0]])
    if abs(np.linalg.det(M)) < 1e-12 or not np.all(np.isfinite(M)):
        raise CalibrationError("point pairs are degenerate (collinear or repeated points)")
    res = project(M, s) - d
    rms = float(np.sqrt(np.mean(np.sum(res ** 2, axis=1))))
    return M / M[2, 2], inl, rms


def _normalizer(p: np.ndarray) -> np.ndarray:
    c = p.mean(axis=0)
    d = np.sqrt(((p - c) ** 2).sum(axis=1)).mean()
    k = np.sqrt(2.0) / d if d > 1e-12 else 1.0
    return np.array([[k, 0, -k * c[0]], [0, k, -k * c[1]], [0, 0, 1.0]])


def _dlt(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares homography by the normalised direct linear transform (exact for exact correspondences)."""
    Ts, Td = _normalizer(src), _normalizer(dst)
    s = project(Ts, src)
    d = project(Td, dst)
    n = len(s)
    A = np.zeros((2 * n, 9))
    A[0::2, 0:2], A[0::2, 2] = s, 1.0
    A[0::2, 6:8] = -d[:, :1] * s
    A[0::2, 8] = -d[:, 0]
    A[1::2, 3:5], A[1::2, 5] = s, 1.0
    A[1::2, 6:8] = -d[:, 1:] * s
    A[1::2, 8] = -d[:, 1]
    _, sv, vt = np.linalg.svd(A)
    if sv[-2] < 1e-9 * sv[0]:
        raise CalibrationError("point pairs are degenerate (collinear or repeated points)")
    Hn = vt[-1].reshape(3, 3)
    H = np.linalg.inv(Td) @ Hn @ Ts
    if abs(H[2, 2]) < 1e-12:
        raise CalibrationError("point pairs are degenerate")
    return H / H[2, 2]


def project(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    p = np.hstack([pts, np.ones((len(pts), 1))]) @ np.asarray(H, np.float64).T
    return p[:, :2] / p[:, 2:3]


def grid_error(H: np.ndarray, H_ref: np.ndarray, vis_wh: tuple[int, int], step: float = 16) -> tuple[float, float]:
    """Mean and max distance (visible px) between two IR -> visible mappings over a ``step``-px grid of the visible
    frame (the grid points are mapped back into the IR frame by ``H_ref``)."""
    gx, gy = np.meshgrid(np.arange(0, vis_wh[0], step), np.arange(0, vis_wh[1], step))
    v = np.c_[gx.ravel(), gy.ravel()].astype(np.float64)
    ir_pts = project(np.linalg.inv(H_ref), v)
    e = np.linalg.norm(project(H, ir_pts) - project(H_ref, ir_pts), axis=1)
    return float(e.mean()), float(e.max())


def read_points_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """CSV of point pairs: ``ir_x, ir_y, vis_x, vis_y`` per row; a header row and ``#`` comments are allowed."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such points file")
    rows = []
    with path.open(newline="") as fh:
        for i, row in enumerate(csv.reader(fh), 1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells or cells[0].startswith("#"):
                continue
            try:
                vals = [float(c) for c in cells]
            except ValueError:
                if not rows:
                    continue  # header
                raise CalibrationError(f"{path}:{i}: not a number in {row}") from None
            if len(vals) != 4:
                raise CalibrationError(f"{path}:{i}: expected 4 values (ir_x, ir_y, vis_x, vis_y), got {len(vals)}")
            rows.append(vals)
    if not rows:
        raise CalibrationError(f"{path}: no point pairs")
    a = np.asarray(rows, np.float64)
    return a[:, :2], a[:, 2:]


def calibrate_from_points(ir_pts, vis_pts, ir_size, vis_size, model: str = "homography",
                          ransac_px: float | None = 3.0) -> tuple[Registration, dict]:
    """Registration from point pairs given in full-resolution pixels of images of ``ir_size``/``vis_size`` (w, h)."""
    M, inl, rms = fit_points(ir_pts, vis_pts, model, ransac_px)
    n = len(inl)
    info = {"method": f"points-{model}", "points": n, "inliers": int(inl.sum()), "residual_px": rms,
            "confidence": float(inl.mean())}
    reg = Registration(M, tuple(map(int, ir_size)), tuple(map(int, vis_size)), f"points-{model}", round(rms, 4),
                       confidence=round(float(inl.mean()), 4))
    return reg, info


# ----------------------------------------------------------------------------------------------- coarse search

def masked_ncc(fixed: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray | None = None,
               min_overlap: float = 0.3, weighted: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """NCC of ``moving`` shifted by every integer translation over ``fixed`` (masked, so partial overlaps count).

    Returns (ncc, (oy, ox)): ``ncc[i, j]`` is the score for moving's origin placed at fixed's pixel
    ``(i - oy, j - ox)``; translations with overlap below ``min_overlap`` x the smaller image area are -1.
    ``weighted`` multiplies the NCC by sqrt(overlap / fixed area).
    """
    if fixed.ndim == 2:
        fixed = fixed[..., None]
    if moving.ndim == 2:
        moving = moving[..., None]
    hf, wf = fixed.shape[:2]
    hm, wm = moving.shape[:2]
    mm = np.ones((hm, wm), np.float64) if moving_mask is None else moving_mask.astype(np.float64)
    ph, pw = hf + hm - 1, wf + wm - 1
    fsh = (cv2.getOptimalDFTSize(ph), cv2.getOptimalDFTSize(pw))
    flip = lambda a: a[::-1, ::-1]  # correlating with the moving image == convolving with it flipped

    def fft(a):  # OpenCV's packed real spectrum of ``a`` zero-padded to ``fsh`` (faster than numpy's here)
        pad = np.zeros(fsh)
        pad[:a.shape[0], :a.shape[1]] = a
        return cv2.dft(pad)

    ifft = lambda A: cv2.idft(A, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)[:ph, :pw]
    conv = lambda A, B: ifft(cv2.mulSpectrums(A, B, 0))
    F1 = fft(np.ones((hf, wf)))
    Gm = fft(flip(mm))
    n = np.round(conv(F1, Gm))
    nn = np.maximum(n, 1.0)
    # channels: numerators and variances add up, so their cross terms are summed before the inverse transforms
    cross = np.zeros_like(F1)
    mean_terms = np.zeros((ph, pw))
    sq_f = np.zeros((ph, pw))
    sq_m = np.zeros((ph, pw))
    f2 = np.zeros((hf, wf))
    m2 = np.zeros((hm, wm))
    for c in range(fixed.shape[2]):
        f = fixed[..., c].astype(np.float64)
        m = moving[..., c].astype(np.float64) * mm
        Ff = fft(f)
        Gv = fft(flip(m))
        sf, sm = conv(Ff, Gm), conv(F1, Gv)
        cross += cv2.mulSpectrums(Ff, Gv, 0)
        mean_terms += sf * sm
        sq_f += sf * sf
        sq_m += sm * sm
        f2 += f * f
        m2 += m * m
    num = ifft(cross) - mean_terms / nn
    vf = np.maximum(conv(fft(f2), Gm) - sq_f / nn, 0)
    vm = np.maximum(conv(F1, fft(flip(m2))) - sq_m / nn, 0)
    den = np.sqrt(vf * vm)
    ncc = np.where(den > 1e-9 * nn, num / np.maximum(den, 1e-12), 0.0)
    limit = min_overlap * min(hf * wf, float(mm.sum()))
    ncc[n < limit] = -1.0
    if weighted:
        # small overlaps correlate well by chance: weight by the square root of the overlap (a significance score)
        ncc = np.where(ncc > -1.0, ncc * np.sqrt(n / float(hf * wf)), -1.0)
    # conv index k corresponds to moving's last pixel at fixed k -> origin at k - (hm - 1)
    return ncc.astype(np.float32), (hm - 1, wm - 1)


@dataclass
class CoarseResult:
    scale: float  # IR full-resolution px -> visible full-resolution px
    tx: float
    ty: float
    score: float  # peak NCC of structure maps
    distinct: float  # (peak - median) / robust std over all translations, at the best scale
    scores: list = field(default_factory=list)  # (scale, peak) per scale tried
    candidates: list = field(default_factory=list)  # the best few local maxima over scale (CoarseResult), best first

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.scale, 0, self.tx], [0, self.scale, self.ty], [0, 0, 1.0]])


def coarse_search(ir: np.ndarray, vis: np.ndarray, scale_range=(0.55, 1.8), steps_per_octave: int = 10,
                  work_side: int = 200, n_candidates: int = 3) -> CoarseResult:
    """Best isotropic scale + translation (IR full px -> visible full px) by masked NCC of structure maps.

    ``scale_range`` is relative to the scale that fits the IR frame into the visible frame (``min`` of the width
    and height ratios), so the default covers both cameras with the same field of view and quite different ones.
    """
    gi, gv = to_gray(ir), to_gray(vis)
    ci = content_mask(gi).astype(np.float32)
    hv, wv = gv.shape
    hi, wi = gi.shape
    a = min(1.0, work_side / max(hv, wv))
    gv_w = _resize(gv, a)
    sv = structure_channels(gv_w)
    sv[~(_resize(content_mask(gv).astype(np.float32), a) > 0.5)] = 0
    base = min(wv / wi, hv / hi)
    lo, hi_ = (math.log2(base * scale_range[0]), math.log2(base * scale_range[1]))
    n_sc = max(1, int(round((hi_ - lo) * steps_per_octave)) + 1)
    scales = np.exp2(np.linspace(lo, hi_, n_sc)) if n_sc > 1 else np.array([base * scale_range[0]])
    per_scale = []
    for s in scales:
        k = s * a  # IR full px -> visible work px
        gi_w = _resize(gi, k)
        si = structure_channels(gi_w)
        mi = _resize(ci, k) > 0.5
        si[~mi] = 0
        ncc, (oy, ox) = masked_ncc(sv, si, mi, weighted=True)
        idx = int(np.argmax(ncc))
        iy, ix = divmod(idx, ncc.shape[1])
        peak = float(ncc[iy, ix])
        valid = ncc[ncc > -1]
        med = float(np.median(valid))
        mad = float(np.median(np.abs(valid - med))) * 1.4826 + 1e-6
        # sub-pixel peak (parabola) for a better start
        dy = dx = 0.0
        if 0 < iy < ncc.shape[0] - 1 and 0 < ix < ncc.shape[1] - 1:
            c, u, d = ncc[iy, ix], ncc[iy - 1, ix], ncc[iy + 1, ix]
            l, r = ncc[iy, ix - 1], ncc[iy, ix + 1]
            if u > -1 and d > -1 and (u + d - 2 * c) < 0:
                dy = 0.5 * (u - d) / (u + d - 2 * c)
            if l > -1 and r > -1 and (l + r - 2 * c) < 0:
                dx = 0.5 * (l - r) / (l + r - 2 * c)
        # moving's origin (IR work px (0,0)) lands at fixed (iy-oy+dy, ix-ox+dx) in vis work px.
        # pixel centres: ir_work = k * ir_full + (k-1)/2 ; vis_work = a * vis_full + (a-1)/2 (resize convention)
        t_work = np.array([ix - ox + dx, iy - oy + dy])
        t_full = (t_work + (k - 1) / 2 - (a - 1) / 2) / a
        per_scale.append(CoarseResult(float(s), float(t_full[0]), float(t_full[1]), peak, (peak - med) / mad))
    table = [(c.scale, c.score) for c in per_scale]
    # candidates: local maxima of the peak score over scale, best first
    peaks = [c.score for c in per_scale]
    cands = [c for i, c in enumerate(per_scale)
             if (i == 0 or peaks[i] >= peaks[i - 1]) and (i == len(peaks) - 1 or peaks[i] >= peaks[i + 1])]
    cands.sort(key=lambda c: -c.score)
    best = cands[0]
    best.scores = table
    best.candidates = cands[:n_candidates]
    return best


# ----------------------------------------------------------------------------------------------- local matching

def _match_patches(ir: np.ndarray, vis: np.ndarray, H: np.ndarray, work_side: int, radius: int,
                   patch: int = 41, step: int | None = None, min_ncc: float = 0.3, sigma: float = 1.0,
                   min_gap: float = 0.05):
    """Correspondences (IR full px, visible full px, weight) from patch NCC of structure maps around warp ``H``."""
    gi, gv = to_gray(ir), to_gray(vis)
    hv, wv = gv.shape
    a = min(1.0, work_side / max(hv, wv))
    S = _diag(a)
    gv_w = _resize(gv, a)
    hw, ww = gv_w.shape
    Hw = S @ H  # IR full -> vis work
    wi = _warp(gi, Hw, (ww, hw))
    valid = _warp(content_mask(gi).astype(np.uint8), Hw, (ww, hw), cv2.INTER_NEAREST)
    valid = cv2.erode(valid, np.ones((7, 7), np.uint8)).astype(bool)
    valid &= _resize(content_mask(gv).astype(np.float32), a) > 0.5
    sv = structure_channels(gv_w, sigma)
    si = structure_channels(wi, sigma)
    si[~valid] = 0
    half = patch // 2
    step = step or max(8, (patch * 2) // 3)
    m = half + radius
    src, dst, wts = [], [], []
    for y in range(m, hw - m, step):
        for x in range(m, ww - m, step):
            if not valid[y - half:y + half + 1, x - half:x + half + 1].all():
                continue
            t = si[y - half:y + half + 1, x - half:x + half + 1]
            if t[..., 0].std() < 0.05 or (t[..., 0] > 0.5).mean() < 0.02:
                continue
            win = sv[y - m:y + m + 1, x - m:x + m + 1]
            if win[..., 0].std() < 0.05:
                continue
            r = cv2.matchTemplate(win, t, cv2.TM_CCOEFF_NORMED)
            _, pk, _, (px, py) = cv2.minMaxLoc(r)
            if pk < min_ncc or not np.isfinite(pk):
                continue
            if px in (0, r.shape[1] - 1) or py in (0, r.shape[0] - 1):
                continue  # on the border of the search window: the true peak may be outside
            # distinctiveness: second-best peak away from the best
            r2 = r.copy()
            cv2.circle(r2, (px, py), 3, -1.0, -1)
            second = float(r2.max())
            if pk - second < min_gap:
                continue
            c = r[py, px]
            den_x = r[py, px - 1] + r[py, px + 1] - 2 * c
            den_y = r[py - 1, px] + r[py + 1, px] - 2 * c
            sx = 0.5 * (r[py, px - 1] - r[py, px + 1]) / den_x if den_x < 0 else 0.0
            sy = 0.5 * (r[py - 1, px] - r[py + 1, px]) / den_y if den_y < 0 else 0.0
            dx, dy = px - radius + sx, py - radius + sy
            src.append((x, y))
            dst.append((x + dx, y + dy))
            wts.append(pk - second)
    if not src:
        return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)
    src_w = np.asarray(src, np.float64)
    dst_w = np.asarray(dst, np.float64)
    ir_pts = project(np.linalg.inv(Hw), src_w)
    vis_pts = dst_w / a
    return ir_pts, vis_pts, np.asarray(wts)


# ----------------------------------------------------------------------------------------------- dense refinement

def _resize_matrix(shape, small_shape) -> np.ndarray:
    """Full-resolution px -> px of the image resized from ``shape`` to ``small_shape`` (cv2's pixel centres)."""
    ax, ay = small_shape[1] / shape[1], small_shape[0] / shape[0]
    return np.array([[ax, 0, (ax - 1) / 2], [0, ay, (ay - 1) / 2], [0, 0, 1.0]])


def _fill_padding(gray: np.ndarray, mask: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """Padding replaced by a blur of the nearby content, so its border is no edge in the structure maps."""
    if mask.all():
        return gray
    m = mask.astype(np.float32)
    num = cv2.GaussianBlur(gray * m, (0, 0), sigma)
    den = cv2.GaussianBlur(m, (0, 0), sigma)
    fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), float(gray[mask].mean()) if mask.any() else 0.0)
    return np.where(mask, gray, fill).astype(np.float32)


class _Frames:
    """The pairs prepared once for dense refinement: gray frames with padding filled, their content masks, and the
    structure channels per working resolution (cached, so a second refinement reuses them)."""

    def __init__(self, pairs):
        self.vis_shape = pairs[0][1].shape[:2]
        self.data = []
        for ir, vis in pairs:
            gi, gv = to_gray(ir), to_gray(vis)
            mi, mv = content_mask(gi), content_mask(gv)
            self.data.append((_fill_padding(gi, mi), mi, _fill_padding(gv, mv), mv))
        self._cache = {}

    def level(self, side: int, ir_scale_hint: float, sigma: float) -> list:
        """Per pair: (visible channels, visible mask, IR channels, IR mask (uint8), full px -> level px matrices
        of the visible and the IR frame). The IR is resized to about the visible level's pixel size."""
        a = min(1.0, side / max(self.vis_shape))
        k = round(min(1.0, a * ir_scale_hint), 2)
        key = (side, k, sigma)
        if key not in self._cache:
            out = []
            for gi, mi, gv, mv in self.data:
                fv, vm, Sv = _level_features(gv, mv, a, sigma)
                fi, im, Si = _level_features(gi, mi, k, sigma)
                out.append((fv, vm, fi, im.astype(np.uint8), Sv, Si))
            self._cache[key] = out
        return self._cache[key]


def _level_features(gray: np.ndarray, mask: np.ndarray, scale: float, sigma: float):
    """Structure channels of ``gray`` (padding already filled) resized by ``scale``, their valid mask, and the
    full px -> level px matrix."""
    g = _resize(gray, scale)
    m = _resize(mask.astype(np.float32), scale) > 0.99
    m = cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return structure_channels(g, sigma), m, _resize_matrix(gray.shape, g.shape)


def ambiguity(frames: _Frames, H: np.ndarray, side: int = 256) -> float:
    """How well the registered IR matches the visible frame when shifted away from the mapping: the best NCC of their
    structure channels over all translations farther than 4% of the frame, relative to the NCC at the mapping
    (both above the median over translations); pairs pooled. Repeated structure (a facade of identical windows, a
    fence) scores near 1 (one period off matches as well), a unique match near 0. Uses the structure channels
    cached in ``frames`` (the IR's warped by ``H``, as the dense refinement does)."""
    total = None
    levels = frames.level(side, math.sqrt(abs(np.linalg.det(H[:2, :2]))), 1.0)
    for fv, vm, fi, im, Sv, Si in levels:
        hw, ww = fv.shape[:2]
        Hp = Sv @ H @ np.linalg.inv(Si)
        si = cv2.warpPerspective(fi, Hp, (ww, hw), flags=cv2.INTER_LINEAR)
        valid = cv2.warpPerspective(im, Hp, (ww, hw), flags=cv2.INTER_NEAREST).astype(bool) & vm
        si[~valid] = 0
        ncc, _ = masked_ncc(fv, si, valid, weighted=True)
        total = ncc if total is None else total + ncc
    ncc = total / len(levels)
    oy, ox = hw - 1, ww - 1  # zero shift
    valid = ncc[ncc > -1]
    if valid.size == 0:
        return 1.0
    med = float(np.median(valid))
    at = float(ncc[oy - 2:oy + 3, ox - 2:ox + 3].max())
    away = ncc.copy()
    cv2.circle(away, (ox, oy), max(3, int(0.04 * max(hw, ww))), -1.0, -1)
    return float(np.clip((float(away.max()) - med) / max(at - med, 1e-6), 0.0, 2.0))


def _warp_basis(xn: np.ndarray, yn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d(x', y')/d(delta) of the near-identity homography I + D(delta) at normalised points (8 parameters)."""
    z, o = np.zeros_like(xn), np.ones_like(xn)
    bx = np.stack([xn, yn, o, z, z, z, -xn * xn, -xn * yn], axis=-1)
    by = np.stack([z, z, z, xn, yn, o, -xn * yn, -yn * yn], axis=-1)
    return bx, by


def _delta_matrix(d: np.ndarray) -> np.ndarray:
    return np.array([[1 + d[0], d[1], d[2]], [d[3], 1 + d[4], d[5]], [d[6], d[7], 1.0]])


@dataclass
class DenseResult:
    matrix: np.ndarray
    correlation: float  # mean over pairs of the structure-map NCC over the overlap at the finest level
    overlap: float  # share of the visible frame covered by valid IR content (mean over pairs)
    iterations: int


def dense_refine(frames, H: np.ndarray, model: str = "homography", sides=(200, 400, 640), iters: int = 10,
                 max_pixels: int = 80000, prior: float = 0.2) -> DenseResult:
    """Refine the IR -> visible matrix on the whole frame: Gauss-Newton maximising the correlation of the structure
    channels of the warped IR and the visible frames over their valid overlap (black padding masked), coarse to
    fine; several pairs of one rig are pooled into one system. ``frames``: a :class:`_Frames` or a list of (ir, vis)
    pairs. ``model`` affine keeps the last row fixed. Levels larger than ``max_pixels`` use every second pixel in
    each direction."""
    frames = frames if isinstance(frames, _Frames) else _Frames(frames)
    npar = 8 if model == "homography" else 6
    H = np.asarray(H, np.float64) / H[2, 2]
    total = 0
    for li, side in enumerate(sides):
        levels = frames.level(side, math.sqrt(abs(np.linalg.det(H[:2, :2]))), 1.5 if li == 0 else 1.0)
        hw, ww = levels[0][0].shape[:2]
        stride = 2 if hw * ww > max_pixels else 1
        Sv = levels[0][4]
        half = 0.5 * max(hw, ww)
        N = np.array([[1 / half, 0, -(ww - 1) / (2 * half)], [0, 1 / half, -(hw - 1) / (2 * half)], [0, 0, 1.0]])
        ys, xs = np.mgrid[0:hw:stride, 0:ww:stride]
        xn_all = ((xs - (ww - 1) / 2) / half).astype(np.float32)
        yn_all = ((ys - (hw - 1) / 2) / half).astype(np.float32)
        Hw = [Sv @ H @ np.linalg.inv(Si) for *_, Si in levels]  # per pair: IR level px -> vis level px
        for _ in range(iters):
            A = np.zeros((npar, npar))
            b = np.zeros(npar)
            cnt, corrs, cover = 0, [], []
            for (fv, vm, fi, im, _, _), Hp in zip(levels, Hw):
                M = cv2.warpPerspective(fi, Hp, (ww, hw), flags=cv2.INTER_LINEAR)
                valid = cv2.warpPerspective(im, Hp, (ww, hw), flags=cv2.INTER_NEAREST).astype(bool) & vm
                valid = cv2.erode(valid.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)[::stride, ::stride]
                cover.append(float(valid.mean()))
                if valid.sum() < 200:
                    continue
                gx = cv2.Sobel(M, cv2.CV_32F, 1, 0, ksize=3)[::stride, ::stride] / 8.0
                gy = cv2.Sobel(M, cv2.CV_32F, 0, 1, ksize=3)[::stride, ::stride] / 8.0
                Ms, Fs = M[::stride, ::stride][valid], fv[::stride, ::stride][valid]
                gx, gy = gx[valid], gy[valid]
                bx, by = _warp_basis(xn_all[valid], yn_all[valid])
                bx, by = bx[:, :npar], by[:, :npar]
                for c in range(M.shape[2]):
                    m, f = Ms[:, c] - Ms[:, c].mean(), Fs[:, c] - Fs[:, c].mean()
                    sm, sf = m.std() + 1e-6, f.std() + 1e-6
                    m, f = m / sm, f / sf
                    rho = max(float((m * f).mean()), 0.02)
                    if c == 0:
                        corrs.append(float((m * f).mean()))
                    e = f - rho * m
                    k = rho * half / sm
                    J = (gx[:, c:c + 1] * k) * bx + (gy[:, c:c + 1] * k) * by
                    A += (J.T @ J).astype(np.float64)
                    b += (J.T @ e).astype(np.float64)
                    cnt += e.size
            if cnt == 0:
                raise CalibrationError("the estimated mapping leaves no overlap between the IR and visible frames")
            if npar == 8 and prior > 0:
                # a prior on the perspective terms (normalised coordinates), as strong as ``prior`` x the mean
                # evidence on the affine terms: they stay near zero unless the whole frame supports them
                Hn = N @ Hw[0] @ np.linalg.inv(N)
                r = Hn[2, :2] / Hn[2, 2]
                lam = prior * float(np.mean(np.diag(A)[:6]))
                A[6:, 6:] += lam * np.eye(2)
                b[6:] += lam * r
            damp = 1e-6 * np.trace(A) / npar * np.eye(npar)
            try:
                d = np.linalg.solve(A + damp, b)
            except np.linalg.LinAlgError:
                break
            dfull = np.zeros(8)
            dfull[:npar] = d
            E = np.linalg.inv(N) @ _delta_matrix(dfull) @ N
            Einv = np.linalg.inv(E)
            Hw = [Einv @ Hp for Hp in Hw]
            total += 1
            corners = np.array([[0, 0], [ww - 1, 0], [0, hw - 1], [ww - 1, hw - 1]], float)
            step = float(np.abs(project(E, corners) - corners).max())
            if step < 0.02:
                break
        H = np.linalg.inv(Sv) @ Hw[0] @ levels[0][5]
        H /= H[2, 2]
    return DenseResult(H, float(np.mean(corrs)) if corrs else 0.0, float(np.mean(cover)), total)


# ----------------------------------------------------------------------------------------------- auto calibration

@dataclass
class AutoConfig:
    model: str = "homography"
    scale_range: tuple[float, float] = (0.55, 1.8)
    coarse_side: int = 200
    fine_side: int = 640
    ransac_px: float = 2.5  # at fine working resolution
    min_inliers: int = 12
    min_inlier_ratio: float = 0.3
    min_distinct: float = 3.5
    min_confidence: float = 0.5
    verify_patch: int = 41  # patch size (px at half the fine resolution) when verifying a coarse hypothesis
    verify_step: int = 14  # grid step of those patches


def confidence_score(info: dict) -> float:
    """0..1 from the evidence of :func:`calibrate_auto` (see the README for what it means, measured): the patch
    support of the start (consistent-match count and share, coarse distinctiveness), the stability of the dense
    refinement (``spread_px``: how far a nudged start lands, in IR px where ``scale`` > 1), the share of the frame
    where an independent patch check agrees with the mapping, and its uniqueness (``ambiguity``: repeated structure
    matches as well one period away). Thresholds calibrated on known-answer runs with seed 1."""
    support = (min(1.0, info["inliers"] / 40.0) ** 0.5 * min(1.0, info["inlier_ratio"] / 0.6)
               * min(1.0, info["coarse_distinct"] / 8.0) ** 0.5) ** 0.5
    # in IR pixels when the visible camera has the finer ones: no mapping is steadier than the IR pixel grid
    spread = info["spread_px"] / max(1.0, info.get("scale", 1.0))
    stability = float(np.clip((4.5 - spread) / 3.0, 0.0, 1.0))
    coverage = float(np.clip((info["coverage"] - 0.05) / 0.2, 0.0, 1.0))
    unique = float(np.clip((0.95 - info["ambiguity"]) / 0.1, 0.0, 1.0))
    return float(support * stability * coverage * unique)


def _verify_start(pairs, H: np.ndarray, cfg: AutoConfig, log, tag: str = "") -> tuple[np.ndarray, dict, float]:
    """Verify a coarse hypothesis: patch matching (radius 12, half the fine resolution) + RANSAC affine fit.
    Returns (matrix, stats, support score = consistent matches x their share)."""
    vis_long = max(pairs[0][1].shape[:2])
    side = min(vis_long, cfg.fine_side // 2)
    parts = [_match_patches(ir, vis, H, side, 12, patch=cfg.verify_patch, step=cfg.verify_step, min_ncc=0.2,
                            sigma=1.5) for ir, vis in pairs]
    src = np.vstack([p[0] for p in parts])
    dst = np.vstack([p[1] for p in parts])
    stats = {"matches": len(src), "inliers": 0, "inlier_ratio": 0.0}
    if len(src) < cfg.min_inliers:
        log(f"{tag}only {len(src)} patch matches")
        return H, stats, 0.0
    try:
        M, inl, rms = fit_points(src, dst, "affine", cfg.ransac_px * vis_long / side)
    except CalibrationError as exc:
        log(f"{tag}{exc}")
        return H, stats, 0.0
    n_in, ratio = int(inl.sum()), float(inl.mean())
    log(f"{tag}{len(src)} patch matches, {n_in} consistent ({ratio:.0%}), rms {rms:.2f} px (affine)")
    stats.update(inliers=n_in, inlier_ratio=ratio, residual_px=rms)
    return M, stats, n_in * ratio


def verify_mapping(pairs, H: np.ndarray, side: int = 640, radius: int = 4, tol_px: float = 1.5,
                   cells: int = 4) -> dict:
    """Independent check of a mapping over the frame: patch matches (radius ``radius`` at ``side`` px) between the
    registered IR and the visible frames; ``agree`` = share of them within ``tol_px`` (full px) of the mapping,
    ``coverage`` = share of the ``cells`` x ``cells`` regions of the visible frame holding an agreeing match,
    ``residual_px`` = RMS distance (visible px) of the agreeing matches from the mapping (None without any)."""
    hv, wv = pairs[0][1].shape[:2]
    side = min(side, max(hv, wv))
    src, dst = [], []
    for ir, vis in pairs:
        s, d, _ = _match_patches(ir, vis, H, side, radius, patch=41, min_ncc=0.2, sigma=1.0)
        src.append(s)
        dst.append(d)
    src, dst = np.vstack(src), np.vstack(dst)
    if len(src) == 0:
        return {"verify_matches": 0, "agree": 0.0, "coverage": 0.0, "residual_px": None}
    res = np.linalg.norm(project(H, src) - dst, axis=1)
    ok = res <= tol_px * max(hv, wv) / side
    cx = np.clip((dst[ok, 0] * cells / wv).astype(int), 0, cells - 1)
    cy = np.clip((dst[ok, 1] * cells / hv).astype(int), 0, cells - 1)
    return {"verify_matches": int(len(src)), "agree": float(ok.mean()),
            "coverage": len(set(zip(cx.tolist(), cy.tolist()))) / cells ** 2,
            "residual_px": float(np.sqrt(np.mean(res[ok] ** 2))) if ok.any() else None}


def _refuse(detail: str) -> CalibrationError:
    return CalibrationError(f"the IR and visible images share too little structure: {detail}; use frames with clear "
                            "outlines (buildings, poles, road edges, vehicles) or give point pairs with --points")


def calibrate_auto(pairs, config: AutoConfig | None = None, verbose=None) -> tuple[Registration, dict]:
    """Estimate the mapping from one or several (ir, vis) frame pairs of the same rig.

    Each pair's coarse hypotheses (scale/translation) are verified by patch matching and the one with the most
    consistent support wins; it is then refined densely on the whole frame of all pairs pooled. All pairs must
    share the IR size and the visible size (the mapping is one rig's). Raises :class:`CalibrationError` when the
    evidence is too weak (see ``AutoConfig``). ``verbose`` is an optional ``print``-like callable for progress
    lines.
    """
    cfg = config or AutoConfig()
    if cfg.model not in MODELS:
        raise CalibrationError(f"model must be one of {', '.join(MODELS)}, not {cfg.model!r}")
    pairs = list(pairs)
    if not pairs:
        raise CalibrationError("no image pairs given")
    ir_shape, vis_shape = pairs[0][0].shape[:2], pairs[0][1].shape[:2]
    for ir, vis in pairs[1:]:
        if ir.shape[:2] != ir_shape or vis.shape[:2] != vis_shape:
            raise CalibrationError("all pairs must have the same IR size and the same visible size "
                                   f"(got IR {ir.shape[1]}x{ir.shape[0]} vs {ir_shape[1]}x{ir_shape[0]})")
    log = verbose or (lambda *_: None)
    best = None  # (support, H, stats, coarse candidate)
    best_distinct = 0.0
    for i, (ir, vis) in enumerate(pairs):
        coarse = coarse_search(ir, vis, cfg.scale_range, work_side=cfg.coarse_side)
        best_distinct = max(best_distinct, coarse.distinct)
        if coarse.distinct < cfg.min_distinct:
            log(f"pair {i}: no distinct coarse match (distinctiveness {coarse.distinct:.1f})")
            continue
        for cand in coarse.candidates:
            if cand.distinct < cfg.min_distinct or cand.score < 0.6 * coarse.score:
                continue
            tag = f"pair {i} scale {cand.scale:.3f}: "
            log(f"{tag}coarse t=({cand.tx:.1f},{cand.ty:.1f}) ncc {cand.score:.3f} distinct {cand.distinct:.1f}")
            H, stats, support = _verify_start([(ir, vis)], cand.matrix, cfg, log, tag)
            if best is None or support > best[0]:
                best = (support, H, stats, cand)
    if best is None:
        raise _refuse(f"no distinct match in the scale/translation search (best peak {best_distinct:.1f} robust "
                      f"std above the rest, need {cfg.min_distinct:g})")
    support, H, stats, cand = best
    info = {"pairs": len(pairs), "coarse_scale": cand.scale, "coarse_ncc": cand.score,
            "coarse_distinct": cand.distinct, **stats}
    if stats.get("matches", 0) < cfg.min_inliers:
        raise _refuse(f"only {stats.get('matches', 0)} patch match(es) found (need {cfg.min_inliers})")
    if stats.get("inliers", 0) < cfg.min_inliers or stats.get("inlier_ratio", 0.0) < cfg.min_inlier_ratio:
        raise _refuse(f"only {stats.get('inliers', 0)} of {stats.get('matches', 0)} patch matches agree on one "
                      f"mapping (need {cfg.min_inliers} and {cfg.min_inlier_ratio:.0%})")
    # the whole frame, all pairs pooled: dense refinement of the full model from the verified affine start
    H0 = H
    frames = _Frames(pairs)
    sides = (cfg.coarse_side, cfg.fine_side // 2, cfg.fine_side)
    dense = dense_refine(frames, H0, cfg.model, sides=sides)
    H = dense.matrix
    hv, wv = vis_shape
    spread = lambda A, B: grid_error(A, B, (wv, hv), step=max(wv, hv) / 12)[1]
    # stability: the same refinement from a start a few pixels off (1% scale, 3 px shift about the frame centre)
    # must land on the same mapping; where the evidence is weak or ambiguous it does not
    c = np.array([[1.0, 0, wv / 2], [0, 1.0, hv / 2], [0, 0, 1.0]])
    nudge = c @ np.array([[1.01, 0, 3.0], [0, 1.01, -3.0], [0, 0, 1.0]]) @ np.linalg.inv(c)
    other = dense_refine(frames, nudge @ H0, cfg.model, sides=sides[1:])
    check = verify_mapping(pairs, H, cfg.fine_side)
    info.update(model=cfg.model, ambiguity=ambiguity(frames, H), dense_correlation=dense.correlation,
                overlap=dense.overlap, dense_iterations=dense.iterations, moved_px=spread(H0, H),
                scale=float(math.sqrt(abs(np.linalg.det(H[:2, :2])))),
                spread_px=spread(other.matrix, H), **check)
    log(f"dense refinement ({dense.iterations} iterations): structure correlation {dense.correlation:.3f}, moved "
        f"{info['moved_px']:.1f} px from the patch fit, {info['spread_px']:.1f} px from a nudged start; check: "
        f"{check['agree']:.0%} of {check['verify_matches']} patches agree, coverage {check['coverage']:.0%}")
    conf = confidence_score(info)
    info["confidence"] = conf
    info["residual_px"] = check["residual_px"]
    reg = Registration(H, (ir_shape[1], ir_shape[0]), (vis_shape[1], vis_shape[0]), f"auto-{cfg.model}",
                       None if check["residual_px"] is None else round(check["residual_px"], 4),
                       confidence=round(conf, 4))
    if conf < cfg.min_confidence:
        raise _refuse(f"{info['inliers']} consistent patch matches ({info['inlier_ratio']:.0%} of "
                      f"{info['matches']}), {check['agree']:.0%} of the check patches agree over "
                      f"{check['coverage']:.0%} of the frame: confidence {conf:.2f} < {cfg.min_confidence:g}")
    return reg, info


# ----------------------------------------------------------------------------------------------- evaluation + overlay

def edge_alignment(ir_reg: np.ndarray, vis: np.ndarray, valid: np.ndarray | None = None, tol: float = 2.0,
                   work_side: int = 640) -> float:
    """Edge-alignment score of a registered IR frame against the visible frame, chance-corrected.

    Edges (:func:`edge_map`) of both images are compared inside the valid (overlapping) region at ``work_side``
    resolution: the share of IR edge pixels within ``tol`` px of a visible edge (and the reverse) minus the share
    expected by chance (the area within ``tol`` of the other image's edges), divided by 1 minus that chance level;
    the mean of both directions. 0 = no better than unrelated images, 1 = every edge has a partner.
    """
    gi, gv = to_gray(ir_reg), to_gray(vis)
    a = min(1.0, work_side / max(gv.shape))
    gi, gv = _resize(gi, a), _resize(gv, a)
    if valid is None:
        v = np.ones(gv.shape, bool)
    else:
        v = cv2.resize(valid.astype(np.uint8), (gv.shape[1], gv.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    v = cv2.erode(v.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    if v.sum() < 100:
        return 0.0
    ei, ev = edge_map(gi, mask=v), edge_map(gv, mask=v)
    if ei.sum() == 0 or ev.sum() == 0:
        return 0.0
    scores = []
    for e_from, e_to in ((ei, ev), (ev, ei)):
        near = cv2.distanceTransform((~e_to).astype(np.uint8), cv2.DIST_L2, 3) <= tol
        hit = float(near[e_from].mean())
        chance = float(near[v].mean())
        scores.append((hit - chance) / max(1.0 - chance, 1e-6))
    return float(np.mean(scores))


def render_overlay(ir: np.ndarray, vis: np.ndarray, reg: Registration, tiles: int = 8,
                   max_width: int = 1400) -> np.ndarray:
    """BGR picture to judge a registration: left a checkerboard of registered IR / visible, right the registered
    IR's edges (magenta) over the visible image with the visible edges (green); white where they coincide."""
    h, w = vis.shape[:2]
    gi = to_gray(ir)
    reg_ir = reg.apply(gi, (h, w))
    valid = reg.apply(np.ones(gi.shape, np.float32), (h, w)) > 0.5
    gv = to_gray(vis)
    vis_bgr = vis if (vis.ndim == 3 and vis.dtype == np.uint8) else cv2.cvtColor(
        (gv * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    ir_u8 = (reg_ir * 255).astype(np.uint8)
    ir_bgr = cv2.applyColorMap(ir_u8, cv2.COLORMAP_INFERNO)
    ir_bgr[~valid] = 0
    tile = max(1, h // tiles)
    ty = (np.arange(h) // tile)[:, None]
    tx = (np.arange(w) // tile)[None, :]
    checker = ((ty + tx) % 2).astype(bool)
    left = vis_bgr.copy()
    left[checker & valid] = ir_bgr[checker & valid]
    a = min(1.0, 640 / max(h, w))
    vw = cv2.erode(_resize(valid.astype(np.uint8), a), np.ones((5, 5), np.uint8)) > 0
    ei = edge_map(_resize(reg_ir, a), mask=vw)
    ev = edge_map(_resize(gv, a))
    ei = cv2.resize(ei.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    ev = cv2.resize(ev.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    k = max(1, int(round(1.0 / a)))
    if k > 1:  # keep lines visible after the picture is scaled down
        ei = cv2.dilate(ei.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
        ev = cv2.dilate(ev.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
    right = (cv2.cvtColor((gv * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR) * 0.45).astype(np.uint8)
    right[ev] = (0, 200, 0)
    right[ei] = (255, 0, 255)
    right[ei & ev] = (255, 255, 255)
    out = np.hstack([left, np.full((h, max(4, w // 200), 3), 255, np.uint8), right])
    if out.shape[1] > max_width:
        out = _resize(out, max_width / out.shape[1])
    return out


def write_overlay(path: str | Path, ir: np.ndarray, vis: np.ndarray, reg: Registration, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, render_overlay(ir, vis, reg, **kw))
