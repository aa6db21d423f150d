"""Write camera bags from image folders, evaluate the pipeline on a rosbag2 bag, replay a bag over ROS.

  ivf bag make --ir DIR --vis DIR --out BAG      image folders -> rosbag2 (mcap or sqlite3)
  ivf bag eval BAG --out DIR [--boxes DIR]       offline: sync + pipeline + report (no ROS needed)
  ivf bag eval BAG --out DIR --live              online: replay into the real fusion_node and record it
  ivf bag replay BAG [--rate R] [--loop]         publish a bag's images with its timing and /clock
"""
from __future__ import annotations

import argparse

from .. import bag


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 2)[2]
    sub = p.add_subparsers(dest="bag_command", required=True, metavar="ACTION")

    make = sub.add_parser("make", help="write a rosbag2 from folders of IR and visible images")
    make.add_argument("--ir", required=True, help="folder of IR images")
    make.add_argument("--vis", required=True, help="folder of visible images")
    make.add_argument("--out", required=True, help="bag to create (a new folder)")
    make.add_argument("--rate", type=float, default=10.0, help="frame rate in Hz (default 10)")
    make.add_argument("--vis-rate", type=float, help="visible frame rate for video folders (default: --rate)")
    make.add_argument("--ir-encoding", choices=("mono8", "mono16"), help="IR encoding (default: as stored)")
    make.add_argument("--offset-ms", type=float, default=8.0, help="visible camera lag behind IR (default 8 ms)")
    make.add_argument("--jitter-ms", type=float, default=0.0, help="Gaussian stamp jitter in ms (default 0)")
    make.add_argument("--storage", choices=bag.STORAGES, default="mcap", help="storage plugin (default mcap)")
    make.add_argument("--limit", type=int, help="keep this many frames (pairs spread over the set)")
    make.add_argument("--seed", type=int, default=0, help="seed of the jitter (default 0)")
    make.add_argument("--compressed", action="store_true",
                      help="write sensor_msgs/CompressedImage on <topic>/compressed (PNG IR, JPEG visible)")
    make.set_defaults(_bag=run_make)

    ev = sub.add_parser("eval", help="run the fusion pipeline over a bag and write a report")
    ev.add_argument("bag", help="rosbag2 folder, .mcap or .db3 file")
    ev.add_argument("--out", default="out/bag_eval", help="output folder (default out/bag_eval)")
    ev.add_argument("--ir-topic", help=f"IR image topic (default {bag.IR_TOPIC} or guessed by name)")
    ev.add_argument("--vis-topic", help=f"visible image topic (default {bag.VIS_TOPIC} or guessed by name)")
    ev.add_argument("--checkpoint", help="checkpoint (default: the shipped one)")
    ev.add_argument("--boxes", help="folder of YOLO box files named like the visible frames")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ev.add_argument("--slop", type=float, default=0.05, help="sync slop in seconds (default 0.05)")
    ev.add_argument("--queue-size", type=int, default=10, help="sync queue size (default 10)")
    ev.add_argument("--metrics", help="comma-separated fusion metrics (default all)")
    ev.add_argument("--metrics-every", type=int, default=1, help="score every Nth pair (default 1)")
    ev.add_argument("--storage", choices=bag.STORAGES, help="output bag storage (default: as the input)")
    ev.add_argument("--force", action="store_true", help="replace an existing output bag in --out")
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ev.add_argument("--live", action="store_true", help="replay into the real fusion_node and record its outputs")
    ev.add_argument("--rate", type=float, default=1.0, help="--live: replay speed factor (default 1)")
    ev.add_argument("--domain-id", type=int, help="--live: ROS domain id (default: ROS_DOMAIN_ID or 0)")
    ev.add_argument("--startup-timeout", type=float, default=120.0,
                    help="--live: seconds to wait for the node to subscribe (default 120)")
    ev.set_defaults(_bag=run_eval)

    rp = sub.add_parser("replay", help="publish a bag's image topics over ROS 2 with their timing and /clock")
    rp.add_argument("bag", help="rosbag2 folder, .mcap or .db3 file")
    rp.add_argument("--rate", type=float, default=1.0, help="speed factor (default 1)")
    rp.add_argument("--loop", action="store_true", help="start again at the end (until Ctrl-C)")
    rp.add_argument("--topics", nargs="+", help="topics to publish (default: all Image and CameraInfo topics)")
    rp.add_argument("--no-clock", dest="clock", action="store_false", help="do not publish /clock")
    rp.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable",
                    help="publisher QoS reliability (default reliable)")
    rp.add_argument("--wait", type=float, default=5.0,
                    help="seconds to wait for subscribers to the image topics before playing (default 5)")
    rp.add_argument("--domain-id", type=int, help="ROS domain id (default: ROS_DOMAIN_ID or 0)")
    rp.set_defaults(_bag=run_replay)


def run_make(args) -> int:
    streams, names, mode = bag.folder_streams(
        args.ir, args.vis, rate=args.rate, vis_rate=args.vis_rate, offset_ms=args.offset_ms,
        jitter_ms=args.jitter_ms, ir_encoding=args.ir_encoding, limit=args.limit, seed=args.seed)
    summary = bag.write_camera_bag(args.out, streams, storage=args.storage, frame_names=names, progress=True,
                                   compressed=args.compressed)
    counts = ", ".join(f"{t}: {n} ({summary['encodings'].get(t, '-')})" for t, n in summary["messages"].items())
    print(f"wrote {summary['bag']} ({summary['storage']}, {mode}): {counts}")
    return 0


def run_eval(args) -> int:
    if args.live:
        report = bag.evaluate_live(
            args.bag, args.out, ir_topic=args.ir_topic, vis_topic=args.vis_topic, checkpoint=args.checkpoint,
            device=args.device, slop=args.slop, queue_size=args.queue_size, rate=args.rate, storage=args.storage,
            overwrite=args.force, domain_id=args.domain_id, startup_timeout=args.startup_timeout)
        fused = report["received"][bag.output_topics()[0]]
        print(f"fusion_node published {fused} fused images for {report['sync']['expected_pairs']} pairs")
        print(f"report: {args.out}/report.md")
        return 0
    set_threads(args.threads)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = bag.evaluate_bag(
        args.bag, args.out, ir_topic=args.ir_topic, vis_topic=args.vis_topic, checkpoint=args.checkpoint,
        boxes=args.boxes, device=args.device, slop=args.slop, queue_size=args.queue_size, metrics=metrics,
        metrics_every=args.metrics_every, storage=args.storage, overwrite=args.force)
    print(summary_line(report))
    print(f"report: {args.out}/report.md")
    return 0


def run_replay(args) -> int:
    import rclpy

    from ..dds import use_fastdds_profile

    use_fastdds_profile()
    rclpy.init(domain_id=args.domain_id)
    try:
        node = rclpy.create_node("ivf_bag_replay")
        played = bag.replay(node, args.bag, rate=args.rate, loop=args.loop, topics=args.topics, clock=args.clock,
                            reliability=args.reliability, wait_for_subscribers=args.wait, progress=True)
        counts = ", ".join(f"{t}: {n}" for t, n in played["messages"].items())
        print(f"replayed {played['passes']} pass(es): {counts}")
    finally:
        rclpy.try_shutdown()
    return 0


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads (fewer threads beat oversubscription on a busy machine)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, not {threads}")
        import torch

        torch.set_num_threads(threads)


def summary_line(report: dict) -> str:
    """One line: pairs, failures and median latency of an evaluation report."""
    s, f, lat = report["sync"], report["frames"], report["latency_ms"]["end_to_end"]
    median = f", median latency {lat['p50']:.1f} ms" if lat.get("count") else ""
    return (f"{s['pairs']} pairs ({f['processed']} processed, {f['failed']} failed), unmatched IR "
            f"{s['unmatched']['ir']} / visible {s['unmatched']['visible']}{median}")


def run(args) -> int:
    return args._bag(args)
