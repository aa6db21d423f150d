"""Benchmark fusion_node over real DDS: publish IR + visible pairs at a rate, report pairs, drops, latency, memory.

Every pair published is accounted for from the node's own counters (differences over the measured run): lost by DDS
on the way in, left unpaired by the synchroniser, skipped by the latest-pair rule (the one expected loss when
inference is slower than the cameras), failed in the node, or lost by DDS on the way out. The node's resident
memory is sampled through the run (growth = end - start; slope over the second half, to tell a leak from warm-up).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of publishing (default 60)")
    parser.add_argument("--rate", type=float, default=30.0, help="pairs per second (default 30)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--device", default="cpu", help="node parameter device (default cpu)")
    parser.add_argument("--checkpoint", default="", help="node parameter checkpoint (default: the shipped one)")
    parser.add_argument("--jitter", type=float, default=0.005, help="max stamp jitter between IR and visible (s)")
    parser.add_argument("--json", type=Path, help="also write the results here")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _frames(width: int, height: int, count: int = 8):
    """A few synthetic mono16 IR / bgr8 visible frames with a moving warm blob."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        cx, cy = width * (0.2 + 0.6 * i / count), height / 2
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (height / 8) ** 2))
        ir = (7000 + 1500 * blob + rng.normal(0, 20, blob.shape)).astype(np.uint16)
        vis = np.dstack([(xx / width * 255), (yy / height * 255), np.full_like(xx, 90)]).astype(np.uint8)
        frames.append((ir, vis))
    return frames


def run(args) -> int:
    from ivf_ros.dds import use_fastdds_profile

    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(random.randint(100, 200)))
    use_fastdds_profile(env)
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "FASTDDS_DEFAULT_PROFILES_FILE") if k in env})

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rclpy.time import Time
    from sensor_msgs.msg import Image

    from ivf_ros import ros_image

    log = tempfile.NamedTemporaryFile("w+", prefix="fusion_node_", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "ivf_ros.node", "--ros-args", "-p", f"device:={args.device}"]
    if args.checkpoint:
        cmd += ["-p", f"checkpoint:={args.checkpoint}"]
    node_proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    node = rclpy.create_node("fusion_bench")
    received: list[tuple[float, float]] = []  # (visible stamp, receive time), ROS clock seconds
    diagnostics: dict[str, str] = {}
    diagnostics_seen = [0]

    def on_fused(msg):
        received.append((Time.from_msg(msg.header.stamp).nanoseconds * 1e-9, node.get_clock().now().nanoseconds * 1e-9))

    def on_diagnostics(msg):
        for status in msg.status:
            if status.name.endswith(": fusion"):
                diagnostics.update({kv.key: kv.value for kv in status.values})
                diagnostics_seen[0] += 1

    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, "/fusion_node/fused", on_fused, reliable)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    pub_ir = node.create_publisher(Image, "ir/image", qos_profile_sensor_data)
    pub_vis = node.create_publisher(Image, "visible/image", qos_profile_sensor_data)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        frames = [(ros_image.fill_image(Image(), ir, "mono16"), ros_image.fill_image(Image(), vis, "bgr8"))
                  for ir, vis in _frames(args.width, args.height)]
        deadline = time.monotonic() + 120.0
        while not received and time.monotonic() < deadline:  # warm up until the node answers
            if node_proc.poll() is not None:
                print(f"bench-node: fusion_node exited ({node_proc.returncode}); log: {log.name}", file=sys.stderr)
                return 1
            _publish_pair(node, pub_ir, pub_vis, frames[0], 0.0)
            time.sleep(0.2)
        if not received:
            print(f"bench-node: no fused image within 120 s; log: {log.name}", file=sys.stderr)
            return 1
        time.sleep(1.0)
        before = _fresh_diagnostics(diagnostics, diagnostics_seen)
        received.clear()
        rss = [(0.0, _rss_mb(node_proc.pid))]
        sent_stamps = []
        period = 1.0 / args.rate
        start = time.monotonic()
        for i in range(int(args.duration * args.rate)):
            time.sleep(max(0.0, start + i * period - time.monotonic()))
            sent_stamps.append(_publish_pair(node, pub_ir, pub_vis, frames[i % len(frames)],
                                             random.uniform(-args.jitter, args.jitter)))
            if time.monotonic() - start - rss[-1][0] >= 10.0:
                rss.append((time.monotonic() - start, _rss_mb(node_proc.pid)))
        time.sleep(3.0)  # let the last pairs arrive
        after = _fresh_diagnostics(diagnostics, diagnostics_seen)
        rss.append((time.monotonic() - start, _rss_mb(node_proc.pid)))
    finally:
        executor.shutdown()
        node_proc.terminate()
        node_proc.wait(timeout=20)
        node.destroy_node()
        rclpy.try_shutdown()
    sent = set(sent_stamps)
    out = [(s, r) for s, r in received if s in sent]
    latency_ms = np.array([r - s for s, r in out]) * 1e3
    n = len(sent_stamps)
    delta = {k: int(float(after.get(k, 0))) - int(float(before.get(k, 0))) for k in (
        "IR images", "visible images", "IR dropped unpaired", "visible dropped unpaired", "pairs made",
        "pairs fused", "pairs skipped (busy)", "pairs not processed (no subscribers)", "bad IR images",
        "bad visible images")}
    losses = {
        "ir_lost_by_dds": n - delta["IR images"], "visible_lost_by_dds": n - delta["visible images"],
        "unpaired": delta["IR dropped unpaired"] + delta["visible dropped unpaired"],
        "bad_images": delta["bad IR images"] + delta["bad visible images"],
        "failed_in_node": delta["pairs made"] - delta["pairs skipped (busy)"]
        - delta["pairs not processed (no subscribers)"] - delta["pairs fused"],
        "outputs_lost_by_dds": delta["pairs fused"] - len(out),
    }
    half = [(t, m) for t, m in rss if t >= args.duration / 2]
    slope = float(np.polyfit(*zip(*half), 1)[0]) * 60.0 if len(half) >= 2 else None
    results = {
        "image": f"{args.width}x{args.height}", "rate_hz": args.rate, "duration_s": args.duration,
        "device": diagnostics.get("device", args.device),
        "pairs_in": len(sent_stamps), "pairs_out": len(out),
        "drop_rate": round(1.0 - len(out) / max(len(sent_stamps), 1), 4),
        "output_rate_hz": round(len(out) / args.duration, 2),
        "latency_p50_ms": round(float(np.percentile(latency_ms, 50)), 1) if out else None,
        "latency_p99_ms": round(float(np.percentile(latency_ms, 99)), 1) if out else None,
        "skipped_by_latest_pair_rule": delta["pairs skipped (busy)"],
        "lost_beyond_latest_pair_rule": sum(losses.values()), "losses": losses,
        "node_rss_start_mb": round(rss[0][1], 1), "node_rss_end_mb": round(rss[-1][1], 1),
        "node_rss_max_mb": round(max(m for _, m in rss), 1), "node_rss_growth_mb": round(rss[-1][1] - rss[0][1], 1),
        "node_rss_slope_second_half_mb_per_min": None if slope is None else round(slope, 2),
        "node_rss_samples_mb": [round(m, 1) for _, m in rss],
        "node_diagnostics": after,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _fresh_diagnostics(diagnostics: dict, seen: list, timeout: float = 10.0) -> dict:
    """A copy of the node's diagnostics as of now (the second message after this call: the first may be old)."""
    count, deadline = seen[0], time.monotonic() + timeout
    while seen[0] < count + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return dict(diagnostics)


def _publish_pair(node, pub_ir, pub_vis, frame, jitter: float) -> float:
    """Publish one pair stamped now (IR offset by ``jitter``); returns the visible stamp in seconds."""
    ir, vis = frame
    now = node.get_clock().now()
    vis.header.stamp = now.to_msg()
    ir.header.stamp = type(now)(nanoseconds=now.nanoseconds + int(jitter * 1e9)).to_msg()
    pub_ir.publish(ir)
    pub_vis.publish(vis)
    return now.nanoseconds * 1e-9
