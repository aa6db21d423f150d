"""The one evaluation loop behind ``ivf eval`` and ``training/ablation.py``: fusion metrics of models beside the
trivial fusions, and the segmentation judge, over a set of pairs.

The conventions live here only: the IR as the models saw it (gray, 8-bit levels), the visible image in gray, each
model's fused image as the pipeline serves it (colour restored) then in gray, the trivial fusions of the same IR and
visible images, and one ``BoxScorer`` per model on the pairs that have boxes.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import numpy as np
from tqdm import tqdm

from .imageops import merge_luminance, split_luminance
from .metrics import FUSION_METRICS, TRIVIAL_FUSIONS, BoxScorer, fusion_metrics, to_gray


class Scored(NamedTuple):
    """One pair to score: ``ir`` gray in 0..255 levels, ``vis`` BGR or gray uint8, per model name its fused image
    (BGR or gray uint8, as served) and its label map (needed only where ``boxes`` is not None: YOLO-class boxes
    in pixels, as ``BoxScorer.add`` takes them)."""

    ir: np.ndarray
    vis: np.ndarray
    fused: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    boxes: list | None = None


def served(fused_y: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """A network's fused luminance (H x W in [0, 1]) as the pipeline serves it: with the visible image's colour."""
    return merge_luminance(fused_y, split_luminance(vis)[1])


class Evaluation:
    """Per-pair metric values per model (and trivial fusion, with ``trivial``) and a ``BoxScorer`` per model."""

    def __init__(self, models: list[str], classes: list[str], metrics=FUSION_METRICS, trivial: bool = True):
        self.metrics = tuple(metrics)
        self.trivial = trivial
        names = (*models, *TRIVIAL_FUSIONS) if trivial else tuple(models)
        self.values = {name: {k: [] for k in self.metrics} for name in names}  # in the order of the pairs
        self.scorers = {name: BoxScorer(classes) for name in models}
        self.pairs = self.boxed = 0  # pairs added; of those, pairs with boxes

    def add(self, pair: Scored) -> None:
        self.pairs += 1
        if self.metrics:
            ir, vis = pair.ir.astype(np.float64), to_gray(pair.vis)
            fused = {name: to_gray(img) for name, img in pair.fused.items()}
            if self.trivial:
                fused.update({name: f(ir, vis) for name, f in TRIVIAL_FUSIONS.items()})
            for name, img in fused.items():
                for k, v in fusion_metrics(ir, vis, img, self.metrics).items():
                    self.values[name][k].append(v)
        if pair.boxes is not None:
            self.boxed += 1
            for name, scorer in self.scorers.items():
                scorer.add(pair.labels[name], pair.boxes)

    def fusion(self) -> dict[str, dict[str, float]]:
        """Mean metrics per model, then per trivial fusion."""
        return {name: {k: float(np.mean(v)) if v else 0.0 for k, v in per.items()} for name, per in self.values.items()}

    def segmentation(self, model: str) -> dict | None:
        """The judge's report of ``model`` (``BoxScorer.report``); None when no pair had boxes."""
        return self.scorers[model].report() if self.boxed else None


def evaluate(pairs: Iterable, score: Callable[[object], Scored], models: list[str], classes: list[str],
             metrics=FUSION_METRICS, trivial: bool = True, progress: bool = True, desc: str = "eval") -> Evaluation:
    """Score each of ``pairs`` (``score`` turns one into a ``Scored``: reads it, runs the models) into one
    ``Evaluation``."""
    evaluation = Evaluation(models, classes, metrics, trivial)
    for pair in tqdm(pairs, desc=desc, unit="pair", disable=not progress):
        evaluation.add(score(pair))
    return evaluation
