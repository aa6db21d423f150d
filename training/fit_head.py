"""Fit the segmentation head alone on cached encoder features: the fast path for a frozen fusion network.

    python -m training.fit_head --config training/configs/segmentation.yaml [--out DIR] [--set KEY=VALUE ...]

With ``freeze_fusion`` the encoder's features of a training pair never change, so they are computed once per pair
and per mirror image (``FusionStudent.encode``) and the head (``HEAD_MODULES``) trains for ``head_fit.epochs``
epochs on whole images or, with ``head_fit.crop``, on windows of the whole image's features (half of them centred
on an object), ~10x the steps of ``training/train.py``'s crop loop in the same time. Losses: the corrected teacher
soft targets (``loss.soft``, where a data entry has a ``teacher_cache``) plus the hard targets
(``loss.segmentation``, ``loss.class_weights``; ``loss.hardest`` < 1 keeps only that share of the hardest
pixels). The fusion output is that of ``init`` (its tensors are copied unchanged). Validates every
``head_fit.val_every`` epochs on ``val`` (model selection only) and writes ``OUT/best.safetensors``,
``OUT/last.safetensors`` and ``OUT/log.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ivf_ros.checkpoint import save_checkpoint
from ivf_ros.model import ARCHITECTURE, build_model, row_coordinates

from .datasets import Sample, centred_corner, to_tensors
from .losses import hard_target_options, segmentation_loss, soft_segmentation_loss
from .train import (FUSION_MODULES, checkpoint_metadata, config_command, freeze, init_from, load_config, load_split,
                    resolve_repo_path, seed_everything, selection_score)
from .validate import VALIDATION_METRICS, validate

HEAD_MODULES = ("seg8", "seg16", "seg4", "seg_head")  # reset by fresh_head (a row convolution keeps what init gives)


def head_inputs(model, ir: torch.Tensor, vis_y: torch.Tensor, chroma: torch.Tensor) -> dict[str, torch.Tensor]:
    """The encoder features the head reads (``head_logits``'s inputs), float16, without the batch axis."""
    enc = model.encode(ir, vis_y, chroma)
    keys = ("dec8_in", "f4") if model.seg_context else ("dec4_in",) if model.seg_width else ("feats",)
    keys += ("chroma",) if "chroma" in enc else ()
    out = {k: enc[k][0].half() for k in keys}
    if getattr(model, "seg_rows", 0):  # the whole image's rows, so that windows keep their place in the frame
        out["rows"] = row_coordinates(enc["dec8_in"])[0].half()
    return out


@torch.no_grad()
def cache_features(model, samples, progress: bool = True) -> list[list[dict]]:
    """Per sample: [features of the pair, features of its mirror image]."""
    model.eval()
    out = []
    for s in tqdm(samples, desc="features", disable=not progress, leave=False, dynamic_ncols=True):
        ir, vis_y, ycc = to_tensors(s.ir, s.vis)
        out.append([head_inputs(model, ir[None], vis_y[None], ycc[None, 1:]),
                    head_inputs(model, ir.flip(-1)[None], vis_y.flip(-1)[None], ycc[None, 1:].flip(-1))])
    return out


def crop_at(s: Sample, crop: int, rng: np.random.Generator, align: int = 8) -> tuple[int, int]:
    """Top-left corner (multiple of ``align``) of a ``crop`` window: half of the time centred near a pixel of one of
    the pair's object classes (drawn uniformly: ``centred_corner``)."""
    y, x = centred_corner(s.target, s.target.shape, crop, rng, balanced=True)
    return y - y % align, x - x % align


STRIDES = {"dec8_in": 8, "rows": 8, "chroma": 8, "f4": 4, "dec4_in": 4, "feats": 4}  # of the cached features


def batch_of(samples, feats, picks, crop: int = 0, rng: np.random.Generator | None = None, align: int = 8):
    """Stacked features and targets (soft, weight, hard) of ``picks`` [(sample index, mirrored)]: whole images, or
    ``crop`` x ``crop`` windows of the features of the whole image (the context the served head sees), corners on
    multiples of ``align`` (``FusionStudent.head_alignment``)."""
    enc, soft, weight, hard = {k: [] for k in feats[0][0]}, [], [], []
    for i, f in picks:
        s = samples[i]
        h, w = s.target.shape
        y, x = crop_at(s, crop, rng, align) if crop else (0, 0)
        if crop and f:  # the same window of the mirrored arrays (features of the mirrored pair start at its left)
            x = (w - crop - x) // align * align
        ch, cw = (crop, crop) if crop else (h, w)
        for k, v in feats[i][f].items():
            r = STRIDES[k]
            enc[k].append(v[:, y // r:-(-(y + ch) // r), x // r:-(-(x + cw) // r)])
        for out, a, r in ((soft, s.soft, s.scale), (weight, s.weight, s.scale), (hard, s.target, 1)):
            a = a[..., ::-1] if f else a
            out.append(a[..., y // r:(y + ch) // r, x // r:(x + cw) // r])
    return ({k: torch.stack(v).float() for k, v in enc.items()},
            *(torch.from_numpy(np.stack(a).astype(t)) for a, t in ((soft, np.float32), (weight, np.float32),
                                                                 (hard, np.int64))))


def fit_head(cfg: dict, out: Path, progress: bool = True) -> dict:
    """Train the head on cached features; returns the best validation metrics."""
    seed_everything(int(cfg.get("seed", 0)))
    hf, wl, classes = cfg.get("head_fit", {}), cfg["loss"], cfg["classes"]
    class_weights, hardest = hard_target_options(wl)
    torch.set_num_threads(int(cfg["train"].get("threads", torch.get_num_threads())))
    if not cfg.get("freeze_fusion") or not cfg.get("init"):
        raise ValueError("fit_head needs freeze_fusion and an init checkpoint (the fusion weights)")
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(ARCHITECTURE, {"num_classes": len(classes), **cfg["model"]})
    fresh = init_from(model, resolve_repo_path(cfg["init"]))
    if any(n.split(".")[0] in FUSION_MODULES for n in fresh):
        raise ValueError(f"{cfg['init']}: lacks fusion tensors of this architecture ({fresh[0]}, ...)")
    if hf.get("fresh_head", True):  # the head starts from scratch even when init has one
        torch.manual_seed(int(cfg.get("seed", 0)))
        for name in HEAD_MODULES:
            if hasattr(model, name):
                for m in getattr(model, name).modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
    samples = [s for i, e in enumerate(cfg["data"]) for s in load_split(e, classes, cfg.get("label_rule"))]
    samples = [s for s in samples if s.target is not None]
    for s in samples:  # pairs without teacher targets: hard labels only
        if s.soft is None:
            s.soft = np.zeros((len(classes), *s.target.shape), np.float16)
            s.weight, s.scale = np.zeros(s.target.shape, np.float16), 1
    epochs, batch, crop = int(hf.get("epochs", 40)), int(hf.get("batch", 4)), int(hf.get("crop", 0))
    small = [s.stem for s in samples if min(s.target.shape) < crop]
    align = model.head_alignment
    if crop % align or small or (not crop and len({s.target.shape for s in samples}) > 1):
        raise ValueError(f"head_fit.crop {crop}: must be a multiple of {align} and fit every training pair "
                         f"({', '.join(small[:3]) or 'whole images need one size'})")
    feats = cache_features(model, samples, progress)
    val_samples = load_split(cfg["val"], classes)
    fusion = validate(model, val_samples, classes, progress=False)
    fusion = {k: fusion[k] for k in VALIDATION_METRICS}
    freeze(model, FUSION_MODULES)
    params = [p for p in model.parameters() if p.requires_grad]
    per_epoch = max(1, len(samples) // batch)
    opt = torch.optim.AdamW(params, lr=float(hf.get("lr", 0.003)), weight_decay=cfg["train"].get("weight_decay", 1e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(hf.get("lr", 0.003)),
                                                total_steps=epochs * per_epoch, pct_start=0.1)
    rng = np.random.default_rng(int(cfg.get("seed", 0)))
    best = {"score": -1e9}
    cfg = {**cfg, "segmentation_targets": cfg.get("segmentation_targets", "teacher soft targets corrected by the "
                                                  "boxes (training/label_rule.py), head fitted on cached features "
                                                  "(training/fit_head.py)")}
    cfg["train"] = {**cfg["train"], "steps": epochs * per_epoch,
                    "head_fit": {**hf, "epochs": epochs, "batch": batch, "crop": crop}}
    with open(out / "log.jsonl", "w") as log, tqdm(total=epochs * per_epoch, desc="head", disable=not progress,
                                                dynamic_ncols=True) as bar:
        for epoch in range(1, epochs + 1):
            model.train()
            freeze(model, FUSION_MODULES)
            order = rng.permutation(len(samples))
            for k in range(per_epoch):
                picks = [(int(i), bool(rng.random() < 0.5)) for i in order[k * batch:(k + 1) * batch]]
                enc, soft, weight, hard = batch_of(samples, feats, picks, crop, rng, align)
                small = model.head_logits(enc)
                logits = F.interpolate(small, size=hard.shape[-2:], mode="bilinear", align_corners=False)
                seg = segmentation_loss(logits, hard, class_weights, hardest)
                soft_loss = soft_segmentation_loss(small, soft, weight)
                loss = wl.get("segmentation", 1.0) * seg + wl.get("soft", 1.0) * soft_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch, seg=f"{seg.item():.3f}", soft=f"{soft_loss.item():.3f}")
                step = (epoch - 1) * per_epoch + k + 1
                log.write(json.dumps({"epoch": epoch, "step": step, "segmentation": seg.item(),
                                      "soft": soft_loss.item()}) + "\n")
            if epoch % int(hf.get("val_every", 10)) == 0 or epoch == epochs:
                metrics = {**fusion, **validate(model, val_samples, classes, progress=False, fusion=False)}
                metrics["score"] = selection_score(metrics)
                metrics["step"] = epoch * per_epoch
                log.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
                log.flush()
                bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                meta = checkpoint_metadata(cfg, model, metrics)
                meta["training"]["head_fit"] = {**hf, "epoch": epoch}  # the recipe: epochs, window size, ...
                save_checkpoint(out / "last.safetensors", model, meta)
                if metrics["score"] > best["score"]:
                    best = metrics
                    save_checkpoint(out / "best.safetensors", model, meta)
    return best


def main(argv=None) -> int:
    return config_command(argv, __doc__, load_config, fit_head, "runs/segmentation", resumable=False)


if __name__ == "__main__":
    raise SystemExit(main())
