"""Offline evaluation of the fusion pipeline on any bag, no ROS needed.

Evaluation pairs the IR and visible topics with the node's synchroniser, runs the node's pipeline on each pair and
writes an output bag (the original topics plus the node's outputs), ``report.json``, ``report.md``, plots and a
contact sheet.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import read_yolo_boxes
from ..imageops import gray_u8
from ..metrics import FUSION_METRICS, TRIVIAL_FUSIONS, BoxScorer, fusion_metrics, to_gray
from ..streams import IR, MAX_PIXELS, VIS, StreamCheck
from ..viz import draw_boxes
from .files import (IMAGE_TYPE, STORAGES, BagError, camera_topics, copy_connection, frame_names, image_message,
                    image_topics, json_default, one_line, open_bag, output_topics, percentiles, prepare_output, spread,
                    storage_of, typestore)


def stream_rate(stamps: Sequence[float]) -> float | None:
    """Rate (Hz) from the median interval between stamps."""
    if len(stamps) < 2:
        return None
    dt = float(np.median(np.diff(np.sort(np.asarray(stamps)))))
    return 1.0 / dt if dt > 0 else None


@dataclass
class TopicStats:
    name: str
    messages: int = 0
    decoded: int = 0
    decode_failed: int = 0
    encodings: set = field(default_factory=set)
    stamps: list = field(default_factory=list)

    def as_dict(self) -> dict:
        rate = stream_rate(self.stamps)
        return {"topic": self.name, "messages": self.messages, "decoded": self.decoded,
                "decode_failed": self.decode_failed, "encodings": sorted(self.encodings),
                "rate_hz": None if rate is None else round(rate, 3)}


@dataclass
class _Frame:
    index: int  # position in its topic
    stamp: float
    receive_ns: int
    header: object
    image: np.ndarray
    decode_s: float


class ErrorLog:
    """Failures grouped by where and why, with a count and the first item that failed."""

    def __init__(self):
        self.groups: dict[str, dict] = {}

    def add(self, where: str, exc: BaseException, item: str) -> None:
        key = f"{where}: {one_line(exc)}"
        group = self.groups.setdefault(key, {"error": key, "count": 0, "first": item})
        group["count"] += 1

    def as_list(self, limit: int = 10) -> list[dict]:
        return sorted(self.groups.values(), key=lambda g: -g["count"])[:limit]


def evaluate_bag(bag: str | Path, out: str | Path, *, ir_topic: str | None = None, vis_topic: str | None = None,
                 checkpoint: str | Path | None = None, boxes: str | Path | None = None, device: str = "auto",
                 slop: float = 0.05, queue_size: int = 10, metrics: Sequence[str] | None = None,
                 metrics_every: int = 1, samples: int = 4, storage: str | None = None, overwrite: bool = False,
                 progress: bool = True, pipeline=None, max_pixels: int = MAX_PIXELS) -> dict:
    """Run the node's pipeline over a bag; writes OUT/bag, report.json, report.md, plots and a contact sheet.

    Raw and compressed image topics are read; each message goes through the node's own stream check
    (``ivf_ros.streams``), so what the node rejects is counted here as ``decode_failed``. Returns the report (also in
    ``report.json``). ``pipeline`` may be a ready ``FusionPipeline``.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from tqdm import tqdm

    from ..pipeline import FusionPipeline
    from ..sync import ApproximateTimeSynchronizer

    bag, out = Path(bag), Path(out)
    metric_names = list(metrics) if metrics is not None else list(FUSION_METRICS)
    unknown = [m for m in metric_names if m not in FUSION_METRICS]
    if unknown:
        raise BagError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(FUSION_METRICS)}")
    if metrics_every < 1:
        raise BagError(f"metrics_every must be at least 1, not {metrics_every}")
    reader = open_bag(bag)
    try:
        ir_topic, vis_topic = camera_topics(reader, ir_topic, vis_topic)
        names = frame_names(reader)
        boxes_dir = Path(boxes) if boxes else None
        if boxes_dir is not None and not boxes_dir.is_dir():
            raise BagError(f"{boxes_dir}: no such boxes folder")
        storage = storage or storage_of(bag)
        if storage not in STORAGES:
            raise BagError(f"storage must be one of {', '.join(STORAGES)}, not '{storage}'")
        out_bag = prepare_output(out, overwrite)
        pipe = pipeline or FusionPipeline(checkpoint, device=device)
        ts = typestore()
        counts = image_topics(reader)
        expected_pairs = min(counts[ir_topic], counts[vis_topic])
        sample_at = set(spread(expected_pairs, samples)) if samples > 0 else set()

        sync = ApproximateTimeSynchronizer(queue_size=queue_size, slop=slop)
        stats = {ir_topic: TopicStats(ir_topic), vis_topic: TopicStats(vis_topic)}
        channel = {ir_topic: IR, vis_topic: VIS}
        checks = {IR: StreamCheck(IR, max_pixels), VIS: StreamCheck(VIS, max_pixels)}
        errors = ErrorLog()
        offsets_ms, pipeline_ms, total_ms, processed, failed = [], [], [], 0, 0
        per_frame = {"model": {m: [] for m in metric_names}, "average": {m: [] for m in metric_names},
                     "max": {m: [] for m in metric_names}}
        scorer = BoxScorer(pipe.classes) if boxes_dir is not None else None
        box_files = 0
        sheet_rows, sheet_labels = [], []
        pair_index, done_ns = 0, 0

        def process(ir: _Frame, vis: _Frame) -> None:
            nonlocal processed, failed, pair_index, box_files, done_ns
            index = pair_index
            pair_index += 1
            offsets_ms.append((ir.stamp - vis.stamp) * 1e3)
            try:
                t0 = time.perf_counter()
                result = pipe(ir.image, vis.image)
                t1 = time.perf_counter()
                overlay = pipe.overlay(result)
                fused_enc = "bgr8" if result.fused.ndim == 3 else "mono8"
                stamp_ns = vis.header.stamp.sec * 10**9 + vis.header.stamp.nanosec
                msgs = [image_message(result.fused, fused_enc, stamp_ns, vis.header.frame_id),
                        image_message(result.labels, "mono8", stamp_ns, vis.header.frame_id),
                        image_message(overlay, "bgr8", stamp_ns, vis.header.frame_id)]
                raws = [ts.serialize_cdr(m, IMAGE_TYPE) for m in msgs]
                t2 = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - a failing pair is counted and reported, the run goes on
                failed += 1
                errors.add("pipeline", exc, f"pair {index}")
                return
            processed += 1
            pipeline_ms.append((t1 - t0) * 1e3)
            total = (t2 - t0) + ir.decode_s + vis.decode_s
            total_ms.append(total * 1e3)
            # outputs leave like a node's: one pair at a time, each after the pair arrived and the previous one left
            done_ns = max(ir.receive_ns, vis.receive_ns, done_ns) + int(total * 1e9)
            for name, raw in zip(out_names, raws):
                writer.write(out_conns[name], done_ns, raw)
            if index % metrics_every == 0 and metric_names:
                _add_metrics(per_frame, metric_names, result, vis.image)
            boxes = []
            if scorer is not None:
                name = names[vis.index] if names and vis.index < len(names) else f"{vis.index:06d}"
                box_path = boxes_dir / f"{name}.txt"
                box_files += box_path.is_file()
                h, w = result.labels.shape
                boxes = read_yolo_boxes(box_path, w, h)
                scorer.add(result.labels, boxes)
            if index in sample_at:  # the labels tile shows the ground-truth boxes too
                sheet_rows.append(_thumbs(ir.image, vis.image, result.fused, draw_boxes(overlay, boxes, pipe.palette)))
                sheet_labels.append(names[vis.index] if names and vis.index < len(names) else f"pair {index}")

        writer = Writer(out_bag, version=9,
                        storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
        writer.open()
        copies, skipped = {}, []
        out_names = output_topics()
        # outputs of an earlier run in the input bag are replaced by this run's
        for conn in (c for c in reader.connections if c.topic not in out_names):
            copied = copy_connection(writer, conn, ts)
            if copied is None:
                skipped.append(conn.topic)
            else:
                copies[conn.id] = copied
        out_conns = {name: writer.add_connection(name, IMAGE_TYPE, typestore=ts) for name in out_names}
        conns = [c for c in reader.connections if c.topic in channel or c.id in copies]
        n_messages = sum(c.msgcount for c in conns if c.topic in channel)
        bar = tqdm(total=n_messages, desc=f"eval {bag.name}", unit="img", disable=None if progress else True)
        messages, read_count = reader.messages(connections=conns), 0
        try:
            while True:
                try:
                    item = next(messages, None)
                except Exception as exc:  # noqa: BLE001 - storage-level failure while reading
                    raise BagError(f"{bag}: the bag is truncated or corrupt: reading stopped after {read_count} "
                                   f"message(s) ({one_line(exc)})") from None
                if item is None:
                    break
                conn, receive_ns, raw = item
                read_count += 1
                if conn.id in copies:
                    writer.write(copies[conn.id], receive_ns, raw)
                if conn.topic not in channel:
                    continue
                bar.update(1)
                st = stats[conn.topic]
                index = st.messages
                st.messages += 1
                try:
                    t0 = time.perf_counter()
                    msg = ts.deserialize_cdr(raw, conn.msgtype)
                    st.encodings.add(getattr(msg, "encoding", None) or msg.format)
                    check = checks[channel[conn.topic]]
                    stamp = check.fields(msg)
                    checked = check.convert(msg)
                    decode_s = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001 - counted per topic and reported
                    st.decode_failed += 1
                    errors.add(f"decode {conn.topic}", exc, f"message {index}")
                    continue
                st.decoded += 1
                st.stamps.append(stamp)
                frame = _Frame(index, stamp, receive_ns, msg.header, checked.image, decode_s)
                resets = sync.resets
                made = sync.push(channel[conn.topic], stamp, frame)
                if checked.resized or sync.resets != resets:  # as the node: the IR range is learnt afresh
                    pipe.ir_normalizer.reset()
                for ir_frame, vis_frame in made:
                    process(ir_frame, vis_frame)
        finally:
            bar.close()
            writer.close()
    finally:
        reader.close()

    if boxes_dir is not None and box_files == 0 and processed:
        example = (names[0] if names else "000000") + ".txt"
        raise BagError(f"{boxes_dir}: no box file matches the bag's visible frames (looked for names like {example})")
    pending = sync.pending()
    report = {
        "bag": str(bag),
        "storage": storage,
        "checkpoint": str(checkpoint) if checkpoint else "default (models/ivf_student.safetensors)",
        "checkpoint_training": pipe.metadata.get("training"),
        "device": str(pipe.device),
        "topics": {"ir": stats[ir_topic].as_dict(), "visible": stats[vis_topic].as_dict()},
        "sync": {
            "slop_s": slop, "queue_size": queue_size, "pairs": sync.pairs,
            "unmatched": {"ir": sync.dropped[0] + pending[0], "visible": sync.dropped[1] + pending[1]},
            "resets": sync.resets,
            "offset_ms": _offset_stats(offsets_ms),
        },
        "frames": {"processed": processed, "failed": failed, "errors": errors.as_list()},
        "latency_ms": {"pipeline": percentiles(pipeline_ms), "end_to_end": percentiles(total_ms)},
        "fusion_metrics": _metric_summary(per_frame, metric_names),
        "segmentation": None,
        "outputs": {"bag": str(out_bag), "storage": storage, "topics": sorted({c.topic for c in copies.values()})
                    + out_names, "not_copied": skipped},
    }
    if scorer is not None:
        report["segmentation"] = {"boxes": str(boxes_dir), "box_files_found": box_files, **scorer.report()}
    _write_pictures(out, report, pipeline_ms, total_ms, per_frame, metric_names, sheet_rows, sheet_labels)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report


def _add_metrics(per_frame: dict, names: list[str], result, vis: np.ndarray) -> None:
    ir = gray_u8(result.ir_registered).astype(np.float64)
    vis_gray = to_gray(vis)
    fused = to_gray(result.fused)
    fusions = {"model": fused, **{name: f(ir, vis_gray) for name, f in TRIVIAL_FUSIONS.items()}}
    for method, img in fusions.items():
        for name, value in fusion_metrics(ir, vis_gray, img, names=names).items():
            per_frame[method][name].append(float(value))


def _metric_summary(per_frame: dict, names: list[str]) -> dict:
    pairs = len(per_frame["model"][names[0]]) if names else 0
    summary = {"pairs": pairs, "metrics": names}
    for method, series in per_frame.items():
        summary[method] = {m: (float(np.mean([v for v in series[m] if math.isfinite(v)]))
                               if any(math.isfinite(v) for v in series[m]) else None) for m in names}
    return summary


def _offset_stats(offsets_ms: list[float]) -> dict:
    if not offsets_ms:
        return {"count": 0}
    a = np.asarray(offsets_ms)
    absolute = np.abs(a)
    return {"count": int(a.size), "mean": float(a.mean()), "median_abs": float(np.median(absolute)),
            "p95_abs": float(np.percentile(absolute, 95)), "max_abs": float(absolute.max())}


def _thumbs(ir, vis, fused, overlay, width: int = 240) -> list[np.ndarray]:
    import cv2

    from ..viz import display_bgr

    tiles = []
    for img, stretch in ((ir, True), (vis, False), (fused, False), (overlay, False)):
        tile = display_bgr(img, stretch)
        h = max(1, int(round(tile.shape[0] * width / tile.shape[1])))
        tiles.append(cv2.resize(tile, (width, h), interpolation=cv2.INTER_AREA))
    return tiles


def _write_pictures(out: Path, report: dict, pipeline_ms, total_ms, per_frame, metric_names, rows, labels) -> None:
    from ..viz import contact_sheet, latency_histogram, metric_plot, write_png

    pictures = {}
    if total_ms:
        pictures["latency_histogram"] = str(latency_histogram(
            out / "latency.png", {"pipeline": pipeline_ms, "end to end": total_ms}, "latency per pair (ms)"))
    shown = [m for m in ("EN", "MI", "Qabf", "VIF", "SSIM") if m in metric_names] or metric_names[:4]
    if shown and per_frame["model"][shown[0]]:
        pictures["metrics_plot"] = str(metric_plot(out / "metrics.png", per_frame, shown))
    if rows:
        sheet = contact_sheet(rows, ("IR", "visible", "fused", "labels"), labels)
        pictures["contact_sheet"] = str(write_png(out / "contact_sheet.png", sheet))
    report["outputs"].update(pictures)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def report_markdown(report: dict) -> str:
    """The report as Markdown: sync, frames, latency, fusion metrics (model vs average and max), segmentation."""
    lines = [f"# Bag evaluation: `{report['bag']}`", ""]
    training = report.get("checkpoint_training")
    note = training.get("note") if isinstance(training, dict) else None
    lines += [f"Checkpoint: {report['checkpoint']} on {report['device']}{f' ({note})' if note else ''}.", ""]
    lines += ["## Topics and synchronisation", "",
              "| | topic | messages | decoded | decode failed | encodings | rate Hz |",
              "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for key, t in report["topics"].items():
        lines.append(f"| {key} | `{t['topic']}` | {t['messages']} | {t['decoded']} | {t['decode_failed']} | "
                     f"{', '.join(t['encodings'])} | {_fmt(t['rate_hz'], 2)} |")
    s = report["sync"]
    o = s["offset_ms"]
    lines += ["", f"Approximate-time sync (slop {s['slop_s'] * 1e3:.0f} ms, queue {s['queue_size']}): "
                  f"**{s['pairs']} pairs**, unmatched IR {s['unmatched']['ir']}, unmatched visible "
                  f"{s['unmatched']['visible']}, resets {s['resets']}."]
    if o.get("count"):
        lines.append(f"IR - visible stamp offset: mean {o['mean']:.2f} ms, median |offset| {o['median_abs']:.2f} ms, "
                     f"p95 {o['p95_abs']:.2f} ms, max {o['max_abs']:.2f} ms.")
    f = report["frames"]
    lines += ["", f"Pairs processed: {f['processed']}, failed: {f['failed']}."]
    for e in f["errors"]:
        lines.append(f"- {e['count']} x {e['error']} (first: {e['first']})")
    lines += ["", "## Latency per pair (ms)", "", "| | pairs | mean | p50 | p90 | p99 | max |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, p in report["latency_ms"].items():
        if p.get("count"):
            lines.append(f"| {key.replace('_', ' ')} | {p['count']} | {p['mean']:.1f} | {p['p50']:.1f} | "
                         f"{p['p90']:.1f} | {p['p99']:.1f} | {p['max']:.1f} |")
    m = report["fusion_metrics"]
    if m["pairs"]:
        lines += ["", f"## Fusion metrics (mean over {m['pairs']} pairs)", "",
                  "Trivial fusions are strong on some metrics; they are shown beside the model.", "",
                  "| metric | model | average | max |", "| --- | ---: | ---: | ---: |"]
        for name in m["metrics"]:
            lines.append(f"| {name} | {_fmt(m['model'][name])} | {_fmt(m['average'][name])} | {_fmt(m['max'][name])} |")
    seg = report.get("segmentation")
    if seg:
        lines += ["", f"## Segmentation against boxes ({seg['box_files_found']} box files in `{seg['boxes']}`)", ""]
        classes = seg["classes"]
        keys = list(next((v for v in classes.values() if isinstance(v, dict)), {}))
        lines += ["| class | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        for name, v in classes.items():
            if isinstance(v, dict):
                lines.append(f"| {name} | " + " | ".join(_fmt(v.get(k)) for k in keys) + " |")
        if "mean_f" in seg:
            lines += ["", f"Judge mean F (px_precision / box_recall / f per class above): {_fmt(seg['mean_f'])}"]
    outputs = report["outputs"]
    lines += ["", "## Outputs", "", f"- bag: `{outputs['bag']}` ({outputs['storage']}), topics: "
              + ", ".join(f"`{t}`" for t in outputs["topics"])]
    if outputs.get("not_copied"):
        lines.append("- not copied (unknown message type): " + ", ".join(outputs["not_copied"]))
    for key in ("latency_histogram", "metrics_plot", "contact_sheet"):
        if key in outputs:
            lines.append(f"- {key.replace('_', ' ')}: ![{key}]({Path(outputs[key]).name})")
    return "\n".join(lines) + "\n"
