"""Fusion and segmentation losses (all inputs N x 1 x H x W in [0, 1] unless noted).

The fusion objective follows the intensity + texture recipe of SeAFusion-style unsupervised fusion, plus a
structural (SSIM) term towards both sources:

* intensity: L1 to the element-wise maximum of the sources (keeps warm targets and bright visible content);
* gradient:  L1 between |Sobel(F)| and max(|Sobel(IR)|, |Sobel(VIS)|) (keeps the strongest texture of either);
* ssim:      1 - (SSIM(F, IR) + SSIM(F, VIS)) / 2 (keeps the structure of both);
* gradient_vector (optional): L1 to the gradient vector of the locally dominant source (edge orientation too);
* difference_correlation (optional): 2 - SCD, the sum of correlations of (F - VIS) with IR and (F - IR) with VIS;
* vif, qabf, ssim_metric (optional): 2 - VIF, 1 - Qabf and 2 - SSIM, the reported metrics themselves (torch
  versions below, per crop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .datasets import IGNORE

def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel (gx, gy) with replicated borders (separable, by slicing: cheap on the CPU)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    smooth_v = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    smooth_h = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
    return smooth_v[..., :, 2:] - smooth_v[..., :, :-2], smooth_h[..., 2:, :] - smooth_h[..., :-2, :]


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    gx, gy = sobel(x)
    return gx.abs() + gy.abs()


def dominant_gradient_loss(fused_grad, ir_grad, vis_grad) -> torch.Tensor:
    """L1 between the fused gradient vector and, per pixel, the gradient vector of the source whose edge is
    stronger: strength and orientation, which is what the Qabf edge-preservation metric measures.
    Arguments: the Sobel (gx, gy) of the fused image, IR and visible."""
    (fx, fy), (ix, iy), (vx, vy) = fused_grad, ir_grad, vis_grad
    ir_wins = ix.abs() + iy.abs() >= vx.abs() + vy.abs()
    return F.l1_loss(fx, torch.where(ir_wins, ix, vx)) + F.l1_loss(fy, torch.where(ir_wins, iy, vy))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM with a uniform window (valid region), single-channel images in [0, 1] (a training loss;
    the reported metric uses the Gaussian-window definition in ivf_ros.metrics)."""
    x = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    box = x.new_full((5, 1, window, window), 1.0 / window**2)  # box mean as a conv: 3x faster than avg_pool2d on CPU
    stats = F.conv2d(x, box, groups=5)
    mu_a, mu_b, aa, bb, ab = stats.unbind(1)
    c1, c2 = 0.01**2, 0.03**2
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of two N x 1 x H x W tensors."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


def difference_correlation_loss(fused: torch.Tensor, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """2 - SCD: what the fused image adds to one source should correlate with the other source."""
    return 2.0 - (_correlation(fused - vis, ir) + _correlation(fused - ir, vis)).mean()


# Loss terms on the reported metrics: term -> (metric, its best value); the loss is best - metric.
METRIC_TERMS = {"vif": ("VIF", 2.0), "qabf": ("Qabf", 1.0), "ssim_metric": ("SSIM", 2.0)}


def fusion_loss(fused: torch.Tensor, ir: torch.Tensor, vis: torch.Tensor, weights: dict) -> dict[str, torch.Tensor]:
    """Weighted fusion loss terms; ``weights`` keys: intensity, gradient, ssim, gradient_vector,
    difference_correlation, vif, qabf, ssim_metric.
    Returns the terms and their weighted sum as 'total'."""
    grads = [sobel(x) for x in (fused, ir, vis)]  # once, for the gradient and gradient_vector terms
    g_fused, g_ir, g_vis = ((gx.abs() + gy.abs()) for gx, gy in grads)
    terms = {
        "intensity": F.l1_loss(fused, torch.maximum(ir, vis)),
        "gradient": F.l1_loss(g_fused, torch.maximum(g_ir, g_vis)),
        "ssim": 1.0 - 0.5 * (ssim(fused, ir) + ssim(fused, vis)),
    }
    if weights.get("gradient_vector"):
        terms["gradient_vector"] = dominant_gradient_loss(*grads)
    if weights.get("difference_correlation"):
        terms["difference_correlation"] = difference_correlation_loss(fused, ir, vis)
    wanted = {k: metric for k, (metric, _) in METRIC_TERMS.items() if weights.get(k)}
    if wanted:
        values = fusion_metrics_torch(ir, vis, fused, tuple(wanted.values()))
        terms.update({k: METRIC_TERMS[k][1] - values[metric].mean() for k, metric in wanted.items()})
    terms["total"] = sum(weights.get(k, 0.0) * v for k, v in terms.items())
    return terms


def hard_target_options(weights: dict) -> tuple[torch.Tensor | None, float]:
    """``loss.class_weights`` (a tensor, or None) and ``loss.hardest`` (checked) for ``segmentation_loss``."""
    hardest = float(weights.get("hardest", 1.0))
    if not 0.0 < hardest <= 1.0:
        raise ValueError(f"loss.hardest {hardest}: must lie in (0, 1]")
    cw = weights.get("class_weights")
    return (torch.tensor(cw, dtype=torch.float32) if cw else None), hardest


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
                      hardest: float = 1.0):
    """Cross-entropy over labelled pixels (``IGNORE`` skipped); zero when a batch has no labelled pixel. With
    ``hardest`` in (0, 1) only that share of the labelled pixels with the highest loss counts (online hard-example
    mining; the class weights weigh the kept pixels, they do not rank them)."""
    labelled = target != IGNORE
    if not labelled.any():
        return logits.sum() * 0.0
    if hardest >= 1.0:
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE)
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")[labelled]
    keep = torch.topk(loss, max(1, int(hardest * loss.numel()))).indices
    if class_weights is None:
        return loss[keep].mean()
    w = class_weights[target[labelled][keep]]
    return (loss[keep] * w).sum() / w.sum()


def soft_segmentation_loss(small_logits: torch.Tensor, soft: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy to soft targets (the teacher's corrected probabilities), at the head's resolution:
    ``soft`` N x C x h x w and ``weight`` N x h x w are area-averaged down to the logits' size. Zero when no
    pixel has weight."""
    size = small_logits.shape[-2:]
    if soft.shape[-2:] != size:
        soft = F.adaptive_avg_pool2d(soft, size)
        weight = F.adaptive_avg_pool2d(weight[:, None], size)[:, 0]
    total = weight.sum()
    if total <= 0:
        return small_logits.sum() * 0.0
    return -(weight * (soft * F.log_softmax(small_logits, dim=1)).sum(1)).sum() / total


# ------------------------------------------------------------------------------------ differentiable metrics
# Torch versions of the reported Qabf, VIF, SSIM and SCD (``ivf_ros.metrics``, gray levels 0..255): the same
# definitions, differentiable where the numpy metric is (a test checks them against it on a real pair).

def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def _filter_valid(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable filtering by the 1-D kernel ``k`` in both axes, valid region only (N x 1 x H x W)."""
    k = k.to(x.dtype)
    return F.conv2d(F.conv2d(x, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))


def _stats(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor):
    """Local means, variances and covariance of x and y under ``k`` (valid region)."""
    mx, my = _filter_valid(x, k), _filter_valid(y, k)
    return (mx, my, _filter_valid(x * x, k) - mx * mx, _filter_valid(y * y, k) - my * my,
            _filter_valid(x * y, k) - mx * my)


_QABF_SOBEL = torch.tensor([[[[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]], [[[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]]]])


def _strength_orientation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = F.conv2d(x, _QABF_SOBEL.to(x.dtype), padding=1)  # zero padding, as the metric
    gx, gy = g[:, :1], g[:, 1:]
    zero = gx == 0
    angle = torch.where(zero, torch.full_like(gx, torch.pi / 2), torch.atan(gy / torch.where(zero, 1.0, gx)))
    return torch.sqrt(gx * gx + gy * gy + 1e-12), angle


def qabf_torch(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Per-image Q^{AB/F} (N values) of fused ``f`` from sources ``a``, ``b`` (N x 1 x H x W, gray 0..255)."""
    (ga, aa), (gb, ab), (gf, af) = (_strength_orientation(x) for x in (a, b, f))

    def preserved(g, angle):
        strength = torch.minimum(g, gf) / torch.maximum(g, gf)
        orientation = 1 - (angle - af).abs() / (torch.pi / 2)
        return 0.9994 / (1 + torch.exp(-15 * (strength - 0.5))) * 0.9879 / (1 + torch.exp(-22 * (orientation - 0.8)))

    num = (preserved(ga, aa) * ga + preserved(gb, ab) * gb).flatten(1).sum(1)
    return num / (ga + gb).flatten(1).sum(1)


_VIF_TORCH_KERNELS = tuple(_gaussian(2 ** (4 - s) + 1, (2 ** (4 - s) + 1) / 5) for s in range(4))


def vif_torch(ref: torch.Tensor, dist: torch.Tensor, sigma_n2: float = 2.0) -> torch.Tensor:
    """Per-image pixel-domain multiscale VIF of ``dist`` against ``ref`` (N x 1 x H x W, gray 0..255)."""
    eps = 1e-10
    num = den = 0.0
    for scale, k in enumerate(_VIF_TORCH_KERNELS):
        if scale:
            ref, dist = _filter_valid(ref, k)[..., ::2, ::2], _filter_valid(dist, k)[..., ::2, ::2]
        if min(ref.shape[-2:]) < len(k):
            break
        _, _, s1, s2, s12 = _stats(ref, dist, k)
        s1, s2 = s1.clamp(min=0), s2.clamp(min=0)
        informative = (s1 >= eps) & (s2 >= eps) & (s12 > 0)
        g = torch.where(informative, s12 / (s1 + eps), torch.zeros_like(s12))
        noise = (s2 - g * s12).clamp(min=eps)
        num = num + torch.log1p(g * g * s1 / (noise + sigma_n2)).flatten(1).sum(1)
        den = den + torch.log1p(torch.where(s1 >= eps, s1, torch.zeros_like(s1)) / sigma_n2).flatten(1).sum(1)
    return num / den


def ssim_torch(a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian 11-tap window, sigma 1.5, valid region) of gray 0..255 images, as reported."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mf, va, vf, cov = _stats(a, f, _gaussian(11, 1.5))
    return ((2 * ma * mf + c1) * (2 * cov + c2) / ((ma * ma + mf * mf + c1) * (va + vf + c2))).flatten(1).mean(1)


def fusion_metrics_torch(ir: torch.Tensor, vis: torch.Tensor, fused: torch.Tensor,
                         names=("VIF", "Qabf", "SSIM", "SCD")) -> dict[str, torch.Tensor]:
    """Per-image ``names`` (of VIF, Qabf, SSIM, SCD) as ``ivf_ros.metrics.fusion_metrics`` reports them, from
    images in [0, 1] (scaled to gray levels here); what the metric loss terms compute."""
    a, b, f = (x * 255.0 for x in (ir, vis, fused))
    compute = {"VIF": lambda: vif_torch(a, f) + vif_torch(b, f), "Qabf": lambda: qabf_torch(a, b, f),
               "SSIM": lambda: ssim_torch(a, f) + ssim_torch(b, f),
               "SCD": lambda: _correlation(f - b, a) + _correlation(f - a, b)}
    return {name: compute[name]() for name in names}
