"""Semantic prior cache for the teachers: class-agnostic regions and box-prompted object masks, computed once.

    python -m training.priors --out runs/priors/sam --data msrs roadscene tno \\
        --source sam --sam-model vit_b --sam-checkpoint /path/to/sam_vit_b_01ec64.pth
    python -m training.priors --out runs/priors/classic --data msrs roadscene tno --source classic
    python -m training.priors --out runs/priors/mfnet --data msrs roadscene tno --source mfnet

Sources (the cache's ``meta.json`` and every checkpoint trained from it name the one used):

* ``sam``: the real ``segment-anything`` API. ``sam_model_registry[model](checkpoint=...)`` builds SAM from a
  user-supplied checkpoint (none ships with this project and none is downloaded); ``SamAutomaticMaskGenerator``
  gives class-agnostic masks of each source image, and ``SamPredictor`` with each annotated box as a prompt gives
  the object masks (per box, the higher-scoring mask of the IR and visible images).
* ``classic``: no foundation model. Regions are grid-seeded watershed superpixels of the IR/visible composite;
  object masks are GrabCut segmentations initialised with each box (inscribed ellipse when GrabCut cannot run).
* ``mfnet``: the MFNet RGB-thermal segmenter (``training.mfnet``, ``../shared/teachers/mfnet``). Its class map
  (all 9 MFNet classes) is kept; regions are the connected components of each class; objects are MFNet's person,
  bike and car pixels (never the boxes, so teachers fed these priors see no ground truth); its decoder features
  (``decode3``, 64 channels) are area-averaged to 1/16 of the image and stored as float16.

Layout: ``OUT/meta.json`` and ``OUT/<dataset>/<stem>.npz`` with ``regions`` (uint16 region ids, 0 = no region)
and ``objects`` (uint8, YOLO class + 1 = person 1, bicycle 2, car 3 inside object masks, 0 elsewhere); ``mfnet``
adds ``semantic`` (uint8 MFNet class ids), ``features`` (float16 C x ceil(H/stride) x ceil(W/stride)) and
``stride``. Existing files are never recomputed.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ivf_ros.imageops import gray_u8

from .datasets import Sample, load_pairs
from .mfnet import MFNET_CLASSES, load_mfnet, teacher_logits
from .train import resolve_root

PRIOR_CHANNELS = 4  # region boundaries, region-mean IR, region-mean visible, object mask
SEMANTIC_CHANNELS = len(MFNET_CLASSES)  # one-hot MFNet class masks, after the PRIOR_CHANNELS
MFNET_OBJECTS = {"person": 1, "bike": 2, "car": 3}  # MFNet class -> object id (YOLO class + 1)
PRIOR_INPUTS = ("semantic", "embeddings")  # what an mfnet cache adds to the PRIOR_CHANNELS
CACHE_VERSION = 1


@dataclass
class Prior:
    regions: np.ndarray  # H x W uint16
    objects: np.ndarray  # H x W uint8
    semantic: np.ndarray | None = None  # H x W uint8 MFNet class ids (mfnet source)
    features: np.ndarray | None = None  # C x ceil(H/stride) x ceil(W/stride) float16 MFNet decoder features
    stride: int = 1


def composite(ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """3-channel uint8 image showing both sources (IR, visible gray, their maximum)."""
    g = gray_u8(vis)
    return np.dstack([ir, g, np.maximum(ir, g)])


def paint_regions(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Region-id map from boolean masks: larger masks first, so smaller ones stay visible on top."""
    regions = np.zeros(shape, np.uint16)
    for i, m in enumerate(sorted(masks, key=lambda m: -int(m.sum())), start=1):
        regions[m] = min(i, np.iinfo(np.uint16).max)
    return regions


def _box_pixels(box, shape) -> tuple[int, int, int, int]:
    h, w = shape
    _, x0, y0, x1, y1 = box
    return (max(0, int(round(x0))), max(0, int(round(y0))), min(w, int(round(x1))), min(h, int(round(y1))))


def paint_objects(masks: list[np.ndarray], boxes, shape) -> np.ndarray:
    """Object map: each box's mask gets its YOLO class + 1 (larger boxes first)."""
    objects = np.zeros(shape, np.uint8)
    order = sorted(range(len(boxes)), key=lambda i: -(boxes[i][3] - boxes[i][1]) * (boxes[i][4] - boxes[i][2]))
    for i in order:
        objects[masks[i]] = int(boxes[i][0]) + 1
    return objects


class SamPriors:
    """Priors from a ``segment_anything`` SAM model (any size; tests use a small random one)."""

    def __init__(self, sam, points_per_side: int = 32, inputs: tuple[str, ...] = ("vis", "ir"),
                 pred_iou_thresh: float = 0.86, stability_score_thresh: float = 0.92):
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        self.generator = SamAutomaticMaskGenerator(sam, points_per_side=points_per_side,
                                                   pred_iou_thresh=pred_iou_thresh,
                                                   stability_score_thresh=stability_score_thresh)
        self.predictor = SamPredictor(sam)
        self.inputs = inputs

    def _images(self, s: Sample) -> list[np.ndarray]:
        rgb = {"vis": cv2.cvtColor(s.vis, cv2.COLOR_BGR2RGB) if s.vis.ndim == 3 else np.dstack([s.vis] * 3),
               "ir": np.dstack([s.ir] * 3)}
        return [np.ascontiguousarray(rgb[k]) for k in self.inputs]

    @torch.no_grad()
    def __call__(self, s: Sample) -> Prior:
        shape = s.ir.shape[:2]
        region_masks, best = [], [(-np.inf, None)] * len(s.boxes or [])
        for image in self._images(s):
            region_masks += [m["segmentation"] for m in self.generator.generate(image)]
            if s.boxes:
                self.predictor.set_image(image)
                for i, box in enumerate(s.boxes):
                    masks, scores, _ = self.predictor.predict(box=np.array(box[1:], np.float32),
                                                              multimask_output=False)
                    if scores[0] > best[i][0]:
                        best[i] = (float(scores[0]), masks[0])
                self.predictor.reset_image()
        objects = paint_objects([m for _, m in best], s.boxes or [], shape)
        return Prior(paint_regions(region_masks, shape), objects)


class ClassicPriors:
    """Priors without a foundation model: watershed superpixels and GrabCut box masks."""

    def __init__(self, region_size: int = 24, grabcut_iterations: int = 3):
        self.region_size = region_size
        self.grabcut_iterations = grabcut_iterations

    def regions(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        step = self.region_size
        markers = np.zeros((h, w), np.int32)
        ys, xs = np.meshgrid(np.arange(step // 2, h, step), np.arange(step // 2, w, step), indexing="ij")
        markers[ys.ravel(), xs.ravel()] = np.arange(1, ys.size + 1)
        cv2.watershed(cv2.GaussianBlur(image, (3, 3), 0), markers)
        lines = markers < 1  # watershed lines take the id of a neighbour
        filled = cv2.dilate(np.where(lines, 0, markers).astype(np.float32), np.ones((3, 3), np.uint8))
        return np.where(lines, filled, markers).astype(np.uint16)

    def object_mask(self, image: np.ndarray, box) -> np.ndarray:
        """GrabCut in a window around the box (twice its size), initialised with the box."""
        h, w = image.shape[:2]
        x0, y0, x1, y1 = _box_pixels(box, (h, w))
        mask = np.zeros((h, w), bool)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return mask
        mx, my = (x1 - x0) // 2 + 4, (y1 - y0) // 2 + 4
        wx0, wy0, wx1, wy1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
        window = np.zeros((wy1 - wy0, wx1 - wx0), np.uint8)
        if x1 - x0 >= 8 and y1 - y0 >= 8 and (x0, y0, x1, y1) != (wx0, wy0, wx1, wy1):
            try:
                bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
                cv2.grabCut(np.ascontiguousarray(image[wy0:wy1, wx0:wx1]), window,
                            (x0 - wx0, y0 - wy0, x1 - x0, y1 - y0), bgd, fgd, self.grabcut_iterations,
                            cv2.GC_INIT_WITH_RECT)
                window = ((window == cv2.GC_FGD) | (window == cv2.GC_PR_FGD)).astype(np.uint8)
            except cv2.error:
                window[:] = 0
        if not window.any():  # inscribed ellipse when GrabCut cannot run or finds nothing
            cv2.ellipse(window, ((x0 + x1) // 2 - wx0, (y0 + y1) // 2 - wy0), ((x1 - x0) // 2, (y1 - y0) // 2),
                        0, 0, 360, 1, -1)
        mask[wy0:wy1, wx0:wx1] = window > 0
        return mask

    def __call__(self, s: Sample) -> Prior:
        image = composite(s.ir, s.vis)
        boxes = s.boxes or []
        objects = paint_objects([self.object_mask(image, b) for b in boxes], boxes, s.ir.shape[:2])
        return Prior(self.regions(image), objects)


def class_regions(semantic: np.ndarray) -> np.ndarray:
    """Class-agnostic region ids: the 8-connected components of each class of a class map."""
    regions = np.zeros(semantic.shape, np.int64)
    start = 0
    for c in np.unique(semantic):
        n, labels = cv2.connectedComponents((semantic == c).astype(np.uint8), connectivity=8)
        inside = labels > 0
        regions[inside] = labels[inside] + start
        start += n - 1
    return np.minimum(regions, np.iinfo(np.uint16).max).astype(np.uint16)


def mfnet_objects(semantic: np.ndarray) -> np.ndarray:
    """Object map (YOLO class + 1) of MFNet's person, bike and car pixels."""
    lut = np.zeros(len(MFNET_CLASSES), np.uint8)
    for name, value in MFNET_OBJECTS.items():
        lut[MFNET_CLASSES.index(name)] = value
    return lut[semantic]


class MfnetPriors:
    """Priors from MFNet: class map, per-class components as regions, object pixels, pooled decoder features."""

    def __init__(self, model=None, feature_layer: str = "decode3", feature_stride: int = 16):
        self.model = model if model is not None else load_mfnet()
        self.stride, self._features = feature_stride, None
        getattr(self.model, feature_layer).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._features = output

    @torch.no_grad()
    def __call__(self, s: Sample) -> Prior:
        h, w = s.ir.shape[:2]
        semantic = teacher_logits(self.model, s.ir, s.vis).argmax(0).numpy().astype(np.uint8)
        feats = self._features[0]  # of the input padded to multiples of 16
        scale = (w + -w % 16) // feats.shape[-1]
        if self.stride % scale:
            raise ValueError(f"feature stride {self.stride} is not a multiple of the feature layer's ({scale})")
        pooled = F.avg_pool2d(feats[None], self.stride // scale, ceil_mode=True)[0]
        pooled = pooled[:, :-(-h // self.stride), :-(-w // self.stride)]
        return Prior(class_regions(semantic), mfnet_objects(semantic), semantic,
                     pooled.numpy().astype(np.float16), self.stride)


def load_sam(model_type: str, checkpoint: str | Path, device: str = "cpu"):
    """SAM from a user checkpoint through ``segment_anything.sam_model_registry`` (never downloads)."""
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise ValueError(f"unknown SAM model '{model_type}' (known: {', '.join(sam_model_registry)})")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: no such SAM checkpoint (download it yourself; see the README)")
    return sam_model_registry[model_type](checkpoint=str(checkpoint)).to(device).eval()


class PriorCache:
    """Read/write access to a prior cache folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def meta(self) -> dict:
        path = self.root / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: not a prior cache (no meta.json); run python -m training.priors")
        return json.loads(path.read_text())

    def path(self, dataset: str, stem: str) -> Path:
        return self.root / dataset / f"{stem}.npz"

    def load(self, dataset: str, stem: str) -> Prior:
        path = self.path(dataset, stem)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no cached prior for {dataset}/{stem}; run python -m training.priors "
                                    f"--out {self.root} --data {dataset} (with the source of {self.root}/meta.json)")
        with np.load(path) as z:
            if "semantic" not in z.files:
                return Prior(z["regions"], z["objects"])
            return Prior(z["regions"], z["objects"], z["semantic"], z["features"], int(z["stride"]))

    def build(self, dataset: str, samples: list[Sample], compute, meta: dict, progress: bool = True) -> int:
        """Compute and store the priors of ``samples`` that are not cached yet; returns how many were computed."""
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "meta.json"
        if meta_path.is_file():
            old = self.meta()
            if old["source"] != meta["source"]:
                raise ValueError(f"{self.root} holds '{old['source']}' priors; use another --out for '{meta['source']}'")
        else:
            meta_path.write_text(json.dumps({"version": CACHE_VERSION, **meta}, indent=2) + "\n")
        todo = [s for s in samples if not self.path(dataset, s.stem).is_file()]
        (self.root / dataset).mkdir(exist_ok=True)
        for s in tqdm(todo, desc=f"priors {dataset}", disable=not progress):
            prior = compute(s)
            tmp = self.path(dataset, s.stem).with_suffix(".tmp.npz")
            extra = {} if prior.semantic is None else {"semantic": prior.semantic, "features": prior.features,
                                                       "stride": np.array(prior.stride)}
            np.savez_compressed(tmp, regions=prior.regions, objects=prior.objects, **extra)
            tmp.rename(self.path(dataset, s.stem))
        return len(todo)


def prior_channels(prior: Prior, ir: np.ndarray, vis_gray: np.ndarray) -> np.ndarray:
    """Teacher input from a prior (any crop of it): 4 x H x W float32 in [0, 1].

    Channels: region boundaries, IR averaged over each region, visible gray averaged over each region, objects.
    """
    h, w = prior.regions.shape
    ids = np.unique(prior.regions, return_inverse=True)[1].reshape(h, w)
    flat = ids.ravel()
    counts = np.bincount(flat).astype(np.float64)
    mean_ir = (np.bincount(flat, ir.ravel().astype(np.float64)) / counts)[ids]
    mean_vis = (np.bincount(flat, vis_gray.ravel().astype(np.float64)) / counts)[ids]
    edge = np.zeros((h, w), bool)
    edge[:, :-1] |= ids[:, 1:] != ids[:, :-1]
    edge[:-1, :] |= ids[1:, :] != ids[:-1, :]
    return np.stack([edge, mean_ir / 255.0, mean_vis / 255.0, prior.objects > 0]).astype(np.float32)


def teacher_input(prior: Prior, window: tuple[slice, slice], ir: np.ndarray, vis_gray: np.ndarray,
                  inputs: tuple[str, ...] = ()) -> np.ndarray:
    """A prior-fed teacher's input for ``window`` of a pair (``ir``, ``vis_gray``: that window's pixels).

    ``prior_channels``, then with ``semantic`` the one-hot MFNet class masks (``SEMANTIC_CHANNELS``), then with
    ``embeddings`` the decoder features, repeated to full resolution (nearest)."""
    parts = [prior_channels(Prior(prior.regions[window], prior.objects[window]), ir, vis_gray)]
    if "semantic" in inputs:
        parts.append(prior.semantic[window][None] == np.arange(SEMANTIC_CHANNELS, dtype=np.uint8)[:, None, None])
    if "embeddings" in inputs:
        h, w = prior.regions.shape
        ys, xs = np.arange(h)[window[0]] // prior.stride, np.arange(w)[window[1]] // prior.stride
        parts.append(prior.features[:, ys][:, :, xs])
    return np.concatenate(parts).astype(np.float32, copy=False) if len(parts) > 1 else parts[0]


def make_source(args) -> tuple[object, dict]:
    """The prior computer the command line asks for, and its cache metadata."""
    if args.source == "sam":
        if not args.sam_checkpoint:
            raise SystemExit("--source sam needs --sam-checkpoint (SAM weights are never downloaded here); "
                             "without one use --source classic")
        sam = load_sam(args.sam_model, args.sam_checkpoint, args.device)
        compute = SamPriors(sam, args.points_per_side, tuple(args.sam_inputs))
        desc = (f"segment-anything {args.sam_model} from {Path(args.sam_checkpoint).name}: automatic masks "
                f"({args.points_per_side}x{args.points_per_side} points) of {'+'.join(args.sam_inputs)}, box prompts")
        return compute, {"source": "sam", "description": desc, "sam_model": args.sam_model,
                         "sam_checkpoint": str(args.sam_checkpoint)}
    if args.source == "mfnet":
        weights = Path(args.mfnet_weights) if args.mfnet_weights else None
        compute = MfnetPriors(load_mfnet(weights), args.feature_layer, args.feature_stride)
        channels = getattr(compute.model, args.feature_layer).conv.out_channels
        desc = (f"MFNet RGB-thermal segmenter ({(weights or Path('mfnet_rgbt_9class.safetensors')).name}): 9-class "
                f"masks, per-class connected components as regions, person/bike/car masks as objects, "
                f"{args.feature_layer} features ({channels} ch) at 1/{args.feature_stride}, float16")
        return compute, {"source": "mfnet", "description": desc, "classes": MFNET_CLASSES,
                         "inputs": list(PRIOR_INPUTS), "feature_layer": args.feature_layer,
                         "feature_channels": channels, "feature_stride": args.feature_stride,
                         "weights": str(weights) if weights else "../shared/teachers/mfnet"}
    compute = ClassicPriors(args.region_size)
    desc = (f"no foundation model: watershed superpixels ({args.region_size} px grid) of the IR/visible composite, "
            "GrabCut masks from the annotated boxes")
    return compute, {"source": "classic", "description": desc, "region_size": args.region_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the semantic prior cache of the teachers.")
    ap.add_argument("--out", required=True, help="cache folder")
    ap.add_argument("--data", nargs="+", default=["msrs", "roadscene", "tno"],
                    help="dataset folders (relative to the data root, or absolute); layout 'pairs'")
    ap.add_argument("--source", choices=["sam", "classic", "mfnet"], default="sam")
    ap.add_argument("--sam-model", default="vit_b", help="sam_model_registry key: vit_b, vit_l, vit_h")
    ap.add_argument("--sam-checkpoint", help="SAM weights file (.pth) you downloaded yourself")
    ap.add_argument("--sam-inputs", nargs="+", choices=["vis", "ir"], default=["vis", "ir"])
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--region-size", type=int, default=24, help="classic: superpixel grid step in pixels")
    ap.add_argument("--mfnet-weights", help="mfnet: MFNet safetensors (default ../shared/teachers/mfnet)")
    ap.add_argument("--feature-layer", default="decode3", help="mfnet: decoder unit whose output is stored")
    ap.add_argument("--feature-stride", type=int, default=16, help="mfnet: stored feature resolution 1/N")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="sam: torch device "
                    "(mfnet runs on the CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    compute, meta = make_source(args)
    cache = PriorCache(args.out)
    for entry in args.data:
        root = resolve_root(entry)
        done = cache.build(root.name, load_pairs(root, "pairs"), compute, meta)
        print(f"{root.name}: {done} priors computed, cache {cache.root / root.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
