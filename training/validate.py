"""Validation during training: full-resolution fusion metrics and box scores on held-out pairs."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ivf_ros.imageops import merge_luminance, split_luminance
from ivf_ros.metrics import BoxScorer, fusion_metrics, regions_to_boxes, to_gray

from .datasets import Sample, to_tensors

VALIDATION_METRICS = ("EN", "VIF", "Qabf", "SSIM", "SCD")


@torch.no_grad()
def validate(model: torch.nn.Module, samples: list[Sample], classes: list[str], progress: bool = True,
             fusion: bool = True) -> dict:
    """Mean fusion metrics over ``samples`` and, where boxes exist, per class the region F1 (``<class>_f1``) and
    the judge's pixel precision, box recall and F (``<class>_p``, ``<class>_r``, ``<class>_f``) and ``mean_f``.
    ``fusion=False`` skips the fusion metrics (when they cannot change)."""
    model.eval()
    sums = dict.fromkeys(VALIDATION_METRICS, 0.0)
    scorer = BoxScorer(classes)
    has_boxes = False
    for s in tqdm(samples, desc="validate", disable=not progress, leave=False):
        ir, vis_y, _ = to_tensors(s.ir, s.vis)
        fused, logits = model(ir[None], vis_y[None])
        if fusion:  # scored as `ivf eval` scores the served output: colour restored, then gray
            fused_gray = to_gray(merge_luminance(fused[0, 0].numpy(), split_luminance(s.vis)[1]))
            values = fusion_metrics(s.ir.astype(np.float64), to_gray(s.vis), fused_gray, VALIDATION_METRICS)
            for k in VALIDATION_METRICS:
                sums[k] += values[k]
        boxes = s.boxes if s.boxes is not None else label_boxes(s.target, len(classes))
        if boxes is not None:
            has_boxes = True
            scorer.add(logits[0].numpy().argmax(0).astype(np.uint8), boxes)  # NumPy: torch argmax(0) is slow here
    out = {k: v / max(1, len(samples)) for k, v in sums.items()} if fusion else {}
    if has_boxes:
        for name, stats in scorer.summary().items():
            out.update({f"{name}_f1": stats["f1"], f"{name}_p": stats["px_precision"], f"{name}_r": stats["box_recall"],
                        f"{name}_f": stats["f"]})
        out["mean_f"] = scorer.mean_f()
    return out


def label_boxes(target: np.ndarray | None, num_classes: int) -> list | None:
    """Boxes of the connected regions of each class of a pixel-label target (for the judge on pixel-label data)."""
    if target is None:
        return None
    return [(c - 1, *box) for c in range(1, num_classes) for box in regions_to_boxes(target, c)]
