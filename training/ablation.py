"""Ablation table: directly trained vs distilled students vs their teachers (and trivial fusions).

    python -m training.ablation --out runs/ablation.md \\
        --model direct=runs/student/best.safetensors \\
        --model sage_distilled=runs/distill_sage/best.safetensors \\
        --model text_distilled=runs/distill_text/best.safetensors \\
        --model sage_teacher=runs/distill_sage/teacher.safetensors \\
        --model text_teacher=runs/distill_text/teacher.safetensors

Evaluates on the MSRS validation part (``msrs_split``: 71 pairs, with person F1 from the boxes) and on TNO
(25 pairs) at full resolution, scored as ``ivf eval`` scores (``ivf_ros.evaluation``: the fused image as served):
fusion metrics, the judge, parameters and the median CPU time of one 640x480 forward pass; for every model after
the first, 95% paired bootstrap intervals over the images of its difference from the first in VIF, Qabf, SSIM,
SCD, mean F and person F1, and its wins (metrics whose whole interval lies above 0). Put the baseline first.
Teacher files are recognised by their metadata; their conditioning (prior cache or descriptions) is the one
recorded at training time unless ``--priors`` / ``--descriptions`` say otherwise. Teacher times leave out the
prior extraction (SAM or classic) and the text encoder. Writes the markdown table and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ivf_ros.bench import time_interleaved
from ivf_ros.checkpoint import load_checkpoint
from ivf_ros.evaluation import Scored, served
from ivf_ros.evaluation import evaluate as evaluate_pairs
from ivf_ros.metrics import TRIVIAL_FUSIONS, f1_interval, mean_f_interval, mean_interval
from ivf_ros.model import count_parameters

from .datasets import CLASSES, Sample, to_tensors
from .distill import CONDITIONING, make_condition
from .teachers import load_teacher, read_teacher_metadata
from .text_priors import description_key
from .train import load_split, resolve_root

METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")
COMPARED = ("VIF", "Qabf", "SSIM", "SCD")  # the fusion metrics a distilled student must win on


def load_datasets(names: list[str], limit: int | None) -> dict[str, list[Sample]]:
    """MSRS: its validation part; any other folder: all pairs. ``limit`` keeps the first N of each."""
    roots = [resolve_root(name) for name in names]
    return {root.name: load_split({"root": str(root), "split": "val" if root.name == "msrs" else "all",
                                   "limit": limit}, CLASSES) for root in roots}


class Entry:
    """One row: a callable ``(key, sample, ir, vis_y) -> (fused, logits | None)`` plus what the table shows."""

    def __init__(self, name: str, path: str, args, datasets):
        self.name, self.condition = name, None
        meta = read_teacher_metadata(path)
        keyed = [(description_key(d, s.stem), s) for d, samples in datasets.items() for s in samples]
        if meta is not None:
            self.model, meta = load_teacher(path)
            reads = CONDITIONING[meta["teacher"]]
            override = args.priors if reads == "priors" else args.descriptions
            self.condition = make_condition(meta["teacher"], override or meta["conditioning"][reads], keyed,
                                            meta.get("condition_options"))
            self.kind = f"{meta['teacher']} teacher"
            self.source = self.condition.source
        else:
            self.model, meta = load_checkpoint(path)
            training = meta.get("training", {})
            teacher = training.get("teacher")
            self.kind = f"student distilled from {teacher['name']} teacher" if teacher else "student (direct)"
            self.source = training.get("prior_source", "not recorded")
        self.model.eval()
        self.parameters = count_parameters(self.model)

    @torch.no_grad()
    def __call__(self, key: str, s: Sample, ir: torch.Tensor, vis_y: torch.Tensor, chroma: torch.Tensor):
        if self.condition is None:  # a student: the chroma reaches heads that read it, as in the pipeline
            return self.model(ir, vis_y, chroma)
        fused, logits, _ = self.model(ir, vis_y, self.condition(key, s)[None])
        return fused, logits

    def cpu_ms(self, reps: int, key: str, s: Sample, size=(480, 640)) -> float:
        ir, vis_y = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
        cond = None if self.condition is None else self.condition(key, s)[None]
        if cond is not None and cond.ndim == 4:
            cond = F.interpolate(cond, size=size, mode="nearest")
        with torch.no_grad():
            fn = (lambda: self.model(ir, vis_y)) if cond is None else (lambda: self.model(ir, vis_y, cond))
            return time_interleaved({"m": (fn, reps)}, warmup=1)["m"].p50


def evaluate(entries: list[Entry], datasets: dict[str, list[Sample]], progress: bool = True) -> dict:
    """Mean metrics per dataset and row; for every model after the first, 95% paired bootstrap intervals (over the
    images) of its difference from the first in ``COMPARED``; where boxes exist, the judge, person F1 and mean F
    with their bootstrap intervals and, after the first model, the intervals of their paired differences."""
    results = {}
    for dataset, samples in datasets.items():
        def score(s: Sample) -> Scored:  # called within this iteration: ``dataset`` is this one
            ir, vis_y, ycc = to_tensors(s.ir, s.vis)
            fused, labels = {}, {}
            for e in entries:
                out, logits = e(description_key(dataset, s.stem), s, ir[None], vis_y[None], ycc[None, 1:])
                fused[e.name] = served(out[0, 0].numpy(), s.vis)
                if s.boxes is not None:
                    labels[e.name] = logits[0].numpy().argmax(0).astype(np.uint8)
            return Scored(s.ir, s.vis, fused, labels, s.boxes)

        evaluation = evaluate_pairs(samples, score, [e.name for e in entries], CLASSES, METRICS, progress=progress,
                                    desc=dataset)
        means = evaluation.fusion()
        rows = {name: means[name] for name in [*TRIVIAL_FUSIONS, *(e.name for e in entries)]}
        values, first_name = evaluation.values, entries[0].name
        for e in entries[1:]:
            rows[e.name]["minus_first"] = {k: mean_interval(values[e.name][k], values[first_name][k])
                                           for k in COMPARED}
        if evaluation.boxed:
            first = evaluation.scorers[entries[0].name]
            for name, scorer in evaluation.scorers.items():
                segmentation = scorer.report()
                rows[name].update(person_f1=segmentation["classes"]["person"]["f1"],
                                  person_f1_interval=f1_interval(scorer, "person"), segmentation=segmentation,
                                  mean_f_interval=mean_f_interval(scorer))
                if scorer is not first:
                    rows[name]["person_f1_minus_first"] = f1_interval(scorer, "person", reference=first)
                    rows[name]["minus_first"]["mean_f"] = mean_f_interval(scorer, reference=first)
        results[dataset] = {"pairs": len(samples), "rows": rows}
    return results


def markdown(results: dict, entries: list[Entry], timings: dict[str, float], threads: int) -> str:
    info = {e.name: e for e in entries}
    lines = []
    for dataset, res in results.items():
        lines += [f"### {dataset} ({res['pairs']} pairs)", "",
                  f"| model | kind | params | CPU ms (640x480, {threads} thread{'s' if threads > 1 else ''}) | "
                  + " | ".join(METRICS) + " | person F1 [95% interval] |",
                  "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in METRICS) + " | ---: |"]
        for name, row in res["rows"].items():
            e = info.get(name)
            kind, params = (e.kind, f"{e.parameters:,}") if e else ("trivial fusion", "0")
            ms = f"{timings[name]:.1f}" if name in timings else "-"
            f1 = (f"{row['person_f1']:.3f} [{row['person_f1_interval'][0]:.3f}, {row['person_f1_interval'][1]:.3f}]"
                  if "person_f1" in row else "-")
            lines.append(f"| {name} | {kind} | {params} | {ms} | " + " | ".join(f"{row[k]:.3f}" for k in METRICS)
                         + f" | {f1} |")
        judged = [(name, row["segmentation"]) for name, row in res["rows"].items() if "segmentation" in row]
        if judged:
            lines += ["", "Judge (pixel precision / box recall / F per class, mean F):", "",
                      "| model | " + " | ".join(CLASSES[1:]) + " | mean F |", "| --- |" + " ---: |" * len(CLASSES)]
            for name, seg in judged:
                lines.append(f"| {name} | " + " | ".join(
                    "{px_precision:.3f} / {box_recall:.3f} / {f:.3f}".format(**seg["classes"][c]) for c in CLASSES[1:])
                    + f" | {seg['mean_f']:.3f} |")
        lines += paired_table(res["rows"], entries[0].name)
        lines.append("")
    lines += ["Prior sources:", ""] + [f"- {e.name}: {e.source}" for e in entries] + [""]
    lines.append("Person F1 intervals: 95% bootstrap over the images (2,000 resamples). "
                 "Teacher times exclude prior extraction and text encoding. The object masks of sam and classic "
                 "prior caches come from the annotated boxes (box prompts), so the person F1 of teachers fed them "
                 "(sage, fusionsam) is not comparable with the students'; mfnet priors never read the boxes. Generated "
                 "descriptions (training.text_priors) count the annotated objects, so text teachers see the box "
                 "counts of boxed pairs.")
    return "\n".join(lines) + "\n"


def paired_table(rows: dict, first: str) -> list[str]:
    """Markdown lines: each later model minus ``first``, 95% paired bootstrap intervals, and its wins (metrics of
    ``COMPARED`` whose whole interval lies above 0)."""
    paired = {name: row for name, row in rows.items() if "minus_first" in row}
    if not paired:
        return []
    keys = [*COMPARED, *(["mean_f"] if any("mean_f" in r["minus_first"] for r in paired.values()) else []),
            *(["person_f1"] if any("person_f1_minus_first" in r for r in paired.values()) else [])]
    lines = ["", f"Minus {first}, 95% paired bootstrap interval over the images (2,000 resamples); wins: intervals "
                 f"of {', '.join(COMPARED)} wholly above 0:", "",
             "| model | " + " | ".join(k.replace("_", " ") for k in keys) + " | wins |",
             "| --- |" + " ---: |" * (len(keys) + 1)]
    for name, row in paired.items():
        diffs = {**row["minus_first"], **({"person_f1": row["person_f1_minus_first"]}
                                          if "person_f1_minus_first" in row else {})}
        cells = [f"[{diffs[k][0]:+.4f}, {diffs[k][1]:+.4f}]" if k in diffs else "-" for k in keys]
        wins = sum(diffs[k][0] > 0 for k in COMPARED)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wins} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Ablation: direct vs distilled students vs teachers.")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a student checkpoint or a teacher file (repeat)")
    ap.add_argument("--data", nargs="+", default=["msrs", "tno"], help="MSRS is reduced to its validation part")
    ap.add_argument("--limit", type=int, help="first N pairs of each dataset (quick check)")
    ap.add_argument("--priors", help="prior cache for SAGE teachers (default: the one recorded in the file)")
    ap.add_argument("--descriptions", help="descriptions JSON for text teachers (default: the recorded one)")
    ap.add_argument("--reps", type=int, default=10, help="timed forward passes per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="markdown file (numbers also in <out>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets = load_datasets(args.data, args.limit)
    entries = []
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model {spec}: expected NAME=PATH")
        entries.append(Entry(name, path, args, datasets))
    results = evaluate(entries, datasets)
    first_dataset = next(iter(datasets))
    key_sample = (description_key(first_dataset, datasets[first_dataset][0].stem), datasets[first_dataset][0])
    timings = {e.name: e.cpu_ms(args.reps, *key_sample) for e in entries}
    table = markdown(results, entries, timings, args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"results": results, "cpu_ms": timings,
                                                    "parameters": {e.name: e.parameters for e in entries},
                                                    "sources": {e.name: e.source for e in entries}}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
