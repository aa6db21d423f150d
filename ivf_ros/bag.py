"""rosbag2 tools without ROS: write camera bags from image folders, evaluate the fusion pipeline on any bag.

Bags are read and written with the pure-Python ``rosbags`` library (mcap and sqlite3 storage). Evaluation pairs the
IR and visible topics with the node's synchroniser, runs the node's pipeline on each pair and writes an output bag
(the original topics plus the node's outputs), ``report.json``, ``report.md``, plots and a contact sheet.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from . import ros_image
from .data import PairingError, find_pairs, list_images, read_ir, read_vis, read_yolo_boxes
from .imageops import gray_u8
from .metrics import FUSION_METRICS, TRIVIAL_FUSIONS, BoxScorer, fusion_metrics, to_gray

IR_TOPIC = "/ir/image"
VIS_TOPIC = "/visible/image"
NODE_NAME = "fusion_node"
OUTPUT_SUFFIXES = ("fused", "labels", "labels_color")
IMAGE_TYPE = "sensor_msgs/msg/Image"
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
FRAME_NAMES_KEY = "ivf_ros.visible_frame_names"  # bag custom data: names of the visible frames, JSON list
START_NS = 1_700_000_000 * 10**9  # stamp of the first frame in bags we write (a fixed, realistic epoch)
RECEIVE_DELAY_NS = 2_000_000  # bag (receive) time after the header stamp, as a recorder on the camera host sees it
VIS_ENCODINGS = ("mono8", "8UC1", "bgr8", "rgb8", "bgra8", "rgba8")
IR_ENCODINGS = tuple(ros_image.ENCODINGS)
STORAGES = ("mcap", "sqlite3")


class BagError(ValueError):
    """A bag cannot be written or evaluated; the message says which bag and why."""


@lru_cache(maxsize=1)
def typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def output_topics(node_name: str = NODE_NAME) -> list[str]:
    """The node's output topics (``~/fused``, ``~/labels``, ``~/labels_color``) under its default name."""
    return [f"/{node_name}/{suffix}" for suffix in OUTPUT_SUFFIXES]


# -------------------------------------------------------------------------------------------------- messages


def _stamp(ns: int):
    ts = typestore()
    return ts.types["builtin_interfaces/msg/Time"](sec=int(ns // 10**9), nanosec=int(ns % 10**9))


def image_message(array: np.ndarray, encoding: str, stamp_ns: int, frame_id: str):
    """A rosbags sensor_msgs/Image holding ``array`` (OpenCV order) in ``encoding``."""
    ts = typestore()
    fields = ros_image.from_array(array, encoding)
    fields["data"] = np.frombuffer(fields["data"], np.uint8)
    header = ts.types["std_msgs/msg/Header"](stamp=_stamp(stamp_ns), frame_id=frame_id)
    return ts.types[IMAGE_TYPE](header=header, **fields)


def camera_info_message(width: int, height: int, stamp_ns: int, frame_id: str):
    """A nominal pinhole CameraInfo (focal length = image width, about 53 degrees across, no distortion)."""
    ts = typestore()
    f, cx, cy = float(width), (width - 1) / 2.0, (height - 1) / 2.0
    header = ts.types["std_msgs/msg/Header"](stamp=_stamp(stamp_ns), frame_id=frame_id)
    roi = ts.types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return ts.types[INFO_TYPE](
        header=header, height=height, width=width, distortion_model="plumb_bob", d=np.zeros(5),
        k=np.array([f, 0, cx, 0, f, cy, 0, 0, 1], np.float64), r=np.eye(3).ravel(),
        p=np.array([f, 0, cx, 0, 0, f, cy, 0, 0, 0, 1, 0], np.float64), binning_x=0, binning_y=0, roi=roi)


def header_seconds(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


# -------------------------------------------------------------------------------------------------- writing


@dataclass
class CameraStream:
    """Frames of one camera: stamps (s from the start) and images (arrays, or paths read on demand)."""

    topic: str
    frame_id: str
    stamps: list[float]
    images: list  # np.ndarray or Path
    encoding: str | None = None  # None: mono8 / mono16 / bgr8 from the image itself
    is_ir: bool = False

    def load(self, i: int) -> np.ndarray:
        img = self.images[i]
        if isinstance(img, np.ndarray):
            return img
        return read_ir(img) if self.is_ir else read_vis(img)


def _convert(img: np.ndarray, encoding: str | None) -> tuple[np.ndarray, str]:
    if encoding is None:
        if img.ndim == 3:
            return img, "bgr8"
        return img, "mono16" if img.dtype == np.uint16 else "mono8"
    if encoding == "mono16" and img.dtype == np.uint8:
        return img.astype(np.uint16) * 257, encoding
    if encoding == "mono8" and img.dtype == np.uint16:
        return (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8), encoding
    return img, encoding


def write_camera_bag(path: str | Path, streams: Sequence[CameraStream], storage: str = "mcap",
                     frame_names: Sequence[str] | None = None, start_ns: int = START_NS,
                     progress: bool = False) -> dict:
    """Write image and CameraInfo topics for each stream, messages in receive-time order; returns a summary.

    ``frame_names`` (one per frame of the visible stream) are stored in the bag's custom data so that
    ``ivf bag eval --boxes`` can find each frame's label file by name.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
    from tqdm import tqdm

    if storage not in STORAGES:
        raise BagError(f"storage must be one of {', '.join(STORAGES)}, not '{storage}'")
    path = Path(path)
    if path.exists():
        raise BagError(f"{path}: exists already; rosbag2 bags are written to a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = typestore()
    events = sorted((start_ns + int(round(s.stamps[i] * 1e9)), k, i) for k, s in enumerate(streams)
                    for i in range(len(s.stamps)))
    if not events:
        raise BagError("no frames to write")
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    writer = Writer(path, version=9, storage_plugin=plugin)
    counts = {s.topic: 0 for s in streams}
    encodings: dict[str, str] = {}
    try:
        if frame_names is not None:
            writer.set_custom_data(FRAME_NAMES_KEY, json.dumps(list(frame_names)))
        writer.open()
        conns = [(writer.add_connection(s.topic, IMAGE_TYPE, typestore=ts),
                  writer.add_connection(s.topic.rsplit("/", 1)[0] + "/camera_info", INFO_TYPE, typestore=ts))
                 for s in streams]
        for stamp_ns, k, i in tqdm(events, desc="writing bag", unit="msg", disable=not progress):
            stream = streams[k]
            img, encoding = _convert(stream.load(i), stream.encoding)
            encodings[stream.topic] = encoding
            msg = image_message(img, encoding, stamp_ns, stream.frame_id)
            info = camera_info_message(img.shape[1], img.shape[0], stamp_ns, stream.frame_id)
            writer.write(conns[k][0], stamp_ns + RECEIVE_DELAY_NS, ts.serialize_cdr(msg, IMAGE_TYPE))
            writer.write(conns[k][1], stamp_ns + RECEIVE_DELAY_NS, ts.serialize_cdr(info, INFO_TYPE))
            counts[stream.topic] += 1
    except (WriterError, ValueError) as exc:
        writer.close()
        raise BagError(f"{path}: {exc}") from None
    writer.close()
    return {"bag": str(path), "storage": storage, "messages": counts, "encodings": encodings}


def camera_stamps(n: int, rate: float, offset: float = 0.0, jitter: float = 0.0, rng=None) -> list[float]:
    """``n`` stamps at ``rate`` Hz starting at ``offset`` s, each moved by Gaussian ``jitter`` (s, clipped to a
    third of the period so stamps stay in order)."""
    if rate <= 0:
        raise BagError(f"rate must be positive, not {rate}")
    period = 1.0 / rate
    rng = rng if rng is not None else np.random.default_rng(0)
    moves = np.clip(rng.normal(0.0, jitter, n), -period / 3, period / 3) if jitter > 0 else np.zeros(n)
    return [max(0.0, offset + i * period + float(d)) for i, d in enumerate(moves)]


def folder_streams(ir_dir: str | Path, vis_dir: str | Path, rate: float = 10.0, vis_rate: float | None = None,
                   offset_ms: float = 8.0, jitter_ms: float = 0.0, ir_encoding: str | None = None,
                   limit: int | None = None, seed: int = 0) -> tuple[list[CameraStream], list[str], str]:
    """Camera streams from two image folders; returns (streams, visible frame names, mode).

    Folders whose file names pair up are aligned pairs (``mode="pairs"``): both cameras run at ``rate`` and the
    visible camera lags ``offset_ms``. Otherwise each folder is a video in name order (``mode="video"``), the
    visible one at ``vis_rate`` (default ``rate``). ``limit`` keeps that many frames (pairs), evenly spread.
    """
    try:
        pairs = find_pairs(ir_dir, vis_dir)
        ir_paths, vis_paths, mode = [p.ir for p in pairs], [p.vis for p in pairs], "pairs"
    except PairingError:
        ir_paths, vis_paths, mode = list(list_images(ir_dir).values()), list(list_images(vis_dir).values()), "video"
        if not ir_paths or not vis_paths:
            raise BagError(f"no images in {ir_dir if not ir_paths else vis_dir}") from None
    if limit is not None and limit > 0:
        if mode == "pairs":
            keep = _spread(len(ir_paths), limit)
            ir_paths, vis_paths = [ir_paths[i] for i in keep], [vis_paths[i] for i in keep]
        else:
            ir_paths, vis_paths = ir_paths[:limit], vis_paths[:limit]
    rng = np.random.default_rng(seed)
    vis_rate = vis_rate or rate
    ir = CameraStream(IR_TOPIC, "ir_camera", camera_stamps(len(ir_paths), rate, 0.0, jitter_ms / 1e3, rng),
                      ir_paths, ir_encoding, is_ir=True)
    vis = CameraStream(VIS_TOPIC, "visible_camera",
                       camera_stamps(len(vis_paths), vis_rate, offset_ms / 1e3, jitter_ms / 1e3, rng), vis_paths)
    return [ir, vis], [p.stem for p in vis_paths], mode


def _spread(n: int, k: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, k))})


# -------------------------------------------------------------------------------------------------- reading


def open_bag(path: str | Path):
    """An open rosbags Reader; missing, unreadable and truncated bags raise ``BagError``."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise BagError(f"{path}: no such bag")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # noqa: BLE001 - rosbags raises many types for damaged files
        hint = " (an interrupted mcap recording can be repaired with `mcap recover`)" if "magic" in str(exc) else ""
        raise BagError(f"{path}: not a readable rosbag2 bag: truncated, corrupt or not a bag ({_one_line(exc)})"
                       f"{hint}") from None
    return reader


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def image_topics(reader) -> dict[str, int]:
    """Image topics of a bag and their message counts."""
    return {name: info.msgcount for name, info in reader.topics.items() if info.msgtype == IMAGE_TYPE}


_IR_NAME = re.compile(r"(^|[/_])(ir|lwir|thermal|infrared|therm)([/_]|$)", re.I)
_VIS_NAME = re.compile(r"(^|[/_])(vis|vi|visible|rgb|color|colour|camera)([/_]|$)", re.I)


def pick_topics(reader, ir_topic: str | None = None, vis_topic: str | None = None) -> tuple[str, str]:
    """The IR and visible image topics: as given, else ``/ir/image`` and ``/visible/image``, else by name."""
    images = image_topics(reader)
    outputs = tuple(f"/{s}" for s in OUTPUT_SUFFIXES)
    candidates = [t for t in images if not t.endswith(outputs)]
    listing = ", ".join(f"{t} ({n})" for t, n in images.items()) or "none"

    def choose(given: str | None, default: str, pattern, what: str, taken: str | None = None) -> str:
        if given:
            if given not in reader.topics:
                raise BagError(f"{reader.path}: no topic {given}; image topics: {listing}")
            if given not in images:
                raise BagError(f"{reader.path}: topic {given} is {reader.topics[given].msgtype}, not {IMAGE_TYPE}")
            return given
        if default in images:
            return default
        found = [t for t in candidates if pattern.search(t) and t != taken]
        if len(found) != 1:
            raise BagError(f"{reader.path}: cannot tell which image topic is {what} (image topics: {listing}); "
                           f"pass --{'ir' if what == 'IR' else 'vis'}-topic")
        return found[0]

    ir = choose(ir_topic, IR_TOPIC, _IR_NAME, "IR")
    vis = choose(vis_topic, VIS_TOPIC, _VIS_NAME, "visible", taken=ir)
    if ir == vis:
        raise BagError(f"{reader.path}: IR and visible topics are both {ir}")
    return ir, vis


def frame_names(reader) -> list[str] | None:
    """Visible frame names stored by ``ivf bag make`` (None for other bags)."""
    custom = getattr(getattr(reader.storage, "metadata", None), "custom", None) or {}
    text = custom.get(FRAME_NAMES_KEY)
    return json.loads(text) if text else None


def percentiles(values: Sequence[float]) -> dict:
    """count, mean, p50, p90, p99 and max of a series (empty series: count 0)."""
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(a, (50, 90, 99))
    return {"count": int(a.size), "mean": float(a.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(a.max())}


def stream_rate(stamps: Sequence[float]) -> float | None:
    """Rate (Hz) from the median interval between stamps."""
    if len(stamps) < 2:
        return None
    dt = float(np.median(np.diff(np.sort(np.asarray(stamps)))))
    return 1.0 / dt if dt > 0 else None


# -------------------------------------------------------------------------------------------------- evaluation


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
        key = f"{where}: {_one_line(exc)}"
        group = self.groups.setdefault(key, {"error": key, "count": 0, "first": item})
        group["count"] += 1

    def as_list(self, limit: int = 10) -> list[dict]:
        return sorted(self.groups.values(), key=lambda g: -g["count"])[:limit]


def _check_first_encoding(reader, topic: str, supported: Sequence[str]) -> None:
    ts = typestore()
    conns = [c for c in reader.connections if c.topic == topic]
    try:
        for _, _, raw in reader.messages(connections=conns):
            encoding = ts.deserialize_cdr(raw, IMAGE_TYPE).encoding
            if encoding not in supported:
                raise BagError(f"{reader.path}: topic {topic} has encoding '{encoding}', which is not supported "
                               f"(supported: {', '.join(supported)})")
            return
    except BagError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BagError(f"{reader.path}: cannot read {topic}: the bag is truncated or corrupt "
                       f"({_one_line(exc)})") from None
    raise BagError(f"{reader.path}: topic {topic} has no messages")


def _copy_connection(writer, conn, ts):
    """Add a connection to ``writer`` like ``conn`` (source message definition where known); None if impossible."""
    if conn.msgdef.data and conn.digest:
        return writer.add_connection(conn.topic, conn.msgtype, msgdef=conn.msgdef.data, rihs01=conn.digest)
    if conn.msgtype in ts.types:
        return writer.add_connection(conn.topic, conn.msgtype, typestore=ts)
    return None


def _storage_of(path: Path) -> str:
    """Storage of a bag folder or file: sqlite3 when it holds .db3 files, else mcap."""
    return "sqlite3" if path.suffix == ".db3" or (path.is_dir() and any(path.glob("*.db3"))) else "mcap"


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Create ``out`` and return ``out/bag``, which must not exist unless ``overwrite``."""
    out.mkdir(parents=True, exist_ok=True)
    out_bag = out / "bag"
    if out_bag.exists():
        if not overwrite:
            raise BagError(f"{out_bag}: exists already (use --force to replace it)")
        shutil.rmtree(out_bag)
    return out_bag


def evaluate_bag(bag: str | Path, out: str | Path, *, ir_topic: str | None = None, vis_topic: str | None = None,
                 checkpoint: str | Path | None = None, boxes: str | Path | None = None, device: str = "auto",
                 slop: float = 0.05, queue_size: int = 10, metrics: Sequence[str] | None = None,
                 metrics_every: int = 1, samples: int = 4, storage: str | None = None, overwrite: bool = False,
                 progress: bool = True, pipeline=None) -> dict:
    """Run the node's pipeline over a bag; writes OUT/bag, report.json, report.md, plots and a contact sheet.

    Returns the report (also in ``report.json``). ``pipeline`` may be a ready ``FusionPipeline``.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from tqdm import tqdm

    from .pipeline import FusionPipeline
    from .sync import ApproximateTimeSynchronizer

    bag, out = Path(bag), Path(out)
    metric_names = list(metrics) if metrics is not None else list(FUSION_METRICS)
    unknown = [m for m in metric_names if m not in FUSION_METRICS]
    if unknown:
        raise BagError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(FUSION_METRICS)}")
    if metrics_every < 1:
        raise BagError(f"metrics_every must be at least 1, not {metrics_every}")
    reader = open_bag(bag)
    try:
        ir_topic, vis_topic = pick_topics(reader, ir_topic, vis_topic)
        _check_first_encoding(reader, ir_topic, IR_ENCODINGS)
        _check_first_encoding(reader, vis_topic, VIS_ENCODINGS)
        names = frame_names(reader)
        boxes_dir = Path(boxes) if boxes else None
        if boxes_dir is not None and not boxes_dir.is_dir():
            raise BagError(f"{boxes_dir}: no such boxes folder")
        storage = storage or _storage_of(bag)
        if storage not in STORAGES:
            raise BagError(f"storage must be one of {', '.join(STORAGES)}, not '{storage}'")
        out_bag = prepare_output(out, overwrite)
        pipe = pipeline or FusionPipeline(checkpoint, device=device)
        ts = typestore()
        counts = image_topics(reader)
        expected_pairs = min(counts[ir_topic], counts[vis_topic])
        sample_at = set(_spread(expected_pairs, samples)) if samples > 0 else set()

        sync = ApproximateTimeSynchronizer(queue_size=queue_size, slop=slop)
        stats = {ir_topic: TopicStats(ir_topic), vis_topic: TopicStats(vis_topic)}
        channel = {ir_topic: 0, vis_topic: 1}
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
            if scorer is not None:
                name = names[vis.index] if names and vis.index < len(names) else f"{vis.index:06d}"
                box_path = boxes_dir / f"{name}.txt"
                box_files += box_path.is_file()
                h, w = result.labels.shape
                scorer.add(result.labels, read_yolo_boxes(box_path, w, h))
            if index in sample_at:
                sheet_rows.append(_thumbs(ir.image, vis.image, result.fused, overlay))
                sheet_labels.append(names[vis.index] if names and vis.index < len(names) else f"pair {index}")

        writer = Writer(out_bag, version=9,
                        storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
        writer.open()
        copies, skipped = {}, []
        out_names = output_topics()
        # outputs of an earlier run in the input bag are replaced by this run's
        for conn in (c for c in reader.connections if c.topic not in out_names):
            copied = _copy_connection(writer, conn, ts)
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
                                   f"message(s) ({_one_line(exc)})") from None
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
                    msg = ts.deserialize_cdr(raw, IMAGE_TYPE)
                    st.encodings.add(msg.encoding)
                    supported = IR_ENCODINGS if channel[conn.topic] == 0 else VIS_ENCODINGS
                    image = ros_image.image_to_array(msg, supported)
                    decode_s = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001 - counted per topic and reported
                    st.decode_failed += 1
                    errors.add(f"decode {conn.topic}", exc, f"message {index}")
                    continue
                st.decoded += 1
                stamp = header_seconds(msg)
                st.stamps.append(stamp)
                frame = _Frame(index, stamp, receive_ns, msg.header, image, decode_s)
                for ir_frame, vis_frame in sync.push(channel[conn.topic], stamp, frame):
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
        report["segmentation"] = {"boxes": str(boxes_dir), "box_files_found": box_files, "classes": scorer.summary()}
    _write_pictures(out, report, pipeline_ms, total_ms, per_frame, metric_names, sheet_rows, sheet_labels)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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

    from .viz import display_bgr

    tiles = []
    for img, stretch in ((ir, True), (vis, False), (fused, False), (overlay, False)):
        tile = display_bgr(img, stretch)
        h = max(1, int(round(tile.shape[0] * width / tile.shape[1])))
        tiles.append(cv2.resize(tile, (width, h), interpolation=cv2.INTER_AREA))
    return tiles


def _write_pictures(out: Path, report: dict, pipeline_ms, total_ms, per_frame, metric_names, rows, labels) -> None:
    from .viz import contact_sheet, latency_histogram, metric_plot, write_png

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
    outputs = report["outputs"]
    lines += ["", "## Outputs", "", f"- bag: `{outputs['bag']}` ({outputs['storage']}), topics: "
              + ", ".join(f"`{t}`" for t in outputs["topics"])]
    if outputs.get("not_copied"):
        lines.append("- not copied (unknown message type): " + ", ".join(outputs["not_copied"]))
    for key in ("latency_histogram", "metrics_plot", "contact_sheet"):
        if key in outputs:
            lines.append(f"- {key.replace('_', ' ')}: ![{key}]({Path(outputs[key]).name})")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- ROS replay


def _ros_message_class(msgtype: str):
    """The rclpy message class of ``pkg/msg/Name``, or None when that package is not installed."""
    import importlib

    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        return None


def replay(node, bag: str | Path, *, rate: float = 1.0, loop: bool = False, topics: Sequence[str] | None = None,
           clock: bool = True, reliability: str = "reliable", wait_for_subscribers: float = 0.0, stop=None,
           on_publish=None, progress: bool = False) -> dict:
    """Publish a bag's image (and CameraInfo) topics from ``node`` with their recorded timing.

    Messages go out as recorded (serialized CDR, original header stamps) at their receive-time spacing divided
    by ``rate``; ``/clock`` carries bag time (100 Hz and before every message) for nodes with use_sim_time.
    ``wait_for_subscribers`` seconds at most are spent waiting until every image topic has a subscriber.
    ``stop`` (a threading.Event) ends playback early; ``on_publish(topic, bag_ns, raw)`` is called after each
    message. Returns message counts per topic and the number of passes.
    """
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from tqdm import tqdm

    if rate <= 0:
        raise BagError(f"rate must be positive, not {rate}")
    if reliability not in ("reliable", "best_effort"):
        raise BagError(f"reliability must be reliable or best_effort, not '{reliability}'")
    reader = open_bag(bag)
    try:
        wanted = set(topics) if topics else None
        conns = [c for c in reader.connections
                 if (c.topic in wanted if wanted else c.msgtype in (IMAGE_TYPE, INFO_TYPE))]
        if wanted and wanted - {c.topic for c in conns}:
            raise BagError(f"{bag}: no topic(s) {', '.join(sorted(wanted - {c.topic for c in conns}))}")
        if not conns:
            raise BagError(f"{bag}: no image topics to replay")
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT)
        publishers, unknown = {}, []
        for conn in conns:
            cls = _ros_message_class(conn.msgtype)
            if cls is None:
                unknown.append(conn.topic)
            elif conn.topic not in publishers:
                publishers[conn.topic] = node.create_publisher(cls, conn.topic, qos)
        if unknown:
            node.get_logger().warning(f"not replayed (message package not installed): {', '.join(unknown)}")
        clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=1)) if clock else None
        images = [p for t, p in publishers.items() if reader.topics[t].msgtype == IMAGE_TYPE]
        deadline = time.monotonic() + wait_for_subscribers
        while time.monotonic() < deadline and not all(p.get_subscription_count() for p in images):
            time.sleep(0.05)

        def tick(bag_ns: int) -> None:
            if clock_pub is not None:
                msg = Clock()
                msg.clock.sec, msg.clock.nanosec = int(bag_ns // 10**9), int(bag_ns % 10**9)
                clock_pub.publish(msg)

        counts = {t: 0 for t in publishers}
        passes, start_ns = 0, None
        total = sum(c.msgcount for c in conns if c.topic in publishers)
        with tqdm(total=total, desc=f"replay {Path(bag).name}", unit="msg", disable=not progress) as bar:
            while not (stop is not None and stop.is_set()):
                passes += 1
                start_ns, wall0 = None, time.monotonic()  # each pass restarts at the bag's first message
                if passes > 1:
                    bar.reset(total)
                for conn, bag_ns, raw in reader.messages(connections=[c for c in conns if c.topic in publishers]):
                    if start_ns is None:
                        start_ns = bag_ns
                    target = wall0 + (bag_ns - start_ns) * 1e-9 / rate
                    while (now := time.monotonic()) < target:
                        if stop is not None and stop.is_set():
                            return {"messages": counts, "passes": passes, "start_ns": start_ns}
                        tick(start_ns + int((now - wall0) * rate * 1e9))
                        time.sleep(min(target - now, 0.01))
                    tick(bag_ns)
                    publishers[conn.topic].publish(bytes(raw))
                    counts[conn.topic] += 1
                    bar.update(1)
                    if on_publish is not None:
                        on_publish(conn.topic, bag_ns, raw)
                if not loop:
                    break
    finally:
        reader.close()
    return {"messages": counts, "passes": passes, "start_ns": start_ns}


def node_command() -> list[str]:
    """How to start the node: the ``fusion_node`` script beside this Python, else ``python -m ivf_ros.node``."""
    import sys

    script = Path(sys.executable).with_name("fusion_node")
    if script.is_file():
        return [str(script)]
    found = shutil.which("fusion_node")
    return [found] if found else [sys.executable, "-m", "ivf_ros.node"]


def _log_tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:]) or "no output"


def evaluate_live(bag: str | Path, out: str | Path, *, ir_topic: str | None = None, vis_topic: str | None = None,
                  checkpoint: str | Path | None = None, device: str = "auto", slop: float = 0.05,
                  queue_size: int = 10, rate: float = 1.0, storage: str | None = None, overwrite: bool = False,
                  domain_id: int | None = None, startup_timeout: float = 120.0, samples: int = 4,
                  progress: bool = True) -> dict:
    """Replay a bag into the real ``fusion_node`` (a subprocess, use_sim_time) and record what it publishes.

    Writes OUT/bag (the replayed topics plus the node's outputs and /diagnostics as received), report.json,
    report.md, a latency histogram and a contact sheet. Latency is wall time from publishing the visible image
    to receiving its fused image.
    """
    import os
    import signal
    import subprocess
    import threading

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from .node import use_fastdds_profile
    from .sync import ApproximateTimeSynchronizer

    bag, out = Path(bag), Path(out)
    reader = open_bag(bag)
    try:
        ir_topic, vis_topic = pick_topics(reader, ir_topic, vis_topic)
        _check_first_encoding(reader, ir_topic, IR_ENCODINGS)
        _check_first_encoding(reader, vis_topic, VIS_ENCODINGS)
        expected = _expected_pairs(reader, ir_topic, vis_topic, ApproximateTimeSynchronizer(queue_size, slop))
        counts = image_topics(reader)
        replayed = [t for t, info in reader.topics.items()  # never the node's own outputs of an earlier run
                    if info.msgtype in (IMAGE_TYPE, INFO_TYPE) and t not in output_topics()]
    finally:
        reader.close()
    storage = storage or _storage_of(bag)
    out_bag = prepare_output(out, overwrite)

    env = dict(os.environ)
    use_fastdds_profile(env)
    use_fastdds_profile()  # this process publishes and subscribes too: both ends need the profile
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    params = {"use_sim_time": "true", "publish_labels_color": "true", "device": device, "sync.slop": str(float(slop)),
              "sync.queue_size": str(int(queue_size))}
    if checkpoint:
        params["checkpoint"] = str(Path(checkpoint).resolve())
    cmd = node_command() + ["--ros-args"] + [a for k, v in params.items() for a in ("-p", f"{k}:={v}")] + [
        "-r", f"ir/image:={ir_topic}", "-r", f"visible/image:={vis_topic}"]
    log_path = out / "node.log"
    outputs = output_topics()
    received: dict[str, list] = {t: [] for t in outputs + ["/diagnostics"]}
    published_wall: dict[tuple, float] = {}
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    executor = SingleThreadedExecutor(context=context)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        node = rclpy.create_node("ivf_bag_eval", context=context)
        executor.add_node(node)
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        for topic in outputs:
            node.create_subscription(Image, topic, lambda raw, t=topic: received[t].append((time.monotonic(), raw)),
                                     qos, raw=True)
        node.create_subscription(DiagnosticArray, "/diagnostics",
                                 lambda raw: received["/diagnostics"].append((time.monotonic(), raw)), qos, raw=True)
        spinner.start()
        ready = _wait_for_node(node, proc, (ir_topic, vis_topic), startup_timeout, log_path)
        if not ready:
            raise BagError(f"fusion_node did not subscribe to {ir_topic} and {vis_topic} within "
                           f"{startup_timeout:.0f} s; its log: {_log_tail(log_path)}")
        ts = typestore()

        def on_publish(topic: str, bag_ns: int, raw) -> None:
            if topic == vis_topic:
                msg = ts.deserialize_cdr(raw, IMAGE_TYPE)
                published_wall[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = time.monotonic()

        wall_start = time.monotonic()
        played = replay(node, bag, rate=rate, topics=replayed, on_publish=on_publish, progress=progress)
        _drain(received[outputs[0]], expected, quiet=1.5, limit=15.0)
        wall_end = time.monotonic()
        if proc.poll() is not None:
            raise BagError(f"fusion_node exited with code {proc.returncode} during replay; its log: "
                           f"{_log_tail(log_path)}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        executor.shutdown()
        rclpy.try_shutdown(context=context)

    ts = typestore()
    latencies = []
    for wall, raw in received[outputs[0]]:
        stamp = ts.deserialize_cdr(bytes(raw), IMAGE_TYPE).header.stamp
        if (stamp.sec, stamp.nanosec) in published_wall:
            latencies.append((wall - published_wall[(stamp.sec, stamp.nanosec)]) * 1e3)
    diagnostics = _last_diagnostics(received["/diagnostics"])
    _write_live_bag(bag, out_bag, storage, received, wall_start, played["start_ns"], rate)
    report = {
        "mode": "live",
        "bag": str(bag),
        "storage": storage,
        "node": {"command": " ".join(cmd), "log": str(log_path), "diagnostics": diagnostics},
        "replay": {"rate": rate, "messages": played["messages"], "seconds": round(wall_end - wall_start, 3)},
        "topics": {"ir": {"topic": ir_topic, "messages": counts[ir_topic]},
                   "visible": {"topic": vis_topic, "messages": counts[vis_topic]}},
        "sync": {"slop_s": slop, "queue_size": queue_size, "expected_pairs": expected},
        "received": {t: len(v) for t, v in received.items()},
        "latency_ms": {"visible_to_fused": percentiles(latencies)},
        "outputs": {"bag": str(out_bag), "storage": storage},
    }
    _write_live_pictures(bag, out, report, received, outputs, ir_topic, vis_topic, latencies, samples)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(live_report_markdown(report))
    return report


def _expected_pairs(reader, ir_topic: str, vis_topic: str, sync) -> int:
    """Pairs the synchroniser makes from the bag's header stamps (what the node can fuse at most)."""
    ts = typestore()
    channel = {ir_topic: 0, vis_topic: 1}
    for conn, _, raw in reader.messages(connections=[c for c in reader.connections if c.topic in channel]):
        try:
            sync.push(channel[conn.topic], header_seconds(ts.deserialize_cdr(raw, IMAGE_TYPE)), None)
        except Exception:  # noqa: BLE001 - undecodable messages never pair, in the node either
            continue
    return sync.pairs


def _wait_for_node(node, proc, topics: Sequence[str], timeout: float, log_path: Path) -> bool:
    """Wait until the node subscribes to ``topics`` and publishes its outputs; errors if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BagError(f"fusion_node exited with code {proc.returncode} at start-up; its log: "
                           f"{_log_tail(log_path)}")
        if all(node.count_subscribers(t) for t in topics) and node.count_publishers(output_topics()[0]):
            return True
        time.sleep(0.1)
    return False


def _drain(received: list, expected: int, quiet: float, limit: float) -> None:
    """Wait for the last outputs: until ``expected`` arrived, nothing came for ``quiet`` s, or ``limit`` s."""
    end = time.monotonic() + limit
    last_count, last_change = len(received), time.monotonic()
    while time.monotonic() < end and len(received) < expected:
        time.sleep(0.05)
        if len(received) != last_count:
            last_count, last_change = len(received), time.monotonic()
        elif time.monotonic() - last_change > quiet:
            break


def _last_diagnostics(raws: list) -> dict | None:
    """The node's last fusion status: level, message and key values."""
    ts = typestore()
    for _, raw in reversed(raws):
        for status in ts.deserialize_cdr(bytes(raw), "diagnostic_msgs/msg/DiagnosticArray").status:
            if status.name.endswith(": fusion"):
                return {"name": status.name, "level": int(status.level), "message": status.message,
                        "values": {kv.key: kv.value for kv in status.values}}
    return None


def _write_live_bag(bag: Path, out_bag: Path, storage: str, received: dict, wall_start: float, start_ns: int,
                    rate: float) -> None:
    """The input bag's messages plus what was received, stamped in bag time."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = typestore()
    writer = Writer(out_bag, version=9,
                    storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
    writer.open()
    try:
        reader = open_bag(bag)
        try:
            copies = {}
            for conn in (c for c in reader.connections if c.topic not in received):  # recorded anew below
                copied = _copy_connection(writer, conn, ts)
                if copied is not None:
                    copies[conn.id] = copied
            for conn, bag_ns, raw in reader.messages(connections=[c for c in reader.connections if c.id in copies]):
                writer.write(copies[conn.id], bag_ns, raw)
        finally:
            reader.close()
        types = {t: IMAGE_TYPE for t in output_topics()} | {"/diagnostics": "diagnostic_msgs/msg/DiagnosticArray"}
        for topic, items in received.items():
            conn = writer.add_connection(topic, types[topic], typestore=ts)
            for wall, raw in items:
                writer.write(conn, (start_ns or 0) + int((wall - wall_start) * rate * 1e9), bytes(raw))
    finally:
        writer.close()


def _write_live_pictures(bag: Path, out: Path, report: dict, received: dict, outputs: list[str], ir_topic: str,
                         vis_topic: str, latencies: list[float], samples: int) -> None:
    """Latency histogram and a contact sheet of sample outputs beside the inputs with the same stamps."""
    from .viz import contact_sheet, display_bgr, latency_histogram, write_png

    ts = typestore()
    pictures = {}
    if latencies:
        pictures["latency_histogram"] = str(latency_histogram(out / "latency.png", {"visible to fused": latencies},
                                                              "live latency (ms)"))
    fused = received[outputs[0]]
    chosen = [fused[i][1] for i in _spread(len(fused), samples)] if fused and samples > 0 else []
    if chosen:
        decode = lambda raw: ts.deserialize_cdr(bytes(raw), IMAGE_TYPE)  # noqa: E731
        stamp_of = lambda m: m.header.stamp.sec * 10**9 + m.header.stamp.nanosec  # noqa: E731
        wanted = {stamp_of(decode(raw)): decode(raw) for raw in chosen}
        overlays = {}
        for _, raw in received[outputs[2]]:
            msg = decode(raw)
            if stamp_of(msg) in wanted:
                overlays[stamp_of(msg)] = ros_image.image_to_array(msg)
        vis_imgs, ir_msgs, first_ns = {}, [], None
        reader = open_bag(bag)
        try:
            conns = [c for c in reader.connections if c.topic in (ir_topic, vis_topic)]
            for conn, _, raw in reader.messages(connections=conns):
                msg = decode(raw)
                first_ns = stamp_of(msg) if first_ns is None else min(first_ns, stamp_of(msg))
                if conn.topic == vis_topic and stamp_of(msg) in wanted:
                    vis_imgs[stamp_of(msg)] = ros_image.image_to_array(msg)
                elif conn.topic == ir_topic:
                    ir_msgs.append((stamp_of(msg), raw))
        finally:
            reader.close()
        rows, labels = [], []
        for stamp, msg in sorted(wanted.items()):
            if stamp not in vis_imgs or stamp not in overlays or not ir_msgs:
                continue
            ir_raw = min(ir_msgs, key=lambda item: abs(item[0] - stamp))[1]
            rows.append([display_bgr(ros_image.image_to_array(decode(ir_raw)), stretch=True), vis_imgs[stamp],
                         ros_image.image_to_array(msg), overlays[stamp]])
            labels.append(f"t = {(stamp - first_ns) / 1e9:.2f} s")
        if rows:
            sheet = contact_sheet(rows, ("IR", "visible", "fused", "labels"), labels)
            pictures["contact_sheet"] = str(write_png(out / "contact_sheet.png", sheet))
    report["outputs"].update(pictures)


def live_report_markdown(report: dict) -> str:
    """Markdown of a live evaluation: what was replayed, what the node published, latency, node diagnostics."""
    lines = [f"# Live evaluation: `{report['bag']}` through fusion_node", "",
             f"Node: `{report['node']['command']}` (log: `{report['node']['log']}`).", "",
             "## Replayed and received", "", "| topic | messages |", "| --- | ---: |"]
    for topic, n in report["replay"]["messages"].items():
        lines.append(f"| `{topic}` (replayed) | {n} |")
    for topic, n in report["received"].items():
        lines.append(f"| `{topic}` (received) | {n} |")
    s = report["sync"]
    fused = report["received"][output_topics()[0]]
    lines += ["", f"Replay at {report['replay']['rate']}x took {report['replay']['seconds']:.1f} s. The synchroniser "
                  f"(slop {s['slop_s'] * 1e3:.0f} ms, queue {s['queue_size']}) makes {s['expected_pairs']} pairs from "
                  f"the bag's stamps; the node published {fused} fused images."]
    p = report["latency_ms"]["visible_to_fused"]
    if p.get("count"):
        lines += ["", "## Latency: visible image published -> fused image received (ms)", "",
                  "| pairs | mean | p50 | p90 | p99 | max |", "| ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {p['count']} | {p['mean']:.1f} | {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} | "
                  f"{p['max']:.1f} |"]
    d = report["node"]["diagnostics"]
    if d:
        lines += ["", f"## Node diagnostics (last): {d['message']}", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in d["values"].items()]
    outputs = report["outputs"]
    lines += ["", "## Outputs", "", f"- bag: `{outputs['bag']}` ({outputs['storage']})"]
    for key in ("latency_histogram", "contact_sheet"):
        if key in outputs:
            lines.append(f"- {key.replace('_', ' ')}: ![{key}]({Path(outputs[key]).name})")
    return "\n".join(lines) + "\n"
