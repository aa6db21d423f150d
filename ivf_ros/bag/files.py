"""Reading and writing rosbag2 bags without ROS: constants, message builders, camera bags from image folders.

Bags are read and written with the pure-Python ``rosbags`` library (mcap and sqlite3 storage). Also the helpers
that the offline (``evaluate``) and live (``live``) evaluations share: topic choice, output folder, statistics.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import ros_image
from ..data import PairingError, find_pairs, list_images, read_ir, read_vis
from ..errors import one_line
from ..streams import IR, SUPPORTED, VIS, compression_of, encoding_of, stamp_seconds

IR_TOPIC = "/ir/image"
VIS_TOPIC = "/visible/image"
NODE_NAME = "fusion_node"
OUTPUT_SUFFIXES = ("fused", "labels", "labels_color")
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
FRAME_NAMES_KEY = "ivf_ros.visible_frame_names"  # bag custom data: names of the visible frames, JSON list
START_NS = 1_700_000_000 * 10**9  # stamp of the first frame in bags we write (a fixed, realistic epoch)
RECEIVE_DELAY_NS = 2_000_000  # bag (receive) time after the header stamp, as a recorder on the camera host sees it
IR_ENCODINGS, VIS_ENCODINGS = SUPPORTED[IR], SUPPORTED[VIS]
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


def compressed_message(array: np.ndarray, stamp_ns: int, frame_id: str, png: bool):
    """A rosbags sensor_msgs/CompressedImage of ``array`` as image_transport's ``compressed`` writes it: PNG
    (lossless, 16-bit kept) or JPEG (quality 90)."""
    import cv2

    ts = typestore()
    ok, data = cv2.imencode(".png" if png else ".jpg", array, [] if png else [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise BagError(f"OpenCV cannot encode a {array.dtype.name} image with shape {array.shape}")
    try:
        encoding = encoding_of(array)
    except ValueError as exc:
        raise BagError(str(exc)) from None
    header = ts.types["std_msgs/msg/Header"](stamp=_stamp(stamp_ns), frame_id=frame_id)
    fmt = f"{encoding}; {'png' if png else 'jpeg'} compressed {encoding}"
    return ts.types[COMPRESSED_TYPE](header=header, format=fmt, data=data.ravel())


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
    """The header stamp in seconds; ``ValueError`` for a negative or malformed stamp (the node's guard)."""
    return stamp_seconds(msg.header.stamp)


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
                     progress: bool = False, compressed: bool = False) -> dict:
    """Write image and CameraInfo topics for each stream, messages in receive-time order; returns a summary.

    ``compressed`` writes sensor_msgs/CompressedImage on ``<topic>/compressed`` instead: PNG for IR (16-bit kept),
    JPEG for visible, as image_transport's ``compressed`` plugin does.

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
        kind, suffix = (COMPRESSED_TYPE, "/compressed") if compressed else (IMAGE_TYPE, "")
        conns = [(writer.add_connection(s.topic + suffix, kind, typestore=ts),
                  writer.add_connection(s.topic.rsplit("/", 1)[0] + "/camera_info", INFO_TYPE, typestore=ts))
                 for s in streams]
        for stamp_ns, k, i in tqdm(events, desc="writing bag", unit="msg", disable=not progress):
            stream = streams[k]
            img, encoding = _convert(stream.load(i), stream.encoding)
            encodings[stream.topic] = encoding + (" (png)" if stream.is_ir else " (jpeg)") * compressed
            if compressed:
                msg = compressed_message(img, stamp_ns, stream.frame_id, png=stream.is_ir)
            else:
                msg = image_message(img, encoding, stamp_ns, stream.frame_id)
            info = camera_info_message(img.shape[1], img.shape[0], stamp_ns, stream.frame_id)
            writer.write(conns[k][0], stamp_ns + RECEIVE_DELAY_NS, ts.serialize_cdr(msg, kind))
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
            keep = spread(len(ir_paths), limit)
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


def spread(n: int, k: int) -> list[int]:
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
        raise BagError(f"{path}: not a readable rosbag2 bag: truncated, corrupt or not a bag ({one_line(exc)})"
                       f"{hint}") from None
    return reader


def image_topics(reader) -> dict[str, int]:
    """Image topics (raw and compressed) of a bag and their message counts."""
    return {name: info.msgcount for name, info in reader.topics.items() if info.msgtype in IMAGE_TYPES}


_IR_NAME = re.compile(r"(^|[/_])(ir|lwir|thermal|infrared|therm)([/_]|$)", re.I)
_VIS_NAME = re.compile(r"(^|[/_])(vis|vi|visible|rgb|color|colour|camera)([/_]|$)", re.I)


def pick_topics(reader, ir_topic: str | None = None, vis_topic: str | None = None) -> tuple[str, str]:
    """The IR and visible image topics: as given, else ``/ir/image`` and ``/visible/image`` (or their
    ``/compressed``), else by name."""
    images = image_topics(reader)
    outputs = tuple(f"/{s}" for s in OUTPUT_SUFFIXES)
    candidates = [t for t in images if not t.endswith(outputs)]
    listing = ", ".join(f"{t} ({n})" for t, n in images.items()) or "none"

    def choose(given: str | None, default: str, pattern, what: str, taken: str | None = None) -> str:
        if given:
            if given not in reader.topics:
                raise BagError(f"{reader.path}: no topic {given}; image topics: {listing}")
            if given not in images:
                raise BagError(f"{reader.path}: topic {given} is {reader.topics[given].msgtype}, not "
                               f"{' or '.join(IMAGE_TYPES)}")
            return given
        for name in (default, default + "/compressed"):
            if name in images:
                return name
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


def camera_topics(reader, ir_topic: str | None = None, vis_topic: str | None = None) -> tuple[str, str]:
    """The IR and visible topics (``pick_topics``), the first image of each checked for a supported encoding."""
    ir, vis = pick_topics(reader, ir_topic, vis_topic)
    check_first_encoding(reader, ir, IR_ENCODINGS)
    check_first_encoding(reader, vis, VIS_ENCODINGS)
    return ir, vis


def frame_names(reader) -> list[str] | None:
    """Visible frame names stored by ``ivf bag make`` (None for other bags)."""
    custom = getattr(getattr(reader.storage, "metadata", None), "custom", None) or {}
    text = custom.get(FRAME_NAMES_KEY)
    return json.loads(text) if text else None


def check_first_encoding(reader, topic: str, supported: Sequence[str]) -> None:
    ts = typestore()
    conns = [c for c in reader.connections if c.topic == topic]
    try:
        for conn, _, raw in reader.messages(connections=conns):
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            if conn.msgtype == COMPRESSED_TYPE:
                try:
                    compression_of(msg.format)
                except ValueError as exc:
                    raise BagError(f"{reader.path}: topic {topic}: {exc}") from None
                return
            encoding = msg.encoding
            if encoding not in supported:
                raise BagError(f"{reader.path}: topic {topic} has encoding '{encoding}', which is not supported "
                               f"(supported: {', '.join(supported)})")
            return
    except BagError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BagError(f"{reader.path}: cannot read {topic}: the bag is truncated or corrupt "
                       f"({one_line(exc)})") from None
    raise BagError(f"{reader.path}: topic {topic} has no messages")


# -------------------------------------------------------------------------------------------------- shared


def percentiles(values: Sequence[float]) -> dict:
    """count, mean, p50, p90, p99 and max of a series (empty series: count 0)."""
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(a, (50, 90, 99))
    return {"count": int(a.size), "mean": float(a.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(a.max())}


def copy_connection(writer, conn, ts):
    """Add a connection to ``writer`` like ``conn`` (source message definition where known); None if impossible."""
    if conn.msgdef.data and conn.digest:
        return writer.add_connection(conn.topic, conn.msgtype, msgdef=conn.msgdef.data, rihs01=conn.digest)
    if conn.msgtype in ts.types:
        return writer.add_connection(conn.topic, conn.msgtype, typestore=ts)
    return None


def storage_of(path: Path) -> str:
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


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
