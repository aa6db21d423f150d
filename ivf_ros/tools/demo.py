"""Run the whole system on real pairs (or a synthetic street): write a camera bag, evaluate it, write a report.

By default the embedded sample ``data/demo`` is used: twelve real MSRS validation pairs, day and night, with their
boxes (see data/demo/ATTRIBUTION.md). --data takes any folder holding ir/ and vi/ (and optionally boxes/), e.g.
../shared/data/msrs; --synthetic renders a night street instead (16-bit IR at 30 Hz, visible at 25 Hz, with
ground-truth boxes), which exercises cameras at different rates.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import bag
from ..synthetic import NightStreet, render_sequence, yolo_lines
from .bag import set_threads, summary_line

VIS_FOLDERS = ("vi", "vis", "visible")
DEMO_DATA = Path(__file__).resolve().parent.parent.parent / "data" / "demo"


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--data", help="folder with ir/ and vi/ image folders (and boxes/); default: data/demo")
    p.add_argument("--synthetic", action="store_true", help="render the synthetic night street instead")
    p.add_argument("--frames", type=int, help="pairs to take, spread over the folder (default 16), or visible frames "
                   "of the synthetic street (default 50)")
    p.add_argument("--checkpoint", help="checkpoint (default: the shipped one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--storage", choices=bag.STORAGES, default="mcap", help="bag storage (default mcap)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic scene (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def synthetic_streams(out: Path, frames: int, seed: int) -> tuple[list[bag.CameraStream], list[str], Path]:
    """Render a night street; write the visible frames' YOLO boxes to OUT/boxes; return streams, names, boxes."""
    scene = NightStreet(seed=seed)
    ir, vis = render_sequence(scene, duration=frames / 25.0, ir_rate=30.0, vis_rate=25.0)
    boxes = out / "boxes"
    boxes.mkdir(parents=True)
    names = [f"{i:06d}" for i in range(len(vis))]
    for name, frame in zip(names, vis):
        (boxes / f"{name}.txt").write_text(yolo_lines(frame.boxes, scene.width, scene.height))
    streams = [
        bag.CameraStream(bag.IR_TOPIC, "ir_camera", [f.stamp for f in ir], [f.image for f in ir], is_ir=True),
        bag.CameraStream(bag.VIS_TOPIC, "visible_camera", [f.stamp for f in vis], [f.image for f in vis]),
    ]
    return streams, names, boxes


def data_streams(data: Path, frames: int) -> tuple[list[bag.CameraStream], list[str], Path | None]:
    """Pairs from DATA/ir and DATA/vi (spread over the set) at 10 Hz; DATA/boxes when present."""
    vis_dir = next((data / name for name in VIS_FOLDERS if (data / name).is_dir()), None)
    if not (data / "ir").is_dir() or vis_dir is None:
        raise ValueError(f"{data}: expected ir/ and vi/ image folders")
    streams, names, _ = bag.folder_streams(data / "ir", vis_dir, rate=10.0, jitter_ms=1.0, limit=frames)
    boxes = data / "boxes"
    return streams, names, boxes if boxes.is_dir() else None


def run(args) -> int:
    if args.data and args.synthetic:  # before anything of an earlier run is removed
        raise ValueError("--data and --synthetic exclude each other")
    start = time.perf_counter()
    set_threads(args.threads)
    out = Path(args.out)
    input_bag = out / "input_bag"
    for ours in (input_bag, out / "boxes"):  # outputs of an earlier demo run
        if ours.exists():
            shutil.rmtree(ours)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or (None if args.synthetic else DEMO_DATA)
    if data:
        streams, names, boxes = data_streams(Path(data), args.frames or 16)
        source = f"{data} ({len(names)} pairs)"
    else:
        streams, names, boxes = synthetic_streams(out, args.frames or 50, args.seed)
        source = f"synthetic night street ({len(streams[0].stamps)} IR + {len(streams[1].stamps)} visible frames)"
    print(f"demo: {source}")
    bag.write_camera_bag(input_bag, streams, storage=args.storage, frame_names=names)
    report = bag.evaluate_bag(input_bag, out, checkpoint=args.checkpoint, boxes=boxes, device=args.device,
                              storage=args.storage, overwrite=True)
    print(summary_line(report))
    print(f"input bag:     {input_bag}")
    print(f"output bag:    {report['outputs']['bag']}")
    print(f"report:        {out / 'report.md'} (and report.json)")
    if "contact_sheet" in report["outputs"]:
        print(f"contact sheet: {report['outputs']['contact_sheet']}")
    print(f"demo took {time.perf_counter() - start:.1f} s")
    return 0
