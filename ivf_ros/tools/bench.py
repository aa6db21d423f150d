"""Time the whole per-pair pipeline, the network alone and the SAGE student architecture side by side.

For each size: ``pipeline`` is one pair from raw image bytes to output bytes (conversion in, IR normalisation,
registration, fuse + segment, colour restore, conversion out), ``network`` is the backend alone on ready
luminance images, ``sage`` is the published SAGE student architecture (random weights) on the same inputs with
the same backend and, for other backends than torch, ``sage_torch`` is it in PyTorch eager mode, as the
authors' code runs it (BatchNorm folded, channels-last, inference mode). Measurements are interleaved
round-robin so that load from other processes hits all alike.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from ..backends import BACKENDS, make_backend
from ..bench import peak_memory_mb, reset_peak_memory, time_interleaved
from ..imageops import split_luminance
from ..pipeline import FusionPipeline
from ..sage_student import SageStudent
from .fuse import add_head_precision_argument


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="checkpoint to time (default: the shipped one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--sizes", default="640x480", help="comma-separated WIDTHxHEIGHT list (default: 640x480)")
    p.add_argument("--half", action="store_true", help="half precision on CUDA")
    add_head_precision_argument(p)
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
                          cuda_graphs=args.cuda_graphs, head_precision=args.head_precision)
    device = pipe.device
    sages = {}
    if not args.no_sage:
        torch.manual_seed(0)
        sages["sage"] = make_backend(args.backend, SageStudent(), device, pipe.half, cuda_graphs=args.cuda_graphs)
        if args.backend != "torch":
            torch.manual_seed(0)
            sages["sage_torch"] = make_backend("torch", SageStudent(), device, pipe.half)
    if device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: OMP_WAIT_POLICY is not PASSIVE: on a busy CPU, spin-waiting torch threads slow torch down a lot "
              "(see ivf_ros.backends)", file=sys.stderr)
    report = {
        "device": str(device), "device_name": device_name(device), "backend": args.backend, "half": pipe.half,
        "cuda_graphs": bool(args.cuda_graphs),
        "head_bf16": pipe.head_bf16, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "onnxruntime": _onnxruntime_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before": os.getloadavg()[0], "results": [],
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
        for name, sage in sages.items():
            functions[name] = (lambda sage=sage: sage(ir01, vis_y), args.sage_reps)
        reset_peak_memory(device)
        timings = time_interleaved(functions, args.warmup, device)
        entry = {"size": f"{width}x{height}", "peak_memory_mb": round(peak_memory_mb(device), 1)}
        entry.update({name: t.summary() for name, t in timings.items()})
        for name in sages:
            entry[f"{name}_over_pipeline"] = round(timings[name].p50 / timings["pipeline"].p50, 2)
            entry[f"{name}_over_network"] = round(timings[name].p50 / timings["network"].p50, 2)
        report["results"].append(entry)
    report["load_average_after"] = os.getloadavg()[0]
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def print_table(report: dict) -> None:
    """Markdown table: one row per size and measured function, with SAGE's p50 over the row's p50 for SAGE on the
    same backend and for SAGE in PyTorch eager mode."""
    device = f"{report['device_name']}, {report['threads']} threads" if report["device"] == "cpu" else \
        report["device_name"]
    backend = report["backend"] + (" fp16" if report["half"] else "") + (" graphs" if report["cuda_graphs"] else "") \
        + (" bf16 head" if report["head_bf16"] else "")
    print("| device | backend | size | what | ms p50 | ms p99 | FPS | SAGE / this | SAGE torch eager / this |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for entry in report["results"]:
        eager = "sage_torch" if "sage_torch" in entry else "sage"
        for name in ("pipeline", "network", "sage", "sage_torch"):
            if name not in entry:
                continue
            t = entry[name]
            ratios = [f"{entry[ref]['p50_ms'] / t['p50_ms']:.1f}x" if ref in entry else "-" for ref in ("sage", eager)]
            what = "sage (torch eager)" if name == "sage_torch" else name
            print(f"| {device} | {backend} | {entry['size']} | {what} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} | "
                  f"{t['fps']:.1f} | {' | '.join(ratios)} |")
    for entry in report["results"]:
        print(f"peak memory at {entry['size']}: {entry['peak_memory_mb']:.0f} MB "
              f"({'CUDA, allocated by torch' if report['device'] != 'cpu' else 'process resident'})")
    print(f"load average (1 min) before / after: {report['load_average_before']:.1f} / "
          f"{report['load_average_after']:.1f}")


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
