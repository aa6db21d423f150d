"""ROS 2 replay of a bag, and live evaluation: the bag replayed into the real ``fusion_node``, its outputs recorded.

Needs rclpy and the ROS 2 message packages (imported when called).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

from .. import ros_image
from ..streams import IR, VIS, StreamCheck
from .files import (COMPRESSED_TYPE, IMAGE_TYPE, IMAGE_TYPES, INFO_TYPE, BagError, camera_topics, copy_connection,
                    image_topics, json_default, open_bag, output_topics, percentiles, prepare_output, spread,
                    storage_of, typestore)

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
                 if (c.topic in wanted if wanted else c.msgtype in (*IMAGE_TYPES, INFO_TYPE))]
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
        images = [p for t, p in publishers.items() if reader.topics[t].msgtype in IMAGE_TYPES]
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

    from ..dds import use_fastdds_profile
    from ..sync import ApproximateTimeSynchronizer

    bag, out = Path(bag), Path(out)
    reader = open_bag(bag)
    try:
        ir_topic, vis_topic = camera_topics(reader, ir_topic, vis_topic)
        expected, rejected = _expected_pairs(reader, ir_topic, vis_topic,
                                             ApproximateTimeSynchronizer(queue_size, slop))
        counts = image_topics(reader)
        replayed = [t for t, info in reader.topics.items()  # never the node's own outputs of an earlier run
                    if info.msgtype in (*IMAGE_TYPES, INFO_TYPE) and t not in output_topics()]
        vis_type = reader.topics[vis_topic].msgtype
        compressed = reader.topics[ir_topic].msgtype == COMPRESSED_TYPE
    finally:
        reader.close()
    storage = storage or storage_of(bag)
    out_bag = prepare_output(out, overwrite)

    env = dict(os.environ)
    use_fastdds_profile(env)
    use_fastdds_profile()  # this process publishes and subscribes too: both ends need the profile
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    params = {"use_sim_time": "true", "publish_labels_color": "true", "device": device, "sync.slop": str(float(slop)),
              "sync.queue_size": str(int(queue_size)), "transport": "compressed" if compressed else "raw"}
    if checkpoint:
        params["checkpoint"] = str(Path(checkpoint).resolve())
    suffix = "/compressed" if compressed else ""
    cmd = node_command() + ["--ros-args"] + [a for k, v in params.items() for a in ("-p", f"{k}:={v}")] + [
        "-r", f"ir/image{suffix}:={ir_topic}", "-r", f"visible/image{suffix}:={vis_topic}"]
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
                msg = ts.deserialize_cdr(raw, vis_type)
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
        "sync": {"slop_s": slop, "queue_size": queue_size, "expected_pairs": expected,
                 "rejected_by_stream_check": rejected},
        "received": {t: len(v) for t, v in received.items()},
        "latency_ms": {"visible_to_fused": percentiles(latencies)},
        "outputs": {"bag": str(out_bag), "storage": storage},
    }
    _write_live_pictures(bag, out, report, received, outputs, ir_topic, vis_topic, latencies, samples)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    (out / "report.md").write_text(live_report_markdown(report))
    return report


def _expected_pairs(reader, ir_topic: str, vis_topic: str, sync) -> tuple[int, dict]:
    """Pairs the synchroniser makes from the bag's header stamps (what the node can fuse at most), and per topic
    the messages that the node's arrival check rejects (they never pair, in the node either)."""
    ts = typestore()
    channel = {ir_topic: IR, vis_topic: VIS}
    checks = {IR: StreamCheck(IR), VIS: StreamCheck(VIS)}
    rejected = {ir_topic: 0, vis_topic: 0}
    for conn, _, raw in reader.messages(connections=[c for c in reader.connections if c.topic in channel]):
        try:
            stamp = checks[channel[conn.topic]].fields(ts.deserialize_cdr(raw, conn.msgtype))
        except Exception:  # noqa: BLE001 - undecodable or rejected: counted
            rejected[conn.topic] += 1
            continue
        sync.push(channel[conn.topic], stamp, None)
    return sync.pairs, rejected


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
                copied = copy_connection(writer, conn, ts)
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
    from ..viz import contact_sheet, display_bgr, latency_histogram, write_png

    ts = typestore()
    pictures = {}
    if latencies:
        pictures["latency_histogram"] = str(latency_histogram(out / "latency.png", {"visible to fused": latencies},
                                                              "live latency (ms)"))
    fused = received[outputs[0]]
    chosen = [fused[i][1] for i in spread(len(fused), samples)] if fused and samples > 0 else []
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
            checks = {ir_topic: StreamCheck(IR), vis_topic: StreamCheck(VIS)}
            for conn, _, raw in reader.messages(connections=conns):
                msg = ts.deserialize_cdr(bytes(raw), conn.msgtype)
                first_ns = stamp_of(msg) if first_ns is None else min(first_ns, stamp_of(msg))
                if conn.topic == vis_topic and stamp_of(msg) in wanted:
                    vis_imgs[stamp_of(msg)] = checks[vis_topic].convert(msg).image
                elif conn.topic == ir_topic:
                    ir_msgs.append((stamp_of(msg), msg))
        finally:
            reader.close()
        rows, labels = [], []
        for stamp, msg in sorted(wanted.items()):
            if stamp not in vis_imgs or stamp not in overlays or not ir_msgs:
                continue
            ir_msg = min(ir_msgs, key=lambda item: abs(item[0] - stamp))[1]
            rows.append([display_bgr(checks[ir_topic].convert(ir_msg).image, stretch=True), vis_imgs[stamp],
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
    refused = {t: n for t, n in s.get("rejected_by_stream_check", {}).items() if n}
    if refused:
        lines.append("Messages the node's input check refuses (never paired): "
                     + ", ".join(f"`{t}` {n}" for t, n in refused.items()) + ".")
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
