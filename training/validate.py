"""Validation during training: full-resolution fusion metrics and box scores on held-out pairs."""
from __future__ import annotations

import numpy as np
import torch

from ivf_ros.evaluation import Scored, evaluate, served
from ivf_ros.metrics import regions_to_boxes

from .datasets import Sample, to_tensors

VALIDATION_METRICS = ("EN", "VIF", "Qabf", "SSIM", "SCD")


@torch.no_grad()
def validate(model: torch.nn.Module, samples: list[Sample], classes: list[str], progress: bool = True,
             fusion: bool = True) -> dict:
    """Mean fusion metrics over ``samples`` and, where boxes exist, per class the region F1 (``<class>_f1``) and
    the judge's pixel precision, box recall and F (``<class>_p``, ``<class>_r``, ``<class>_f``) and ``mean_f``.
    ``fusion=False`` skips the fusion metrics (when they cannot change). Scored by ``ivf_ros.evaluation``, as
    ``ivf eval`` scores the served output."""
    model.eval()

    def score(s: Sample) -> Scored:
        ir, vis_y, ycc = to_tensors(s.ir, s.vis)
        fused, logits = model(ir[None], vis_y[None], ycc[None, 1:])
        boxes = s.boxes if s.boxes is not None else label_boxes(s.target, len(classes))
        labels = {"model": logits[0].numpy().argmax(0).astype(np.uint8)} if boxes is not None else {}
        return Scored(s.ir, s.vis, {"model": served(fused[0, 0].numpy(), s.vis)} if fusion else {}, labels, boxes)

    evaluation = evaluate(samples, score, ["model"], classes, VALIDATION_METRICS if fusion else (), trivial=False,
                          progress=progress, desc="validate")
    out = evaluation.fusion()["model"]
    segmentation = evaluation.segmentation("model")
    if segmentation is not None:
        for name, stats in segmentation["classes"].items():
            out.update({f"{name}_f1": stats["f1"], f"{name}_p": stats["px_precision"], f"{name}_r": stats["box_recall"],
                        f"{name}_f": stats["f"]})
        out["mean_f"] = segmentation["mean_f"]
    return out


def label_boxes(target: np.ndarray | None, num_classes: int) -> list | None:
    """Boxes of the connected regions of each class of a pixel-label target (for the judge on pixel-label data)."""
    if target is None:
        return None
    return [(c - 1, *box) for c in range(1, num_classes) for box in regions_to_boxes(target, c)]
