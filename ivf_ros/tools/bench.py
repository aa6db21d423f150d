"""Time the whole per-pair pipeline, the network alone and the SAGE student architecture side by side.

For each size: ``pipeline`` is one pair from raw image bytes to output bytes (conversion in, IR normalisation,
registration, fuse + segment, colour restore, conversion out), ``network`` is the backend alone on ready
luminance images, ``sage`` is the published SAGE student architecture (random weights) on the same inputs with
the same backend. Measurements are interleaved round-robin so that load from other processes hits all alike.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import cv2
import numpy as np
import torch

from ..backends import BACKENDS, make_backend
from ..bench import peak_memory_mb, reset_peak_memory, time_interleaved
from ..imageops import split_luminance
from ..pipeline import FusionPipeline
from ..sage_student import SageStudent


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="checkpoint to time (default: the shipped one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--sizes", default="640x480", help="comma-separated WIDTHxHEIGHT list (default: 640x480)")
    p.add_argument("--half", action="store_true", help="half precision on CUDA")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="network backend (default: torch)")
    p.add_argument("--onnx", help="run this 'ivf export' file with the ONNX backends (default: export per size)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the network in CUDA graphs (CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch, ONNX Runtime and OpenCV")
    p.add_argument("--reps", type=int, default=50, help="timed runs of the pipeline and the network (default 50)")
    p.add_argument("--sage-reps", type=int, default=10, help="timed runs of the SAGE student (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each before timing (default 3)")
    p.add_argument("--no-sage", action="store_true", help="skip the SAGE student")
    p.add_argument("--json", help="write the results to this JSON file")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"640x480,1280x1024"`` -> ``[(640, 480), (1280, 1024)]`` (width, height)."""
    sizes = []
    for item in text.split(","):
        try:
            w, h = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise ValueError(f"size '{item}' is not WIDTHxHEIGHT") from None
        if w < 16 or h < 16:
            raise ValueError(f"size '{item}' is below 16x16")
        sizes.append((w, h))
    return sizes


def synthetic_pair(width: int, height: int, seed: int = 0) -> tuple[bytes, bytes]:
    """Raw bytes of a mono8 IR and a bgr8 visible frame (smooth scenes with noise), as a camera driver sends."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 4), dtype=np.uint8)
    scene = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(0, 16, (height, width, 4), dtype=np.uint8)
    frame = cv2.add(scene, noise)
    return np.ascontiguousarray(frame[..., 3]).tobytes(), np.ascontiguousarray(frame[..., :3]).tobytes()


def run(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    sizes = parse_sizes(args.sizes)
    pipe = FusionPipeline(args.checkpoint, args.device, args.half, backend=args.backend, onnx_path=args.onnx,
                          cuda_graphs=args.cuda_graphs)
    device = pipe.device
    torch.manual_seed(0)
    sage = None if args.no_sage else make_backend(args.backend, SageStudent(), device, pipe.half,
                                                  cuda_graphs=args.cuda_graphs)
    report = {
        "device": str(device), "device_name": device_name(device), "backend": args.backend, "half": pipe.half,
        "cuda_graphs": bool(args.cuda_graphs), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "onnxruntime": _onnxruntime_version(), "results": [],
    }
    for width, height in sizes:
        ir_bytes, vis_bytes = synthetic_pair(width, height)

        def pipeline_pair():
            ir = np.frombuffer(ir_bytes, np.uint8).reshape(height, width)
            vis = np.frombuffer(vis_bytes, np.uint8).reshape(height, width, 3)
            result = pipe(ir, vis)
            return result.fused.tobytes(), result.labels.tobytes()

        vis_y, _ = split_luminance(np.frombuffer(vis_bytes, np.uint8).reshape(height, width, 3))
        ir01 = pipe.registration.apply(pipe.ir_normalizer(np.frombuffer(ir_bytes, np.uint8).reshape(height, width)),
                                       vis_y.shape)
        functions = {"pipeline": (pipeline_pair, args.reps), "network": (lambda: pipe.infer(ir01, vis_y), args.reps)}
        if sage is not None:
            functions["sage"] = (lambda: sage(ir01, vis_y), args.sage_reps)
        reset_peak_memory(device)
        timings = time_interleaved(functions, args.warmup, device)
        entry = {"size": f"{width}x{height}", "peak_memory_mb": round(peak_memory_mb(device), 1)}
        entry.update({name: t.summary() for name, t in timings.items()})
        if sage is not None:
            entry["sage_over_pipeline"] = round(timings["sage"].p50 / timings["pipeline"].p50, 2)
            entry["sage_over_network"] = round(timings["sage"].p50 / timings["network"].p50, 2)
        report["results"].append(entry)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def print_table(report: dict) -> None:
    """Markdown table: one row per size and measured function."""
    device = f"{report['device_name']}, {report['threads']} threads" if report["device"] == "cpu" else \
        report["device_name"]
    backend = report["backend"] + (" fp16" if report["half"] else "") + (" graphs" if report["cuda_graphs"] else "")
    print("| device | backend | size | what | ms p50 | ms p99 | FPS | SAGE p50 / this p50 |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for entry in report["results"]:
        for name in ("pipeline", "network", "sage"):
            if name not in entry:
                continue
            t = entry[name]
            ratio = f"{entry['sage']['p50_ms'] / t['p50_ms']:.1f}x" if "sage" in entry else "-"
            print(f"| {device} | {backend} | {entry['size']} | {name} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} | "
                  f"{t['fps']:.1f} | {ratio} |")
    for entry in report["results"]:
        print(f"peak memory at {entry['size']}: {entry['peak_memory_mb']:.0f} MB "
              f"({'CUDA, allocated by torch' if report['device'] != 'cpu' else 'process resident'})")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        models = []
    return f"CPU {models[0] if models else platform.machine()}"


def _onnxruntime_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None
