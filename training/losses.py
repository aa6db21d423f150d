"""Fusion and segmentation losses (all inputs N x 1 x H x W in [0, 1] unless noted).

The fusion objective follows the intensity + texture recipe of SeAFusion-style unsupervised fusion, plus a
structural (SSIM) term towards both sources:

* intensity: L1 to the element-wise maximum of the sources (keeps warm targets and bright visible content);
* gradient:  L1 between |Sobel(F)| and max(|Sobel(IR)|, |Sobel(VIS)|) (keeps the strongest texture of either);
* ssim:      1 - (SSIM(F, IR) + SSIM(F, VIS)) / 2 (keeps the structure of both);
* gradient_vector (optional): L1 to the gradient vector of the locally dominant source (edge orientation too);
* difference_correlation (optional): 2 - SCD, the sum of correlations of (F - VIS) with IR and (F - IR) with VIS.
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


def fusion_loss(fused: torch.Tensor, ir: torch.Tensor, vis: torch.Tensor, weights: dict) -> dict[str, torch.Tensor]:
    """Weighted fusion loss terms; ``weights`` keys: intensity, gradient, ssim, gradient_vector,
    difference_correlation.
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
    terms["total"] = sum(weights.get(k, 0.0) * v for k, v in terms.items())
    return terms


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None):
    """Cross-entropy over labelled pixels (``IGNORE`` skipped); zero when a batch has no labelled pixel."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE)


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
