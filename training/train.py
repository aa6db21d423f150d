"""Train the fusion student + segmentation head from a YAML config.

    python -m training.train --config training/configs/student.yaml [--resume] [--steps N] [--out DIR]
        [--set KEY=VALUE ...]

Writes ``OUT/last.pt`` (resumable training state), ``OUT/best.safetensors`` (the best checkpoint by the
validation score, in the shipped format), ``OUT/final.safetensors`` (after the last step, same format),
``OUT/log.jsonl`` (one line per validation) and ``OUT/losses.jsonl`` (one line per step). ``--resume`` cuts both
logs back to the step it resumes from; a run without it starts new logs (and, at its first validation, a new best
checkpoint).

A head with ``seg_rows`` / ``seg_chroma`` gets each crop's rows in the whole frame and the crop's visible chroma.
``loss.preserve`` adds an L1 term to the ``init`` checkpoint's fused crop; ``train.fixed_batchnorm`` keeps every
BatchNorm's statistics; ``train.balanced_crops`` centres crops on a class drawn uniformly (``joint.yaml``: the
encoder trains for segmentation while the fused output stays the shipped one's). ``train.augment`` rescales the
pairs and jitters their IR and visible luminance (``training.datasets.check_augment``; off by default).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from ivf_ros.checkpoint import load_checkpoint, save_checkpoint
from ivf_ros.data import data_root, msrs_split
from ivf_ros.model import ARCHITECTURE, build_model, count_parameters

from .datasets import CropDataset, TeacherCropDataset, attach_teacher, load_pairs
from .label_cache import cache_info
from .label_rule import DEFAULT_RULE
from .losses import fusion_loss, hard_target_options, segmentation_loss, soft_segmentation_loss
from .validate import VALIDATION_METRICS, validate

INPUT_CONVENTIONS = {
    "ir": "1 x H x W in [0, 1], registered to the visible frame",
    "visible": "luminance Y = 0.299 R + 0.587 G + 0.114 B in [0, 1]",
    "output": "fused luminance in [0, 1]; colour restored from the visible YCrCb chroma",
    "labels": "argmax of the logits; class ids index 'classes'",
}


def load_config(path: str | Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for key in ("classes", "palette", "model", "data", "val", "train", "loss"):
        if key not in cfg:
            raise ValueError(f"{path}: config lacks '{key}'")
    return cfg


def resolve_root(root: str) -> Path:
    p = Path(root)
    return p if p.is_absolute() or p.exists() else data_root() / root


def load_split(entry: dict, classes: list[str], rule: dict | None = None):
    """Samples of one data entry: {root, layout, split: all|train|val, limit, hold_out, teacher_cache, share}; with
    ``teacher_cache`` (a ``training.label_cache`` folder) the teacher's targets corrected by ``rule``. ``share``
    (training only, default 1) scales the number of crops drawn from the entry against the others'.
    ``hold_out: [k, K]`` leaves out fold k of K (the pairs at positions k, k + K, ... of the split): a head fitted
    without them gives them held-out logits (``training.calibrate --folds``)."""
    root = resolve_root(entry["root"])
    samples = load_pairs(root, entry.get("layout", "pairs"), classes)
    split = entry.get("split", "all")
    if split != "all":
        train, val = msrs_split([s.stem for s in samples])
        keep = set(train if split == "train" else val)
        samples = [s for s in samples if s.stem in keep]
    if entry.get("limit"):
        samples = samples[: int(entry["limit"])]
    if entry.get("hold_out") is not None:
        k, folds = check_fold(entry["hold_out"])
        samples = [s for i, s in enumerate(samples) if i % folds != k]
    if entry.get("teacher_cache"):
        attach_teacher(samples, resolve_repo_path(entry["teacher_cache"]), {**DEFAULT_RULE, **(rule or {})})
    return samples


def check_fold(fold) -> tuple[int, int]:
    """(k, K) of a fold ``[k, K]``: integers, 0 <= k < K, K >= 2."""
    if not (isinstance(fold, (list, tuple)) and len(fold) == 2 and all(type(v) is int for v in fold)
            and fold[1] >= 2 and 0 <= fold[0] < fold[1]):
        raise ValueError(f"hold_out: expected [k, K] with 0 <= k < K and K >= 2, not {fold}")
    return int(fold[0]), int(fold[1])


# The modules the fusion output depends on; ``freeze_fusion`` keeps them (and their BatchNorm statistics) fixed.
ENCODER_MODULES = ("stem", "enc4", "enc8", "enc16", "reduce16")  # what a head with its own path reads (f4, dec8_in)
DECODER_MODULES = ("dec8", "dec4", "coeff_head")  # the rest of the fusion path
FUSION_MODULES = ENCODER_MODULES + DECODER_MODULES


def init_from(model: torch.nn.Module, path: Path) -> list[str]:
    """Load the tensors of a checkpoint whose names and shapes match ``model``; returns the names left as
    initialised (e.g. a new segmentation head on a fusion student). Says which of the checkpoint's are left out
    (another head, or a config whose ``model`` section is not the checkpoint's)."""
    source = load_checkpoint(path)[0].state_dict()
    own = model.state_dict()
    same = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(same, strict=False)
    unused = sorted(set(source) - set(same))
    if unused:
        tqdm.write(f"init {path}: {len(unused)} of its tensors are not in this model ({unused[0]}, ...): "
                   "compare the config's model section with the checkpoint's hyper_parameters")
    return sorted(set(own) - set(same))


def freeze(model: torch.nn.Module, names=FUSION_MODULES) -> None:
    """No gradients and eval-mode BatchNorm for the named sub-modules (call again after ``model.train()``)."""
    for name in names:
        module = getattr(model, name)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def frozen_modules(model: torch.nn.Module, cfg: dict) -> tuple[str, ...]:
    """The sub-modules a config keeps fixed: with ``train.trainable`` (sub-module names) all the others, else
    with ``freeze_fusion`` the fusion path's, else none."""
    names = [name for name, _ in model.named_children()]
    trainable = cfg["train"].get("trainable")
    if trainable is not None:
        unknown = sorted(set(trainable) - set(names))
        if unknown:
            raise ValueError(f"train.trainable: no sub-module {', '.join(unknown)} (the model has {', '.join(names)})")
        return tuple(name for name in names if name not in trainable)
    return FUSION_MODULES if cfg.get("freeze_fusion") else ()


def teacher_of(cfg: dict) -> dict | None:
    """The teacher and label rule behind a config's teacher-label entries, for the checkpoint metadata."""
    caches = [e["teacher_cache"] for e in cfg["data"] if e.get("teacher_cache")]
    if not caches:
        return None
    return {"teacher": cache_info(resolve_repo_path(caches[0]))["teacher"], "caches": caches,
            "label_rule": {**DEFAULT_RULE, **cfg.get("label_rule", {})},
            "label_rule_doc": "training/label_rule.py: teacher pixels > margin px from every box of their class "
                              "-> background; boxes the teacher covers < fill_below filled per class (hot = IR "
                              "foreground, rect = box minus a border band), the rest of such a box ignored"}


def preservation_reference(cfg: dict) -> torch.nn.Module | None:
    """With ``loss.preserve`` the ``init`` checkpoint, frozen in eval mode: the loss then adds
    ``preserve`` x the L1 distance of the fused crop to its fused crop (the fusion output kept while the encoder
    trains for segmentation)."""
    if not cfg["loss"].get("preserve"):
        return None
    if not cfg.get("init"):
        raise ValueError("loss.preserve keeps the init checkpoint's fused output: the config needs 'init'")
    reference = load_checkpoint(resolve_repo_path(cfg["init"]))[0].eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def resolve_repo_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(__file__).resolve().parent.parent / p


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, recorded for the checkpoints a tool makes from others."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def selection_score(metrics: dict) -> float:
    """One number to pick the best checkpoint: fusion quality (VIF, Qabf, SSIM, SCD) plus the judge's mean F +
    person F where they were measured (older logs: the region person F1)."""
    seg = metrics["mean_f"] + metrics["person_f"] if "mean_f" in metrics else metrics.get("person_f1", 0.0)
    return metrics["VIF"] + metrics["Qabf"] + 0.5 * metrics["SSIM"] + 0.25 * metrics["SCD"] + seg


def save_validated(model: torch.nn.Module, meta: dict, config: str | Path, out: Path) -> dict:
    """Validate ``model`` on the ``val`` entry of ``config``, record that as ``meta["validation"]``, save the
    checkpoint to ``out`` and return the record (for the tools that make a checkpoint from others)."""
    cfg = load_config(config)
    metrics = validate(model, load_split(cfg["val"], meta["classes"]), meta["classes"])
    metrics["score"] = selection_score(metrics)
    meta["validation"] = {"data": cfg["val"], **{k: round(float(v), 4) for k, v in metrics.items()}}
    save_checkpoint(out, model, meta)
    return meta["validation"]


def crop_datasets(cfg: dict) -> list[CropDataset]:
    """One crop dataset per ``data`` entry, ``share`` x steps x batch crops each (teacher crops when the config
    has a teacher cache: entries without one then give zero soft-target weight and, unlabelled, no loss but the
    fusion terms)."""
    classes, tc, teacher = cfg["classes"], cfg["train"], teacher_of(cfg)
    scale = int(cache_info(resolve_repo_path(teacher["caches"][0]))["scale"]) if teacher else 1
    rows, balanced = bool(cfg["model"].get("seg_rows")), bool(tc.get("balanced_crops"))
    sets = []
    for i, entry in enumerate(cfg["data"]):
        samples = load_split(entry, classes, cfg.get("label_rule"))
        length = int(round(float(entry.get("share", 1.0)) * tc["steps"] * tc["batch"]))
        if teacher:
            sets.append(TeacherCropDataset(samples, tc["crop"], length, i + cfg.get("seed", 0), len(classes), scale,
                                           rows, balanced, tc.get("augment")))
        else:
            sets.append(CropDataset(samples, tc["crop"], length, seed=i + cfg.get("seed", 0), rows=rows,
                                    balanced=balanced, augment=tc.get("augment")))
    return sets


def train(cfg: dict, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Run training; returns the best validation metrics."""
    seed_everything(int(cfg.get("seed", 0)))
    torch.set_num_threads(int(cfg["train"].get("threads", torch.get_num_threads())))
    out.mkdir(parents=True, exist_ok=True)
    classes, tc, wl = cfg["classes"], cfg["train"], cfg["loss"]
    class_weights, hardest = hard_target_options(wl)
    rows = bool(cfg["model"].get("seg_rows"))  # crops then carry their rows in the whole frame
    sets = crop_datasets(cfg)
    val_samples = load_split(cfg["val"], classes)
    loader = DataLoader(ConcatDataset(sets), batch_size=tc["batch"], shuffle=True, drop_last=True,
                        num_workers=int(tc.get("workers", 0)),
                        generator=torch.Generator().manual_seed(int(cfg.get("seed", 0))))
    model = build_model(ARCHITECTURE, {"num_classes": len(classes), **cfg["model"]})
    if cfg.get("init"):  # fine-tune from a checkpoint of the same architecture (a new head starts fresh)
        fresh = init_from(model, resolve_repo_path(cfg["init"]))
        if fresh:
            tqdm.write(f"init {cfg['init']}: {len(fresh)} tensors start fresh ({fresh[0]}, ...)")
    frozen = frozen_modules(model, cfg)
    reference = preservation_reference(cfg)
    fusion_fixed = set(FUSION_MODULES) <= set(frozen)  # then the fusion metrics cannot change
    freeze(model, frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc["lr"],
                            weight_decay=tc.get("weight_decay", 1e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc["lr"], total_steps=tc["steps"], pct_start=0.1)
    step, best = 0, {"score": -1e9}
    state_path = out / "last.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), json.loads(state["best"])
    restart_logs(out, ("log.jsonl", "losses.jsonl"), step if resume and state_path.exists() else None)
    bar = tqdm(total=tc["steps"], initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    batches = iter(loader)

    fusion_at_start = {}  # with frozen fusion modules the fusion metrics of the first validation stay valid

    def validate_and_keep_best():
        nonlocal best
        metrics = validate(model, val_samples, classes, progress=False, fusion=not (fusion_fixed and fusion_at_start))
        if fusion_fixed:
            fusion_at_start.update({k: metrics[k] for k in VALIDATION_METRICS} if not fusion_at_start else {})
            metrics = {**fusion_at_start, **metrics}
        metrics["score"] = selection_score(metrics)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if metrics["score"] > best["score"]:
            best = {"step": step, **metrics}
            save_checkpoint(out / "best.safetensors", model, checkpoint_metadata(cfg, model, best))
        if step == tc["steps"]:  # the last step's model too, whatever its score
            save_checkpoint(out / "final.safetensors", model,
                            checkpoint_metadata(cfg, model, {"step": step, **metrics}))
        train_mode()

    def train_mode():
        model.train()
        freeze(model, frozen)
        if tc.get("fixed_batchnorm"):  # statistics stay the init's (the fused output starts exactly as init's)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()

    if step == 0:
        validate_and_keep_best()  # the starting point (max fusion, untrained head) is the bar to beat
    train_mode()
    with open(out / "losses.jsonl", "a") as losses:
        while step < tc["steps"]:
            try:
                ir, vis_y, ycrcb, target, *teacher_targets = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            row_map = teacher_targets.pop() if rows else None
            fused, logits, small, _ = model.forward_with_head(ir, vis_y, ycrcb[:, 1:], row_map)
            terms = fusion_loss(fused, ir, vis_y, wl)
            if reference is not None:
                with torch.no_grad():
                    kept = reference.fuse_with(reference.features(ir, vis_y), ir, vis_y)
                terms["preserve"] = F.l1_loss(fused, kept)
                terms["total"] = terms["total"] + wl["preserve"] * terms["preserve"]
            seg = segmentation_loss(logits, target, class_weights, hardest)
            if teacher_targets:
                terms["soft"] = soft_segmentation_loss(small, *teacher_targets)
                terms["total"] = terms["total"] + wl.get("soft", 0.0) * terms["soft"]
            loss = terms["total"] + wl.get("segmentation", 0.0) * seg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", seg=f"{seg.item():.3f}")
            losses.write(json.dumps({"step": step, "loss": loss.item(), "segmentation": seg.item(),
                                     **{k: v.item() for k, v in terms.items() if k != "total"}}) + "\n")
            if step % tc["val_every"] == 0 or step == tc["steps"]:
                validate_and_keep_best()
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step, "best": json.dumps(best)}, state_path)
    bar.close()
    return best


def restart_logs(out: Path, names: tuple[str, ...], resumed_step: int | None) -> None:
    """Cut OUT's jsonl logs to the lines up to ``resumed_step`` (all lines for a fresh run: None), so a resumed
    run logs no step twice and a fresh run into an old folder starts new logs."""
    for name in names:
        path = out / name
        if not path.exists():
            continue
        kept = []
        for line in path.read_text().splitlines() if resumed_step is not None else []:
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):  # a line cut short by the interruption
                continue
            if isinstance(step, int) and step <= resumed_step:
                kept.append(line + "\n")
        path.write_text("".join(kept))


def checkpoint_metadata(cfg: dict, model: torch.nn.Module, metrics: dict) -> dict:
    return {
        "architecture": ARCHITECTURE,
        "hyper_parameters": model.hyper_parameters(),
        "parameters": count_parameters(model),
        "classes": cfg["classes"],
        "palette": cfg["palette"],
        "input": INPUT_CONVENTIONS,
        "training": {
            "data": cfg["data"],
            "segmentation_targets": cfg.get("segmentation_targets", "box-derived masks (training/datasets.py)"),
            "segmentation_teacher": teacher_of(cfg),
            "freeze_fusion": bool(cfg.get("freeze_fusion", False)),
            "trainable": cfg["train"].get("trainable"),
            "prior_source": cfg.get("prior_source", "none (trained directly, no teacher)"),
            "steps": cfg["train"]["steps"],
            "init": cfg.get("init"),
            "loss": cfg["loss"],
            "seed": cfg.get("seed", 0),
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "validation": {"data": cfg["val"], **{k: round(float(v), 4) for k, v in metrics.items()}},
    }


def set_entry(cfg: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override (the value read as YAML) to a config."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {item}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {item}: '{part}' is not a section")
    node[leaf] = yaml.safe_load(value)


def config_command(argv, description: str, load, run, default_out: str, resumable: bool = True) -> int:
    """The command line shared by training, distillation and ``fit_head``: ``--config`` [``--out``] [``--set``]
    and, when ``resumable``, [``--steps``] [``--resume``]. ``load(path)`` reads the config; ``run(cfg, out,
    resume)`` (``run(cfg, out)`` when not resumable) returns the best validation metrics (printed)."""
    ap = argparse.ArgumentParser(description=description.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", help="output folder (default: the config's 'out')")
    if resumable:
        ap.add_argument("--steps", type=int, help="override train.steps (student steps)")
        ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (same config and --steps)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config entries, dotted keys, YAML values: teacher.warmup=500 head_fit.epochs=5")
    args = ap.parse_args(argv)
    cfg = load(args.config)
    for item in args.set:
        set_entry(cfg, item)
    out = Path(args.out or cfg.get("out", default_out))
    if resumable and args.steps:
        cfg["train"]["steps"] = args.steps
    best = run(cfg, out, args.resume) if resumable else run(cfg, out)
    print(json.dumps(best, indent=2))
    return 0


def main(argv=None) -> int:
    return config_command(argv, __doc__, load_config, train, "runs/student")


if __name__ == "__main__":
    raise SystemExit(main())
