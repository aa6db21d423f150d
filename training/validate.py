"""Validation during training: full-resolution fusion metrics and box scores on held-out pairs."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ivf_ros.imageops import merge_luminance, split_luminance
from ivf_ros.metrics import BoxScorer, fusion_metrics, to_gray

from .datasets import Sample, to_tensors

VALIDATION_METRICS = ("EN", "VIF", "Qabf", "SSIM", "SCD")


@torch.no_grad()
def validate(model: torch.nn.Module, samples: list[Sample], classes: list[str], progress: bool = True) -> dict:
    """Mean fusion metrics over ``samples`` and, where boxes exist, per-class F1 (as ``<class>_f1``)."""
    model.eval()
    sums = dict.fromkeys(VALIDATION_METRICS, 0.0)
    scorer = BoxScorer(classes)
    has_boxes = False
    for s in tqdm(samples, desc="validate", disable=not progress, leave=False):
        ir, vis_y, _ = to_tensors(s.ir, s.vis)
        fused, logits = model(ir[None], vis_y[None])
        # scored as `ivf eval` scores the served output: colour restored, then gray
        fused_gray = to_gray(merge_luminance(fused[0, 0].numpy(), split_luminance(s.vis)[1]))
        values = fusion_metrics(s.ir.astype(np.float64), to_gray(s.vis), fused_gray, VALIDATION_METRICS)
        for k in VALIDATION_METRICS:
            sums[k] += values[k]
        if s.boxes is not None:
            has_boxes = True
            scorer.add(logits[0].argmax(0).numpy().astype(np.uint8), s.boxes)
    out = {k: v / max(1, len(samples)) for k, v in sums.items()}
    if has_boxes:
        out.update({f"{name}_f1": stats["f1"] for name, stats in scorer.summary().items()})
    return out
